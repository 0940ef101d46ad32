"""Storage errors. ``dicom_node.errors`` maps them into the project tree.

    StorageError
    ├── DiskFullError
    └── StaleJobError
"""
from __future__ import annotations


class StorageError(Exception):
    """Spool or database failure."""


class DiskFullError(StorageError):
    """Free disk space below the configured watermark."""


class StaleJobError(StorageError):
    """A worker tried to finish a job that another worker has taken over (its lease had run out)."""
