"""Choosing a site calibration (``dicom-node calibrate``): per-view thresholds for a target sensitivity."""

from __future__ import annotations

import math

import numpy as np

from inference.calibration import Calibration
from inference.errors import ModelError
from inference.training.metrics import binary_metrics

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
