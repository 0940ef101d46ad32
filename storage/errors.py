"""Storage errors. ``dicom_node.errors`` maps them into the project tree.

    StorageError
    └── DiskFullError
"""
from __future__ import annotations


class StorageError(Exception):
    """Spool or database failure."""


class DiskFullError(StorageError):
    """Free disk space below the configured watermark."""
