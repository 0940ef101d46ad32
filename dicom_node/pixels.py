"""Turn a single-frame greyscale DICOM image into a float32 array in [0, 1] for the pipeline.

The chain follows PS3.3 C.11 (the grayscale standard display pipeline, minus the presentation LUT):

    stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)
                  -> VOI LUT (VOI LUT Sequence, else the first Window Center/Width pair,
                              else / if nonsense: percentiles 0.5-99.5 of the image)
                  -> scaled to [0, 1] -> inverted when MONOCHROME1 (so bone/mediastinum is bright)

Decoding of compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG baseline/extended/lossless,
RLE, deflate) is pydicom's, with the pylibjpeg / pyjpegls plugins. Everything that cannot become one
greyscale image (multi-frame, colour, float pixel data, no pixel data, codec failure) raises
:class:`~dicom_node.errors.PixelDataError` with a message that says why. Messages never contain
patient data.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import PixelDataError

__all__ = ["load_image", "display_window", "first_value", "read_dataset", "read_header", "ensure_transfer_syntax"]

# A window that sends more than this share of the pixels to black or white is treated as nonsense.
SATURATED_FRACTION = 0.99
FALLBACK_PERCENTILES = (0.5, 99.5)
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def ensure_transfer_syntax(ds: Dataset) -> Dataset:
    """Give ``ds`` a file meta Transfer Syntax UID when it has none (files without a meta header).

    The syntax is the encoding pydicom detected while reading; implicit VR little endian when that
    is unknown (the DICOM default). Returns ``ds`` (modified in place).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is False:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
        else:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def read_dataset(path: str | os.PathLike, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file with or without the Part 10 header; raise PixelDataError if it is not DICOM."""
    try:
        ds = pydicom.dcmread(Path(path), force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise PixelDataError(f"{Path(path).name}: not a readable DICOM file ({type(exc).__name__})") from exc
    if len(ds) == 0:
        raise PixelDataError(f"{Path(path).name}: not a DICOM file (no data elements)")
    return ensure_transfer_syntax(ds)


def read_header(path: str | os.PathLike) -> Dataset:
    """The dataset without its pixel data (cheap: selection, routing, logging)."""
    return read_dataset(path, stop_before_pixels=True)


def _check_image(ds: Dataset) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError("float pixel data is not supported (integer Pixel Data expected)")
        raise PixelDataError("the dataset has no Pixel Data")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise PixelDataError(f"invalid Number of Frames {frames!r}") from None
    if frames > 1:
        raise PixelDataError(f"multi-frame images are not supported ({frames} frames; one radiograph expected)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in _GREYSCALE:
        raise PixelDataError(
            f"colour images are not supported (Samples per Pixel {samples}, Photometric Interpretation "
            f"{photometric or 'missing'}; MONOCHROME1/MONOCHROME2 expected)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(keyword) in (None, "", 0):
            raise PixelDataError(f"the image pixel module is incomplete ({keyword} missing)")


def _decode(ds: Dataset) -> np.ndarray:
    ensure_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types (NotImplementedError, RuntimeError, ValueError...)
        name = getattr(ts, "name", str(ts))
        raise PixelDataError(f"cannot decode pixel data ({name}): {type(exc).__name__}: {exc}") from exc
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise PixelDataError(f"expected one 2-D frame, decoded an array of shape {arr.shape}")
    return arr


def _modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    try:
        out = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise PixelDataError(f"invalid Modality LUT: {type(exc).__name__}: {exc}") from exc
    return np.asarray(out, dtype=np.float64)


def first_value(value) -> float | None:
    """First value of a possibly multi-valued DS, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -60, 60)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _saturated(out: np.ndarray, mask: np.ndarray | None) -> bool:
    sample = out[mask] if mask is not None else out
    if sample.size == 0:
        return True
    return float(np.mean((sample <= 0.0) | (sample >= 1.0))) > SATURATED_FRACTION


def _percentile_window(values: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    sample = values[mask] if mask is not None and mask.any() else values
    lo, hi = (float(v) for v in np.percentile(sample, FALLBACK_PERCENTILES))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:  # constant image: nothing to show
        return np.zeros_like(values), lo, lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0), lo, hi


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """First item of the VOI LUT Sequence applied to modality values, scaled to [0, 1]; None if broken."""
    item = ds.VOILUTSequence[0]
    try:
        n, first, _bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first > 32767:
            first -= 65536  # descriptor is US or SS; a signed image means SS
        data = item.LUTData
        if isinstance(data, bytes):  # OW: endianness of the transfer syntax
            big = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
            lut = np.frombuffer(data, dtype=">u2" if big else "<u2")[:n].astype(np.float64)
        else:
            lut = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)[:n]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # a broken LUT falls through to the window / percentile path
    if lut.size < 2 or lut.max() <= lut.min():
        return None
    index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.int64)
    lo, hi = float(lut.min()), float(lut.max())
    return (lut[index] - lo) / (hi - lo)


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels that are not padding (Pixel Padding Value), for the statistics only."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, (bytes, list)):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if isinstance(limit, int):
        lo, hi = sorted((int(pad), limit))
        mask = ~((stored >= lo) & (stored <= hi))
    else:
        mask = stored != int(pad)
    return mask if mask.any() else None


def _voi(values: np.ndarray, ds: Dataset, mask: np.ndarray | None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """VOI stage: (image in [0, 1], the linear window used as (center, width), None for a LUT)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        out = _voi_lut_sequence(values, ds)
        if out is not None and not _saturated(out, mask):
            return out, None
    center, width = first_value(ds.get("WindowCenter")), first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 1:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        out = _window(values, center, width, function)
        if not _saturated(out, mask):
            return out, (center, width)
    out, lo, hi = _percentile_window(values, mask)
    return out, ((lo + hi) / 2.0, max(hi - lo, 1.0))


def _prepare(src: Dataset | str | os.PathLike):
    ds = src if isinstance(src, Dataset) else read_dataset(src)
    _check_image(ds)
    stored = _decode(ds)
    return ds, _padding_mask(stored, ds), _modality(stored, ds)


def decode_image(src: Dataset | str | os.PathLike) -> tuple[np.ndarray, tuple[float, float] | None]:
    """:func:`load_image` and :func:`display_window` in one decode: ``(image01, (center, width) or None)``."""
    ds, mask, values = _prepare(src)
    out, window = _voi(values, ds, mask)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32), window


def load_image(src: Dataset | str | os.PathLike) -> np.ndarray:
    """Decode ``src`` (a dataset or a file path) to a float32 ``rows x columns`` array in [0, 1].

    0 is black, 1 is white as a radiologist sees the image (MONOCHROME1 already inverted).
    Raises :class:`PixelDataError` for multi-frame, colour or missing/undecodable pixel data.
    A dataset without file meta gets a Transfer Syntax UID (implicit VR little endian by default).
    """
    return decode_image(src)[0]


def display_window(src: Dataset | str | os.PathLike) -> tuple[float, float] | None:
    """The (center, width) in modality units that :func:`load_image` windows with, including the
    percentile fallback; None when the image's VOI LUT Sequence is used. For presentation states."""
    return decode_image(src)[1]
