"""The storage branch of the project's exception tree (the tree is drawn in :mod:`dicom_node.errors`; the root is
:mod:`node_errors`).

StorageError
├── DiskFullError
├── DatabaseError
├── StaleJobError
└── UnknownStudyError
"""

from __future__ import annotations

from node_errors import DicomNodeError


class StorageError(DicomNodeError):
    """Spool or database failure."""


class DiskFullError(StorageError):
    """Free disk space below the configured watermark."""


class DatabaseError(StorageError):
    """The database failed a statement (locked, unreachable, disk I/O). The message never holds row values."""


class StaleJobError(StorageError):
    """A worker tried to finish a job that another worker has taken over (its lease had run out)."""


class UnknownStudyError(StorageError, LookupError):
    """No instance of the study is stored (e.g. ``dicom-node reanalyze`` with a wrong UID)."""
