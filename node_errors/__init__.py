"""The root of dicom-node's exception tree, in a package of its own that imports nothing.

Every error the project raises on purpose derives from :class:`DicomNodeError`. The branches live beside the code
that raises them: :mod:`dicom_node.errors` (configuration, received instances, pixels, outputs, delivery; the
whole tree is drawn there), :mod:`storage.errors` and :mod:`inference.errors`. This leaf lets ``storage`` and
``inference`` derive their branches without importing anything of ``dicom_node`` (checked by the import contracts
in ``pyproject.toml``).
"""

from __future__ import annotations

__all__ = ["DicomNodeError"]


class DicomNodeError(Exception):
    """Base of every error this project raises on purpose. Messages carry no patient data."""
