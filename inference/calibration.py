"""Site calibration: the classifier's operating point chosen on a hospital's own labelled films.

Every site validates before go-live. ``dicom-node calibrate`` runs the classifier on a local labelled set
and, per view (PA, AP, ...), picks the highest decision threshold that still reaches the target sensitivity;
the thresholds go into a calibration file (JSON) that ``config.yaml`` names
(``inference.models.calibration``). The model file is left alone.

At inference the classifier then maps the threshold of the image's view (``ViewPosition``; the ``default``
threshold when the view is missing or was not calibrated) to P(abnormal) = 0.5, exactly as it does with the
threshold stored in the model file: the ranking does not change, the operating point does. Thresholds are
on the model's raw probability scale. Choosing them: :func:`choose_calibration` (``calibrate`` on labelled
files, ``validate`` on the node's own results with site ground truth).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from inference.errors import ModelError
from inference.statistics import binary_metrics

__all__ = ["Calibration", "FORMAT", "MIN_PER_CLASS", "choose_calibration"]

FORMAT = "dicom-node/calibration/1"


@dataclass(frozen=True)
class Calibration:
    default: float  # raw-probability threshold for images whose view has none of its own
    per_view: dict[str, float] = field(default_factory=dict)  # "PA" / "AP" / ... -> threshold
    target_sensitivity: float = 0.9
    model_sha256: str = ""  # the classifier the thresholds were chosen for
    data: str = ""  # what they were chosen on
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict = field(default_factory=dict)  # sensitivity/specificity with CIs, overall and per view

    def __post_init__(self) -> None:
        for name, t in {"default": self.default, **self.per_view}.items():
            if not 0.0 < float(t) < 1.0:
                raise ModelError(f"calibration threshold {name} = {t} must lie strictly between 0 and 1")

    def threshold(self, view: str | None) -> float:
        return float(self.per_view.get((view or "").strip().upper(), self.default))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"calibration file {path} not found") from exc
        except (OSError, ValueError) as exc:
            raise ModelError(f"calibration file {path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ModelError(f"{path} is not a dicom-node calibration file (format {FORMAT!r} expected)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"calibration file {path}: {exc}") from exc


MIN_PER_CLASS = 10  # a view needs at least this many normal and abnormal images for its own threshold


def _threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """A threshold t with sensitivity (p >= t among positives) >= target, as high as that allows: midway between
    the k-th highest abnormal score and the next lower score of any image, so that no image of the set lies
    on the threshold (where float noise between machines could flip it)."""
    pos = np.sort(p[y == 1])[::-1]
    k = max(1, int(np.ceil(target * len(pos))))
    kth = pos[k - 1]
    below = p[p < kth]
    t = (kth + below.max()) / 2 if len(below) else kth / 2
    return float(min(max(t, 1e-6), 1 - 1e-6))


def choose_calibration(
    labels, raw_probs, views, target_sensitivity: float, model_sha256: str = "", data: str = ""
) -> Calibration:
    """Per-view thresholds reaching ``target_sensitivity`` on this set (views with fewer than MIN_PER_CLASS
    normal or abnormal images use the overall one), with the resulting metrics and their 95 % CIs."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(raw_probs, dtype=np.float64)
    v = np.asarray([(x or "").strip().upper() for x in views])
    if not 0.0 < target_sensitivity < 1.0:
        raise ModelError(f"target sensitivity must lie between 0 and 1, got {target_sensitivity}")
    if (y == 1).sum() < 1 or (y == 0).sum() < 1:
        raise ModelError("calibration needs normal and abnormal images")
    default = _threshold_for_sensitivity(y, p, target_sensitivity)
    per_view: dict[str, float] = {}
    for view in sorted(set(v) - {""}):
        m = v == view
        if (y[m] == 1).sum() >= MIN_PER_CLASS and (y[m] == 0).sum() >= MIN_PER_CLASS:
            per_view[view] = _threshold_for_sensitivity(y[m], p[m], target_sensitivity)
    thr = np.asarray([per_view.get(x, default) for x in v])
    decided = (p >= thr).astype(float)  # binary_metrics at 0.5 of the per-image decision
    metrics = {"overall": binary_metrics(y, decided, 0.5)}
    for view in sorted(set(v)):
        m = v == view
        metrics[view or "unknown"] = {
            **binary_metrics(y[m], decided[m], 0.5),
            "threshold": per_view.get(view, default),
            "own_threshold": view in per_view,
        }
    for entry in metrics.values():  # the AUC of 0/1 decisions means nothing here
        entry.pop("roc_auc", None)
        entry.pop("roc_auc_ci95", None)
    return Calibration(default, per_view, target_sensitivity, model_sha256, data, metrics=_plain(metrics))


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON
    return obj
