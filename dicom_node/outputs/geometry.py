"""Where an output draws on its source image: the prediction's pixels must be the source's, and a box becomes
the closed polyline that the SR's image regions and the GSPS's graphics both use."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import EncodingError
from inference.types import Prediction

__all__ = ["check_geometry", "box_polyline"]


def check_geometry(ds: Dataset, pred: Prediction) -> None:
    """The prediction's boxes must be in the source's pixels (see :meth:`Prediction.rescaled`)."""
    size = (int(ds.Rows), int(ds.Columns))
    if tuple(pred.image_size) != size:
        raise EncodingError(
            f"prediction was made on a {pred.image_size[0]}x{pred.image_size[1]} image but the source "
            f"is {size[0]}x{size[1]}: boxes would not match the image"
        )


def box_polyline(box: tuple[float, float, float, float], rows: int, cols: int) -> np.ndarray:
    """Closed 5-point polyline (column, row) for a box, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise EncodingError(f"box {box!r} has non-finite coordinates")
    x0, x1 = sorted((min(max(x0, 0.0), cols), min(max(x1, 0.0), cols)))
    y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
