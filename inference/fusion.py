"""Fusing the classifier's P(abnormal) with the detector's boxes into findings.

Two modes (``FusionParams.mode``):

``gate``  (the original design)
    The detector runs only when ``p_abnormal >= abnormal_threshold``. Below it the result is
    "no finding" with no boxes. Above it each box keeps its detector confidence as its score.

``soft``  (default)
    The detector always runs. Each box's fused score is the geometric mean of the detector
    confidence and P(abnormal)::

        score = sqrt(detector_score * p_abnormal)

    A confident box on an image the classifier calls normal is damped but not erased
    (0.81 * 0.25 -> 0.45), a weak box on a clearly abnormal image is lifted a little
    (0.2 * 0.95 -> 0.44). The plain product was rejected because it double-counts two
    uncalibrated probabilities and pushes almost everything below ``min_score``.

In both modes boxes whose detector confidence is below ``detector_conf`` or whose fused score is
below ``min_score`` are dropped, the rest are sorted by score, **one finding is one box**: a box of the same
class as a stronger kept box is dropped when they overlap by IoU > ``same_class_iou`` or when it lies mostly
(``same_class_containment`` of its area) inside or around it (the detector's own NMS, at IoU 0.7, lets 2-3
stacked boxes on one heart through), and the rest is cut to ``max_findings``, and::

    p_no_finding = 1 - max(p_abnormal, strongest kept finding's score)

so a reported finding always lowers "no finding" to at most ``1 - its score``; with no kept
findings it is ``1 - p_abnormal``. It is always reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inference.types import FINDING_CLASSES, Finding

__all__ = ["FusionParams", "FUSION_MODES", "detector_needed", "fuse", "fused_scores", "suppress_same_class"]

FUSION_MODES = ("gate", "soft")


@dataclass(frozen=True)
class FusionParams:
    mode: str = "soft"
    abnormal_threshold: float = 0.5
    min_score: float = 0.25
    detector_conf: float = 0.05
    max_findings: int = 20
    same_class_iou: float = 0.5
    same_class_containment: float = 0.8

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {self.mode!r}")
        for name in ("abnormal_threshold", "min_score", "detector_conf", "same_class_iou", "same_class_containment"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"fusion {name} must be in [0, 1], got {v}")
        if self.max_findings < 1:
            raise ValueError(f"fusion max_findings must be >= 1, got {self.max_findings}")

    @classmethod
    def from_obj(cls, obj: Any) -> "FusionParams":
        """From a mapping or any object with these attributes (e.g. the node's FusionConfig)."""
        if obj is None:
            return cls()
        if isinstance(obj, FusionParams):
            return obj
        names = (
            "mode",
            "abnormal_threshold",
            "min_score",
            "detector_conf",
            "max_findings",
            "same_class_iou",
            "same_class_containment",
        )
        if isinstance(obj, dict):
            return cls(**{k: obj[k] for k in names if k in obj})
        return cls(**{k: getattr(obj, k) for k in names if hasattr(obj, k)})

    def to_dict(self) -> dict:
        return asdict(self)


def detector_needed(p_abnormal: float, params: FusionParams) -> bool:
    return params.mode == "soft" or p_abnormal >= params.abnormal_threshold


def fused_scores(detector_scores: np.ndarray, p_abnormal: float, mode: str) -> np.ndarray:
    s = np.clip(np.asarray(detector_scores, dtype=np.float64), 0.0, 1.0)
    if mode == "soft":
        return np.sqrt(s * float(np.clip(p_abnormal, 0.0, 1.0)))
    return s


def suppress_same_class(
    boxes: np.ndarray, class_ids: np.ndarray, order: np.ndarray, iou: float, containment: float
) -> list[int]:
    """Greedy same-class suppression over ``order`` (indices, strongest first): returns the kept indices.

    A box is dropped when a kept box of its class overlaps it by IoU > ``iou``, or when their intersection is
    more than ``containment`` of the smaller box (one box nested in the other: IoU can be small then)."""
    kept: list[int] = []
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    for i in order:
        duplicate = False
        for k in kept:
            if class_ids[k] != class_ids[i]:
                continue
            w = min(boxes[i, 2], boxes[k, 2]) - max(boxes[i, 0], boxes[k, 0])
            h = min(boxes[i, 3], boxes[k, 3]) - max(boxes[i, 1], boxes[k, 1])
            inter = max(w, 0.0) * max(h, 0.0)
            union = areas[i] + areas[k] - inter
            smaller = min(areas[i], areas[k])
            if (union > 0 and inter / union > iou) or (smaller > 0 and inter / smaller > containment):
                duplicate = True
                break
        if not duplicate:
            kept.append(int(i))
    return kept


def fuse(
    p_abnormal: float,
    boxes: np.ndarray | None,
    scores: np.ndarray | None,
    class_ids: np.ndarray | None,
    params: FusionParams,
) -> tuple[tuple[Finding, ...], float]:
    """-> (findings sorted by fused score, p_no_finding). ``boxes`` None = detector not run."""
    p = float(np.clip(p_abnormal, 0.0, 1.0))
    findings: list[Finding] = []
    if boxes is not None and detector_needed(p, params) and len(boxes):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        det = np.asarray(scores, dtype=np.float64).reshape(-1)
        cls = np.asarray(class_ids).reshape(-1).astype(np.int64)
        fused = fused_scores(det, p, params.mode)
        keep = (det >= params.detector_conf) & (fused >= params.min_score) & (cls >= 0) & (cls < len(FINDING_CLASSES))
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(-fused[idx], kind="stable")]
        idx = np.asarray(
            suppress_same_class(boxes, cls, idx, params.same_class_iou, params.same_class_containment), dtype=np.int64
        )[: params.max_findings]
        for i in idx:
            c = int(cls[i])
            x1, y1, x2, y2 = (float(v) for v in boxes[i])  # boxes is N x 4 (reshaped above)
            findings.append(
                Finding(
                    class_id=c,
                    label=FINDING_CLASSES[c],
                    score=float(fused[i]),
                    box=(x1, y1, x2, y2),
                    detector_score=float(det[i]),
                )
            )
    strongest = max((f.score for f in findings), default=0.0)
    return tuple(findings), 1.0 - max(p, strongest)
