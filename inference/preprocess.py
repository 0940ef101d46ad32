"""Image preprocessing: ONE code path for training, evaluation and the running node.

Every image enters as a 2-D ``float32`` array in ``[0, 1]`` (rows x columns; 0 = black, i.e. the
DICOM side has already applied the modality/VOI LUT and inverted MONOCHROME1). Then::

    img01 --apply_clahe--> clahe01 --to_model_input--> (C x S x S float32 tensor data, Letterbox)
      (intensity normalisation,     (letterbox to S x S keeping aspect, normalise, channels)
       then CLAHE)

Intensity normalisation (``intensity="rank"``, models trained since 0.2) replaces each pixel by its
rank among the image's pixels (exact histogram equalisation to a uniform [0, 1] distribution). A
monotone change of the grey scale (brightness, contrast, gamma, a stored VOI window or none, 8/12/16-bit
storage) moves each pixel at most within the share of its own grey level, and the mean change is ~1e-5.
PNG, JPEG and DICOM therefore reach the network alike and the network cannot learn how an archive
happened to scale its pixels. Older model files say
``intensity="none"`` and get the image as it is.

``prepare(img01, params)`` does both steps. The pipeline runs CLAHE once and calls
``to_model_input`` for each model, because both models share the CLAHE settings. Training code that
reads CLAHE'd PNG/JPEG files written by ``export_image`` calls ``to_model_input`` on
``png / 255`` (CLAHE is not applied twice).

Geometry: ``letterbox`` scales the longer side to ``size`` (aspect ratio kept), centres the image
and pads with 114/255 like ultralytics. The returned :class:`Letterbox` maps boxes
``(x_min, y_min, x_max, y_max)`` between source pixels and model-input pixels, exactly inverse to
each other (``to_source`` also clips to the source image).

CLAHE is computed on an 8-bit copy by default (``clahe_bits=8``). OpenCV's 16-bit CLAHE uses a
65 536-bin histogram per tile, so the clip limit (in units of the mean bin height) floors at one
count per bin and the equalisation becomes nearly an identity map for real radiographs; the 8-bit
version behaves like the CLAHE the public chest X-ray literature (and our PNG training data) uses.
``clahe_bits=16`` remains available for experiments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

PAD_VALUE = 114.0 / 255.0  # ultralytics' letterbox grey
INTENSITY_MODES = ("none", "rank")
RESIZE_MODES = ("letterbox", "stretch")
RANK_LEVELS = 65536  # grey levels the rank normalisation tells apart (16-bit data keeps every level); <= 2**16

__all__ = [
    "PAD_VALUE",
    "PreprocessParams",
    "Letterbox",
    "apply_clahe",
    "normalise_intensity",
    "normalise",
    "letterbox",
    "stretch",
    "to_model_input",
    "prepare",
    "export_image",
    "export_scale",
    "check_image",
]


@dataclass(frozen=True)
class PreprocessParams:
    """Everything needed to turn an image into a model input; stored in each model file."""

    clahe_clip_limit: float = 2.0  # OpenCV clipLimit; 0 disables CLAHE
    clahe_tile_grid: int = 8  # tiles per side (tileGridSize = (n, n))
    clahe_bits: int = 8  # 8 or 16: depth of the copy CLAHE runs on
    input_size: int = 512  # square model input side S
    channels: int = 1  # 1 (timm classifier, in_chans=1) or 3 (grey repeated: YOLO, ImageNet-style classifiers)
    # model input = (x - mean) / std, x in [0, 1]; one number, or one per channel (ImageNet's mean and std)
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    pad_value: float = PAD_VALUE  # letterbox padding, in [0, 1] before normalisation
    intensity: str = "none"  # "rank": histogram-equalise before CLAHE; "none": as given (files before 0.2)
    resize: str = "letterbox"  # "letterbox": aspect kept, padded; "stretch": straight to S x S (torchvision Resize)

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.clahe_clip_limit < 0:
            raise ValueError(f"clahe_clip_limit must be >= 0, got {self.clahe_clip_limit}")
        if self.clahe_tile_grid < 1:
            raise ValueError(f"clahe_tile_grid must be >= 1, got {self.clahe_tile_grid}")
        if self.clahe_bits not in (8, 16):
            raise ValueError(f"clahe_bits must be 8 or 16, got {self.clahe_bits}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(v) != self.channels:
                    raise ValueError(f"{name} has {len(v)} values for {self.channels} channel(s)")
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if not min(np.atleast_1d(self.std)) > 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    @classmethod
    def for_detector(cls, input_size: int = 512, **kw) -> "PreprocessParams":
        """YOLOv8 input: 3 channels (grey repeated), [0, 1], no mean/std (as ultralytics trains)."""
        return cls(input_size=input_size, channels=3, mean=0.0, std=1.0, **kw)

    @classmethod
    def for_classifier(cls, input_size: int = 384, **kw) -> "PreprocessParams":
        """timm classifier input: 1 channel, centred (mean 0.5, std 0.25)."""
        return cls(input_size=input_size, channels=1, mean=0.5, std=0.25, **kw)

    def with_(self, **changes) -> "PreprocessParams":
        return PreprocessParams.from_dict({**self.to_dict(), **changes})

    def same_clahe(self, other: "PreprocessParams") -> bool:
        """True when both give the same :func:`apply_clahe` output (intensity normalisation and CLAHE)."""
        keys = ("intensity", "clahe_clip_limit", "clahe_tile_grid", "clahe_bits")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mean", "std"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessParams":
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; known: {sorted(known)}")

        def conv(k: str, v: Any) -> Any:
            if k in ("intensity", "resize"):
                return str(v)
            if k in ("mean", "std") and isinstance(v, (list, tuple)):
                return tuple(float(x) for x in v)
            return int(v) if k in ("clahe_tile_grid", "clahe_bits", "input_size", "channels") else float(v)

        return cls(**{k: conv(k, v) for k, v in data.items()})


def check_image(img: np.ndarray, what: str = "image") -> np.ndarray:
    """Return ``img`` as contiguous float32 HxW, clipped to [0, 1]; refuse anything else."""
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D greyscale array (rows, columns); got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"{what} is too small: shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be floating point in [0, 1]; got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0))


def normalise_intensity(img01: np.ndarray) -> np.ndarray:
    """Exact histogram equalisation: each pixel -> its rank among the image's pixels, in [0, 1].

    Pixels are ordered by grey level (on ``RANK_LEVELS`` levels), ties broken by the mean of their 3 x 3
    neighbourhood (exact histogram specification, Coltuc, Bolon and Chassery, IEEE TIP 2006); pixels equal in
    both share their mid-rank, so flat areas stay flat. Each grey level keeps its plain mid-rank on average and
    the order of the levels decides the rest, so a monotone re-mapping of the input (window, gamma, brightness)
    can only reorder pixels inside one level (by their neighbourhoods). The tie-break matters for bit depth:
    an 8-bit image has only 256 levels, and plain rank equalisation of it leaves gaps in the histogram that
    CLAHE then treats differently from the same picture stored with 12 bits.
    """
    img = check_image(img01)
    top = RANK_LEVELS - 1
    level = np.rint(img * top).astype(np.int64)
    local = np.rint(cv2.blur(img, (3, 3), borderType=cv2.BORDER_REFLECT) * top).astype(np.int64)
    key = (level << 16) | local
    _, group, counts = np.unique(key.ravel(), return_inverse=True, return_counts=True)
    mid = (np.cumsum(counts) - counts / 2.0) / key.size
    return mid[group.reshape(-1)].astype(np.float32).reshape(img.shape)


def apply_clahe(img01: np.ndarray, params: PreprocessParams | None = None) -> np.ndarray:
    """Intensity normalisation (``params.intensity``), then CLAHE, of a [0, 1] float image; returns
    float32 [0, 1] of the same shape."""
    p = params or PreprocessParams()
    img = check_image(img01)
    if p.intensity == "rank":
        img = normalise_intensity(img)
    if p.clahe_clip_limit == 0:
        return img.copy()
    top = 255 if p.clahe_bits == 8 else 65535
    q = np.rint(img * top).astype(np.uint8 if p.clahe_bits == 8 else np.uint16)
    clahe = cv2.createCLAHE(clipLimit=float(p.clahe_clip_limit), tileGridSize=(p.clahe_tile_grid, p.clahe_tile_grid))
    return clahe.apply(q).astype(np.float32) / np.float32(top)


def normalise(
    img: np.ndarray, mean: float | tuple[float, ...] = 0.0, std: float | tuple[float, ...] = 1.0
) -> np.ndarray:
    """``(img - mean) / std`` as float32; per-channel values apply along the first axis of a C x H x W array."""
    arr = np.asarray(img, dtype=np.float32)
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    if m.ndim:
        m, s = m.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
    return ((arr - m) / s).astype(np.float32)


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox: source (rows, cols) -> square input of side ``size``.

    ``x_in = x_src * scale_x + pad_x`` and ``y_in = y_src * scale_y + pad_y``. ``scale_x`` and
    ``scale_y`` are the exact ratios of the resized to the source extent (they differ from
    ``size / max(h, w)`` only by rounding of the resized extent to whole pixels).
    """

    src_shape: tuple[int, int]  # (rows, cols) of the source image
    size: int  # side of the square model input
    scale_x: float
    scale_y: float
    pad_x: int  # columns of padding on the left
    pad_y: int  # rows of padding on top

    @property
    def resized_shape(self) -> tuple[int, int]:
        h, w = self.src_shape
        return max(1, round(h * self.scale_y)), max(1, round(w * self.scale_x))

    def to_input(self, boxes_xyxy) -> np.ndarray:
        """Source-pixel boxes (N, 4) -> model-input pixels (not clipped)."""
        b = _as_boxes(boxes_xyxy)
        out = np.empty_like(b)
        out[:, [0, 2]] = b[:, [0, 2]] * self.scale_x + self.pad_x
        out[:, [1, 3]] = b[:, [1, 3]] * self.scale_y + self.pad_y
        return out

    def to_source(self, boxes_xyxy, clip: bool = True) -> np.ndarray:
        """Model-input boxes (N, 4) -> source pixels, clipped to the source image by default."""
        b = _as_boxes(boxes_xyxy)
        out = np.empty_like(b)
        out[:, [0, 2]] = (b[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (b[:, [1, 3]] - self.pad_y) / self.scale_y
        if clip:
            h, w = self.src_shape
            out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
            out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _as_boxes(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim == 1:
        b = b.reshape(1, -1)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x_min, y_min, x_max, y_max; got {b.shape}")
    return b


def letterbox(img: np.ndarray, size: int, pad_value: float = PAD_VALUE) -> tuple[np.ndarray, Letterbox]:
    """Resize so the longer side is ``size`` (aspect kept), centre on a ``size`` square.

    Works on HxW or HxWxC arrays of any dtype; the padding is ``pad_value`` (give 114 for uint8).
    INTER_AREA when shrinking, INTER_LINEAR when enlarging (as ultralytics' loader does).
    """
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"cannot letterbox an empty image of shape {arr.shape}")
    gain = size / max(h, w)
    new_h, new_w = max(1, round(h * gain)), max(1, round(w * gain))
    if (new_h, new_w) != (h, w):
        interp = cv2.INTER_AREA if gain < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(arr, (new_w, new_h), interpolation=interp)
    else:
        resized = arr
    pad_y, pad_x = (size - new_h) // 2, (size - new_w) // 2
    out = np.full((size, size) + arr.shape[2:], pad_value, dtype=arr.dtype)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized.reshape((new_h, new_w) + arr.shape[2:])
    geom = Letterbox(
        src_shape=(int(h), int(w)),
        size=int(size),
        scale_x=new_w / w,
        scale_y=new_h / h,
        pad_x=int(pad_x),
        pad_y=int(pad_y),
    )
    return out, geom


def working_image(img01: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink (INTER_AREA, aspect kept) so the longer side is at most ``max_side``; return the image and the
    factors ``(fx, fy)`` that map its x/y coordinates back to the given image. Smaller images are unchanged.

    The pipeline does CLAHE at this working size: the models were trained on images of about their input
    size (CLAHE'd at that size), and CLAHE on a 2k radiograph costs 10x more for nothing the models can see."""
    img = np.asarray(img01)
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img, (1.0, 1.0)
    gain = max_side / max(h, w)
    new_w, new_h = max(1, round(w * gain)), max(1, round(h * gain))
    small = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, (w / new_w, h / new_h)


def stretch(img: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize straight to ``size`` x ``size`` (aspect not kept, as torchvision's ``Resize((S, S))``); the
    returned geometry maps boxes back like a letterbox without padding."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(arr, (size, size), interpolation=interp) if (h, w) != (size, size) else arr
    return out, Letterbox((int(h), int(w)), int(size), size / w, size / h, 0, 0)


def to_model_input(clahe01: np.ndarray, params: PreprocessParams) -> tuple[np.ndarray, Letterbox]:
    """An already CLAHE'd [0, 1] image -> (C x S x S float32, Letterbox). No CLAHE here."""
    img = check_image(clahe01)
    if params.resize == "stretch":
        boxed, geom = stretch(img, params.input_size)
    else:
        boxed, geom = letterbox(img, params.input_size, params.pad_value)
    x = np.repeat(boxed[None], params.channels, axis=0)
    return np.ascontiguousarray(normalise(x, params.mean, params.std)), geom


def prepare(
    img01: np.ndarray, params: PreprocessParams, working_size: int | None = None
) -> tuple[np.ndarray, Letterbox]:
    """Raw [0, 1] image -> CLAHE -> (C x S x S float32 model input, Letterbox). With ``working_size``, the image is
    first shrunk to it, as the pipeline does (:func:`working_image`); the Letterbox then maps to the shrunk image."""
    if working_size is not None:
        img01, _ = working_image(img01, working_size)
    return to_model_input(apply_clahe(img01, params), params)


def export_scale(shape: tuple[int, int], max_size: int | None) -> float:
    """Factor by which ``export_image(..., max_size)`` scales coordinates (1.0 = unchanged)."""
    h, w = shape[:2]
    if not max_size or max(h, w) <= max_size:
        return 1.0
    return max_size / max(h, w)


def export_image(img01: np.ndarray, params: PreprocessParams | None = None, max_size: int | None = None) -> np.ndarray:
    """CLAHE'd uint8 HxW image for writing PNG/JPEG training files (``cv2.imwrite``).

    With ``max_size`` the longer side is shrunk to at most that (aspect kept, no padding); scale
    box coordinates by ``export_scale(img01.shape, max_size)`` (per axis the rounding error is
    below one pixel).
    """
    out = apply_clahe(img01, params)
    h, w = out.shape
    s = export_scale((h, w), max_size)
    if s != 1.0:
        out = cv2.resize(out, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
