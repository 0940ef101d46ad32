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
below ``min_score`` are dropped, the rest are sorted by score and cut to ``max_findings``, and::

    p_no_finding = 1 - max(p_abnormal, strongest kept finding's score)

so a reported finding always lowers "no finding" to at most ``1 - its score``; with no kept
findings it is ``1 - p_abnormal``. It is always reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inference.types import FINDING_CLASSES, Finding

__all__ = ["FusionParams", "FUSION_MODES", "detector_needed", "fuse", "fused_scores"]

FUSION_MODES = ("gate", "soft")


@dataclass(frozen=True)
class FusionParams:
    mode: str = "soft"
    abnormal_threshold: float = 0.5
    min_score: float = 0.25
    detector_conf: float = 0.05
    max_findings: int = 20

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {self.mode!r}")
        for name in ("abnormal_threshold", "min_score", "detector_conf"):
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
        names = ("mode", "abnormal_threshold", "min_score", "detector_conf", "max_findings")
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
        idx = idx[np.argsort(-fused[idx], kind="stable")][: params.max_findings]
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
