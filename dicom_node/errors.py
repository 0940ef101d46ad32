"""The project's exception tree.

    DicomNodeError
    ├── ConfigError            bad or missing configuration (names the key)
    ├── StorageError           spool or database trouble
    │   └── DiskFullError      free disk below storage.min_free_disk_mb
    ├── PixelDataError         pixel data that cannot be turned into an image (multi-frame, colour, codec)
    ├── ModelError             model file missing, corrupt or mismatched (raised by inference.modelfile)
    ├── EncodingError          an output object (SR/SC/GSPS) could not be built or failed validation
    └── DeliveryError          sending a result to a destination failed
        ├── TransientDeliveryError   worth retrying: refused, timeout, abort, A7xx
        └── PermanentDeliveryError   not worth retrying: association rejected, Cxxx, A9xx

Third-party exceptions are translated at the boundary with ``raise ... from exc``.
``inference`` keeps its own ``inference.errors.ModelError`` (it may not import this package);
this module re-exports it so callers catch one tree.
"""
from __future__ import annotations

from inference.errors import InferenceError, ModelError  # noqa: F401  (re-exported)


class DicomNodeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(DicomNodeError):
    """Configuration file missing, unreadable or invalid."""


class StorageError(DicomNodeError):
    """Spool or database failure."""


class DiskFullError(StorageError):
    """Free disk space is below the configured watermark."""


class PixelDataError(DicomNodeError):
    """Pixel data that the node cannot analyse; the message says why."""


class EncodingError(DicomNodeError):
    """An output object could not be built."""


class DeliveryError(DicomNodeError):
    """Sending a result object failed."""


class TransientDeliveryError(DeliveryError):
    """A failure worth retrying later (refused, timeout, abort, out of resources)."""


class PermanentDeliveryError(DeliveryError):
    """A failure that retrying will not fix (rejected association, Cxxx/A9xx status)."""
