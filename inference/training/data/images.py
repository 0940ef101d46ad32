"""Pixels of a :class:`Sample` as the pipeline sees them (``float32`` in ``[0, 1]``, 0 = black)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inference.errors import DatasetError
from inference.preprocess import PreprocessParams, apply_clahe, working_image
from inference.training.data.sample import Sample


def load_image01(path: str | Path) -> np.ndarray:
    """An 8- or 16-bit greyscale (or colour, converted) image file -> float32 HxW in [0, 1]."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DatasetError(f"{path}: not a readable image file")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    raise DatasetError(f"{path}: unsupported pixel type {arr.dtype} (8- or 16-bit images expected)")


# The node normalises and CLAHEs at its working size, the larger model input (512 with the default detector); so
# does training, whatever the size of the files (inference.pipeline.Pipeline.working_size).
WORKING_SIZE = 512


def load_working(sample: Sample, params: PreprocessParams) -> np.ndarray:
    """The file's image shrunk (aspect kept) to the node's working size for a model of ``params``."""
    return working_image(load_image01(sample.path), max(WORKING_SIZE, params.input_size))[0]


def load_clahe01(sample: Sample, params: PreprocessParams) -> np.ndarray:
    """The CLAHE'd image: from the file as is when it was exported CLAHE'd, else normalised and CLAHE'd now, at
    the working size."""
    if sample.clahe_applied:
        return load_image01(sample.path)
    return apply_clahe(load_working(sample, params), params)
