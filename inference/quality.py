"""Is this image something the models were trained on? The input check before any model runs.

The models learnt adult frontal chest radiographs. An image far from that (blank, a few grey levels, mostly
saturated, a strip, a thumbnail) gets no P(abnormal) at all: :func:`input_problem` names what is wrong and
the pipeline returns a "not analysable" prediction with that reason, which the SR, the overlay and
``dicom-node analyze`` state instead of a confident answer. Colour images never get here: DICOM colour images
are skipped by selection, and ``analyze`` refuses colour photographs of PNG/JPEG files (:func:`colour_problem`).

The limits are deliberately wide: none of the 2,278 NIH images in ``../shared/datasets`` trips them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["input_problem", "colour_problem", "MIN_SIDE", "MAX_ASPECT"]

MIN_SIDE = 64  # pixels: smaller is a thumbnail or an icon
MAX_ASPECT = 3.0  # longer / shorter side: chest films are 0.7-1.4, wider is a strip, a scout or a screenshot
MIN_STD = 0.02  # below: blank or constant
MIN_LEVELS = 24  # distinct grey levels (of 256): fewer is a drawing, a mask or a binary image
MAX_EXTREME_SHARE = 0.6  # share of pixels at the darkest or the brightest level
MIN_MEAN, MAX_MEAN = 0.04, 0.96  # an almost entirely black or white picture
MAX_CHROMA = 0.04  # mean |R-G| + |G-B| (in [0, 1]) of a colour file: above, a colour photograph


def input_problem(img01: np.ndarray) -> str | None:
    """The reason the models cannot judge this [0, 1] greyscale image, or None when it is fit for them."""
    img = np.asarray(img01, dtype=np.float32)
    rows, cols = img.shape[:2]
    if min(rows, cols) < MIN_SIDE:
        return f"image too small ({cols} x {rows} pixels; at least {MIN_SIDE} needed)"
    if max(rows, cols) / min(rows, cols) > MAX_ASPECT:
        return f"not the shape of a chest radiograph ({cols} x {rows} pixels)"
    std = float(img.std())
    if std < MIN_STD:
        return f"blank or nearly constant image (standard deviation {std:.3f})"
    mean = float(img.mean())
    if not MIN_MEAN <= mean <= MAX_MEAN:
        return f"almost entirely {'black' if mean < MIN_MEAN else 'white'} (mean intensity {mean:.2f})"
    q = np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    hist = np.bincount(q.ravel(), minlength=256)
    levels = int(np.count_nonzero(hist))
    if levels < MIN_LEVELS:
        return f"only {levels} grey levels: a drawing or a mask, not a radiograph"
    used = np.flatnonzero(hist)
    extreme = max(hist[used[0]], hist[used[-1]]) / q.size
    if extreme > MAX_EXTREME_SHARE:
        return f"mostly saturated ({extreme:.0%} of the pixels at one extreme)"
    return None


def colour_problem(rgb: np.ndarray) -> str | None:
    """For an H x W x 3 picture in [0, 1] or uint8: a reason when it is a colour photograph, else None."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return None
    x = arr[..., :3].astype(np.float32)
    if arr.dtype == np.uint8:
        x /= 255.0
    elif arr.dtype == np.uint16:
        x /= 65535.0
    chroma = float(np.mean(np.abs(x[..., 0] - x[..., 1]) + np.abs(x[..., 1] - x[..., 2])))
    if chroma > MAX_CHROMA:
        return f"a colour picture (chroma {chroma:.2f}), not a radiograph"
    return None
