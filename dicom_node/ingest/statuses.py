"""The one table of C-STORE statuses the node answers, and which error gives which.

A sender (a PACS, a modality) decides from the status whether to retry: 0xA7xx is "try again later", 0xA9xx
and 0xCxxx are "this instance will never be accepted". So our own failures (disk, database) must be 0xA700,
never a "cannot understand" that would make the sender give up on a good image. The README's list of
statuses is tested against :data:`STATUSES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.errors import (
    InflatedTooLargeError,
    InvalidUIDError,
    MissingUIDError,
    UIDMismatchError,
    UndecodableInstanceError,
)
from storage.errors import DiskFullError, StorageError


@dataclass(frozen=True)
class StoreStatus:
    code: int
    meaning: str  # as the README lists it
    comment: str | None  # the ErrorComment sent with it (LO: at most 64 characters)

    def dataset(self, comment: str | None = None) -> Dataset:
        """The status data set pynetdicom sends; ``comment`` overrides the default ErrorComment."""
        ds = Dataset()
        ds.Status = self.code
        text = comment or self.comment
        if text:
            ds.ErrorComment = text[:64]
        return ds


STORED = StoreStatus(0x0000, "stored (also for a duplicate, which is stored once)", None)
OUT_OF_DISK = StoreStatus(
    0xA700,
    "out of resources: the disk filled up while receiving, or free disk is below storage.min_free_disk_mb",
    "out of disk space",
)
STORAGE_FAILED = StoreStatus(
    0xA700, "out of resources: the spool or the database failed (retry later)", "storage failure"
)
MISSING_UID = StoreStatus(0xA900, "data set does not match SOP class: a required UID is missing", "missing UID")
UID_MISMATCH = StoreStatus(
    0xA900,
    "data set does not match SOP class: its SOP Instance UID differs from the command's",
    "SOP Instance UID differs from the command",
)
INVALID_UID = StoreStatus(0xC212, "cannot understand: a UID is not valid (characters or length)", "invalid UID")
UNDECODABLE = StoreStatus(0xC210, "cannot understand: the data set cannot be decoded", "dataset cannot be decoded")
INFLATED_TOO_LARGE = StoreStatus(
    0xC210,
    "cannot understand: a deflated data set inflates beyond node.max_inflated_mb (read with that cap)",
    "deflated data set inflates beyond the limit",
)
INTERNAL_ERROR = StoreStatus(
    0xC211, "cannot understand: unexpected error in the node (logged with its traceback)", "internal error"
)

# First match wins: subclasses before their bases. Anything not listed is a bug of ours: INTERNAL_ERROR, the
# status pynetdicom itself answers when a handler raises.
STATUSES: tuple[tuple[type[BaseException], StoreStatus], ...] = (
    (DiskFullError, OUT_OF_DISK),
    (StorageError, STORAGE_FAILED),
    (MissingUIDError, MISSING_UID),
    (UIDMismatchError, UID_MISMATCH),
    (InvalidUIDError, INVALID_UID),
    (InflatedTooLargeError, INFLATED_TOO_LARGE),
    (UndecodableInstanceError, UNDECODABLE),
)

ALL: tuple[StoreStatus, ...] = (STORED, *(s for _, s in STATUSES), INTERNAL_ERROR)


def status_for(exc: BaseException) -> StoreStatus:
    for kind, status in STATUSES:
        if isinstance(exc, kind):
            return status
    return INTERNAL_ERROR
