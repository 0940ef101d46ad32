"""Errors of the inference package (no DICOM here).

    InferenceError
    ├── ModelError        model file missing, corrupt, or its metadata does not match what is asked
    └── DatasetError      a training/evaluation dataset layout is missing or malformed
"""
from __future__ import annotations


class InferenceError(Exception):
    """Base of inference errors."""


class ModelError(InferenceError):
    """A model file that cannot be used; the message says which file and why."""


class DatasetError(InferenceError):
    """A dataset folder that does not have the expected layout."""
