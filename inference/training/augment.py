"""Training augmentations against the differences between sites, archives and acquisition.

Two stages, both on float32 images in [0, 1], both seeded by the caller's ``numpy`` Generator:

``site_augment(img, rng, cfg)`` works on the raw image, before intensity normalisation and CLAHE, because
that is where sites differ: crop jitter (collimation, field of view), down-up resampling (detector pixel
size, archive downscaling), blur and unsharp masking (detector MTF, vendor edge enhancement), noise (dose),
JPEG re-compression (archives and PACS exports), gamma, brightness/contrast and random windowing (LUTs),
and burnt-in text markers ("AP PORTABLE", "L", "R", ...) drawn on normal and abnormal images alike, so a
marker says nothing about the label.

``geometry_augment(img, rng, cfg, pad_value)`` works on the letterboxed model input: rotation, scale and
translation (letterbox jitter), with the letterbox grey as the fill.

Every augmentation has its own probability; ``AugmentConfig.none()`` turns them all off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import cv2
import numpy as np

__all__ = ["AugmentConfig", "site_augment", "geometry_augment", "MARKERS"]

MARKERS = ("AP PORTABLE", "PORTABLE", "SUPINE", "ERECT", "AP", "PA", "L", "R")


@dataclass(frozen=True)
class AugmentConfig:
    p_crop: float = 0.5
    crop_min: float = 0.85  # kept share of each side
    p_resample: float = 0.3
    resample_scale: tuple[float, float] = (0.35, 0.8)
    p_blur: float = 0.25
    blur_sigma: tuple[float, float] = (0.4, 1.6)  # in pixels of a 512 px image
    p_sharpen: float = 0.25
    sharpen_amount: tuple[float, float] = (0.3, 1.5)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (0.003, 0.03)
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)
    p_gamma: float = 0.6
    gamma: tuple[float, float] = (0.6, 1.6)  # log-uniform
    p_contrast: float = 0.6
    brightness: float = 0.15
    contrast: float = 0.3
    p_window: float = 0.3
    window_clip: float = 0.08  # up to this quantile clipped at each end
    p_marker: float = 0.3
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06  # share of the side

    @classmethod
    def none(cls) -> "AugmentConfig":
        probs: dict[str, Any] = {k: 0.0 for k in asdict(cls()) if k.startswith("p_")}
        return replace(cls(), rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, **probs)

    def to_dict(self) -> dict:
        return asdict(self)


def _u(rng: np.random.Generator, lo_hi) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def crop_jitter(img: np.ndarray, rng: np.random.Generator, keep_min: float) -> np.ndarray:
    h, w = img.shape
    kh, kw = int(round(h * rng.uniform(keep_min, 1.0))), int(round(w * rng.uniform(keep_min, 1.0)))
    y, x = int(rng.integers(0, h - kh + 1)), int(rng.integers(0, w - kw + 1))
    return img[y : y + kh, x : x + kw]


def resample(img: np.ndarray, factor: float) -> np.ndarray:
    """Down to ``factor`` of the size (area), back up (linear): the detail a coarser detector loses."""
    h, w = img.shape
    small = cv2.resize(img, (max(8, round(w * factor)), max(8, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)


def unsharp(img: np.ndarray, amount: float, sigma: float = 2.0) -> np.ndarray:
    return np.clip(img + amount * (img - cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)), 0.0, 1.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.rint(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    if out is None:  # OpenCV encodes and decodes any uint8 image; keep the input if it ever does not
        return img
    return out.astype(np.float32) / np.float32(255)


def window(img: np.ndarray, lo_q: float, hi_q: float) -> np.ndarray:
    """A window from quantile ``lo_q`` to ``hi_q``: values outside are clipped, the inside stretched."""
    lo, hi = np.quantile(img, [lo_q, hi_q])
    if hi - lo < 1e-6:
        return img
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def draw_marker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A burnt-in text marker in a random corner region, bright (as lead markers and annotations are)."""
    h, w = img.shape
    text = MARKERS[int(rng.integers(len(MARKERS)))]
    scale = float(rng.uniform(0.6, 1.6)) * max(h, w) / 512
    thick = max(1, int(round(scale * rng.uniform(1.5, 3.0))))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = int(rng.uniform(0.02, 0.2) * w) if rng.random() < 0.5 else max(0, int(w - tw - rng.uniform(0.02, 0.2) * w))
    y = int(th + rng.uniform(0.02, 0.15) * h) if rng.random() < 0.5 else int(h - rng.uniform(0.02, 0.15) * h)
    mask = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(mask, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    a = mask.astype(np.float32) / np.float32(255)
    return (img * (1 - a) + np.float32(rng.uniform(0.85, 1.0)) * a).astype(np.float32)


def site_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Raw [0, 1] image -> a plausible image of the same chest from another site/archive (float32 [0, 1])."""
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < cfg.p_crop:
        out = crop_jitter(out, rng, cfg.crop_min)
    if rng.random() < cfg.p_resample:
        out = resample(out, _u(rng, cfg.resample_scale))
    if rng.random() < cfg.p_blur:
        out = blur(out, _u(rng, cfg.blur_sigma) * max(out.shape) / 512)
    elif rng.random() < cfg.p_sharpen:
        out = unsharp(out, _u(rng, cfg.sharpen_amount), 2.0 * max(out.shape) / 512)
    if rng.random() < cfg.p_gamma:
        out = out ** np.float32(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
    if rng.random() < cfg.p_contrast:
        c = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
        b = float(rng.uniform(-cfg.brightness, cfg.brightness))
        out = np.clip((out - 0.5) * c + 0.5 + b, 0.0, 1.0)
    if rng.random() < cfg.p_window:
        out = window(out, float(rng.uniform(0, cfg.window_clip)), 1.0 - float(rng.uniform(0, cfg.window_clip)))
    if rng.random() < cfg.p_marker:
        out = draw_marker(out, rng)
    if rng.random() < cfg.p_noise:
        out = np.clip(out + rng.normal(0.0, _u(rng, cfg.noise_sigma), out.shape).astype(np.float32), 0.0, 1.0)
    if rng.random() < cfg.p_jpeg:
        out = jpeg(out, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return np.ascontiguousarray(out, dtype=np.float32)


def geometry_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, pad_value: float) -> np.ndarray:
    """Rotation, scale and shift of a square model input; the uncovered area gets ``pad_value``."""
    s = img.shape[0]
    angle = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)) if cfg.rotation_deg else 0.0
    scale = _u(rng, cfg.scale)
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    m[:, 2] += rng.uniform(-cfg.translate, cfg.translate, 2) * s
    if angle == 0.0 and scale == 1.0 and not m[:, 2].any():
        return img
    return cv2.warpAffine(
        img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float(pad_value)
    )
