"""The project's exception tree: every error dicom-node raises on purpose is a :class:`DicomNodeError`.

    DicomNodeError
    ├── ConfigError                      bad or missing configuration (names the key)
    ├── InstanceRejected                 a received instance the node does not accept (C-STORE failure)
    │   ├── UndecodableInstanceError       the data set cannot be parsed (or is shorter than its lengths)
    │   ├── InflatedTooLargeError          a deflated data set inflates beyond node.max_inflated_mb
    │   ├── MissingUIDError                Study, Series or SOP Instance UID is missing
    │   ├── UIDMismatchError               the data set's SOP Instance UID is not the command's
    │   └── InvalidUIDError                a UID with other characters than digits and dots, or too long
    ├── PixelDataError                   pixel data that cannot be turned into an image (multi-frame, colour, codec)
    ├── WorkerStartError                 a worker process could not start (e.g. its model files do not load)
    ├── EncodingError                    an output object (SR/SC/GSPS) could not be built or failed validation
    ├── DeliveryError                    sending a result to a destination failed
    │   ├── TransientDeliveryError         worth retrying: refused, timeout, abort, A7xx, rejected-transient
    │   └── PermanentDeliveryError         not worth retrying: rejected-permanent, Cxxx, A9xx
    ├── StorageError                     (storage.errors) spool or database failure
    │   ├── DiskFullError                  free disk below storage.min_free_disk_mb
    │   ├── DatabaseError                  the database refused or failed a statement
    │   ├── StaleJobError                  a job was taken over by another worker (its lease ran out)
    │   └── UnknownStudyError              no such study stored (reanalyze)
    └── InferenceError                   (inference.errors) model and dataset problems
        ├── ModelError                     model file missing, corrupt, or not what is asked
        └── DatasetError                   a training/evaluation dataset layout is missing or malformed

Where they surface: :mod:`dicom_node.ingest.statuses` maps each to the C-STORE status a sender gets, and
:data:`dicom_node.cli.EXIT_CODES` to the exit code of a command. Anything else that escapes is a bug: it is
logged with its traceback (see :func:`dicom_node.logs.safe_traceback`), never relabelled as one of these.

Third-party exceptions are translated at the boundary with ``raise ... from exc``. The root,
:class:`DicomNodeError`, is defined in the leaf package :mod:`node_errors` (it imports nothing) and re-exported
here; ``storage.errors`` and ``inference.errors`` derive their branches from it there, without importing
``dicom_node`` (checked by the import contracts in ``pyproject.toml``). This module imports nothing else of the
project. Import every other error from the module that defines it.
"""

from __future__ import annotations

from node_errors import DicomNodeError

__all__ = [
    "DicomNodeError",
    "ConfigError",
    "InstanceRejected",
    "UndecodableInstanceError",
    "InflatedTooLargeError",
    "MissingUIDError",
    "UIDMismatchError",
    "InvalidUIDError",
    "PixelDataError",
    "WorkerStartError",
    "EncodingError",
    "DeliveryError",
    "TransientDeliveryError",
    "PermanentDeliveryError",
]


class ConfigError(DicomNodeError):
    """Configuration file missing, unreadable or invalid."""


class InstanceRejected(DicomNodeError):
    """A received instance that the node refuses; the message says why (it becomes the ErrorComment)."""


class UndecodableInstanceError(InstanceRejected):
    """The received data set cannot be parsed (unknown VR, broken sequence, not DICOM)."""


class InflatedTooLargeError(InstanceRejected):
    """A deflated data set that inflates beyond the node's limit (a decompression bomb, or far larger than any
    radiograph)."""


class MissingUIDError(InstanceRejected):
    """A UID the node needs to file the instance is missing."""


class UIDMismatchError(InstanceRejected):
    """The data set's SOP Instance UID is not the one its C-STORE command announced."""


class InvalidUIDError(InstanceRejected):
    """A UID of the data set is not a valid UID (other characters than digits and dots, over 64 characters)."""


class PixelDataError(DicomNodeError):
    """Pixel data that the node cannot analyse; the message says why."""


class WorkerStartError(DicomNodeError):
    """A worker process could not start (its models did not load): ``serve`` refuses to run without it."""


class EncodingError(DicomNodeError):
    """An output object could not be built."""


class DeliveryError(DicomNodeError):
    """Sending a result object failed."""


class TransientDeliveryError(DeliveryError):
    """A failure worth retrying later (refused, timeout, abort, out of resources)."""


class PermanentDeliveryError(DeliveryError):
    """A failure that retrying will not fix (rejected association, Cxxx/A9xx status)."""
