"""Turn a single-frame greyscale DICOM image into a float32 array in [0, 1] for the pipeline.

The chain follows PS3.3 C.11 (the grayscale standard display pipeline, minus the presentation LUT):

    stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)
                  -> VOI LUT (VOI LUT Sequence, else the first Window Center/Width pair,
                              else / if nonsense: percentiles 0.5-99.5 of the image)
                  -> scaled to [0, 1] -> inverted when MONOCHROME1 (so bone/mediastinum is bright)

Decoding of compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG baseline/extended/lossless,
RLE, deflate) is pydicom's, with the pylibjpeg / pyjpegls plugins. One exception, asked for with
``decode_image(..., at_least=N)``: a JPEG 2000 image larger than the models need is decoded at a lower
resolution level of its wavelet (each level halves both sides; OpenJPEG via Pillow), the coarsest whose longer
side is still at least N pixels. That is the codec's own low-pass image, 3-4x faster than a full decode
followed by a resize; callers then map boxes back to source pixels by the ratio of the sizes. Everything that
cannot become one greyscale image (multi-frame, colour, float pixel data, no pixel data, codec failure) raises
:class:`~dicom_node.errors.PixelDataError` with a message that says why. Messages never contain
patient data.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.errors import PixelDataError

__all__ = ["load_image", "display_window", "first_value", "read_dataset", "read_header", "ensure_transfer_syntax"]

# A window that sends more than this share of the pixels to black or white is treated as nonsense.
SATURATED_FRACTION = 0.99
FALLBACK_PERCENTILES = (0.5, 99.5)
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# The largest image decoded (Rows x Columns): a chest radiograph has 5-20 megapixels; a header that claims far
# more (a compressed "bomb") would make the decoder allocate gigabytes before anything could be checked.
MAX_PIXELS = 64_000_000


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
            f"{photometric or 'missing'}; MONOCHROME1/MONOCHROME2 expected)"
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(keyword) in (None, "", 0):
            raise PixelDataError(f"the image pixel module is incomplete ({keyword} missing)")
    if int(ds.Rows) * int(ds.Columns) > MAX_PIXELS:
        raise PixelDataError(
            f"image too large to decode ({int(ds.Rows)} x {int(ds.Columns)}; at most {MAX_PIXELS // 10**6} megapixels)"
        )


def _j2k_precision(codestream: bytes) -> tuple[int, bool] | None:
    """(bits, signed) of the single component of a raw JPEG 2000 codestream (SOC then SIZ), else None."""
    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 43:
        return None
    if int.from_bytes(codestream[40:42], "big") != 1:  # Csiz: one component
        return None
    ssiz = codestream[42]
    return (ssiz & 0x7F) + 1, bool(ssiz & 0x80)


def _j2k_reduced(ds: Dataset, at_least: int) -> np.ndarray | None:
    """The stored values at the coarsest JPEG 2000 resolution level whose longer side is >= ``at_least``;
    None when that is the full image or the shortcut does not apply (then pydicom decodes in full)."""
    if ds.file_meta.TransferSyntaxUID not in (JPEG2000Lossless, JPEG2000) or "PixelData" not in ds:
        return None
    if (
        int(first_value(ds.get("NumberOfFrames")) or 1) != 1
        or int(ds.get("SamplesPerPixel", 1) or 1) != 1
        or int(ds.get("PixelRepresentation", 0) or 0) != 0
    ):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    level = 0
    while math.ceil(max(rows, cols) / 2 ** (level + 1)) >= at_least:
        level += 1
    if level == 0:
        return None
    try:
        from PIL import Image

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - no Pillow, or fragments pydicom cannot split: the full decode decides
        return None
    precision = _j2k_precision(frame)
    if precision is None or precision[1] or not 8 <= precision[0] <= 16:
        return None
    for r in range(level, 0, -1):  # a codestream may have fewer levels than asked for
        try:
            with Image.open(io.BytesIO(frame)) as im:
                im.reduce = r  # type: ignore[method-assign,assignment]  # Jpeg2KImagePlugin: the level to decode
                im.load()
                mode, arr = im.mode, np.asarray(im)
        except Exception:  # noqa: BLE001 - Pillow/OpenJPEG refuse this level: try a finer one
            continue
        if (mode, precision[0] == 8) not in (("L", True), ("I;16", False)):
            return None
        if arr.shape != (math.ceil(rows / 2**r), math.ceil(cols / 2**r)):
            return None
        if mode == "I;16" and precision[0] < 16:
            arr = arr >> (16 - precision[0])  # Pillow scales I;16 up to the full 16 bits
        return arr
    return None


def _decode(ds: Dataset, at_least: int | None = None) -> np.ndarray:
    ensure_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    if at_least:
        reduced = _j2k_reduced(ds, at_least)
        if reduced is not None:
            return reduced
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


def _prepare(src: Dataset | str | os.PathLike, at_least: int | None = None):
    ds = src if isinstance(src, Dataset) else read_dataset(src)
    _check_image(ds)
    stored = _decode(ds, at_least)
    return ds, _padding_mask(stored, ds), _modality(stored, ds)


def decode_image(
    src: Dataset | str | os.PathLike, *, at_least: int | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """:func:`load_image` and :func:`display_window` in one decode: ``(image01, (center, width) or None)``.

    ``at_least``: the caller needs no more than this many pixels on the longer side, so a JPEG 2000 image may
    come back smaller than Rows x Columns (see the module docstring); every other image comes back in full."""
    ds, mask, values = _prepare(src, at_least)
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
