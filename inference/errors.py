"""The inference branch of the project's exception tree (the tree is drawn in :mod:`dicom_node.errors`; the root is
:mod:`node_errors`; no DICOM here).

InferenceError
├── ModelError        model file missing, corrupt, or its metadata does not match what is asked
└── DatasetError      a training/evaluation dataset layout is missing or malformed
"""

from __future__ import annotations

from node_errors import DicomNodeError


class InferenceError(DicomNodeError):
    """Base of inference errors."""


class ModelError(InferenceError):
    """A model file that cannot be used; the message says which file and why."""


class DatasetError(InferenceError):
    """A dataset folder that does not have the expected layout."""
