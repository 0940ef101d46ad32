"""The project's exception tree.

    DicomNodeError
    ├── ConfigError            bad or missing configuration (names the key)
    ├── PixelDataError         pixel data that cannot be turned into an image (multi-frame, colour, codec)
    ├── EncodingError          an output object (SR/SC/GSPS) could not be built or failed validation
    └── DeliveryError          sending a result to a destination failed
        ├── TransientDeliveryError   worth retrying: refused, timeout, abort, A7xx
        └── PermanentDeliveryError   not worth retrying: association rejected, Cxxx, A9xx

Third-party exceptions are translated at the boundary with ``raise ... from exc``.
``inference`` and ``storage`` keep their own small trees (they may not import this package):
``inference.errors.ModelError`` / ``InferenceError`` and ``storage.errors.StorageError`` / ``DiskFullError``
are re-exported here so that callers import every error from one place.
"""
from __future__ import annotations

from inference.errors import InferenceError, ModelError  # noqa: F401  (re-exported)
from storage.errors import DiskFullError, StorageError  # noqa: F401  (re-exported)


class DicomNodeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(DicomNodeError):
    """Configuration file missing, unreadable or invalid."""


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
