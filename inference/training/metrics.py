"""Detection and classification metrics (numpy only).

Detection: the VinBigData competition metric is PASCAL VOC 2010 mAP at IoU > 0.4:

- per class, all predictions of all images sorted by score (descending, stable); each one is
  matched, as in the VOC devkit, to the ground-truth box of its image and class it overlaps most;
  it is a true positive when that IoU exceeds the threshold (strictly, "IoU > 0.4") and that box
  was not matched before, otherwise a false positive (duplicates are false positives);
- AP = area under the precision envelope (precision made monotonically decreasing from the right)
  over ALL recall points (VOC 2010+, not the 11-point VOC 2007 rule: :func:`voc_ap_11point`);
- "No finding" is class 14: an image without findings has the ground truth box ``[0, 0, 1, 1]``,
  and every image gets a predicted ``[0, 0, 1, 1]`` class-14 box with score ``p_no_finding``
  (:func:`add_no_finding`);
- mAP = mean AP over the classes that have ground truth in the evaluated set.

IoU is on continuous coordinates (no VOC "+1" pixel). ``map_range`` gives mAP50 and mAP50-95 with
the same matching and AP, at IoU >= t for t in 0.50:0.05:0.95 (COCO's thresholds, averaged).

Data shapes: ``gts = {image_id: [(class_id, (x0, y0, x1, y1)), ...]}`` and
``preds = {image_id: [(class_id, score, (x0, y0, x1, y1)), ...]}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The classification statistics live in inference.statistics (the running node's site validation uses them too);
# they keep their names here.
from inference.statistics import Z_95 as Z_95
from inference.statistics import auc_interval as auc_interval
from inference.statistics import binary_metrics as binary_metrics
from inference.statistics import roc_auc as roc_auc
from inference.statistics import roc_curve as roc_curve
from inference.statistics import wilson_interval as wilson_interval
from inference.types import FINDING_CLASSES, NO_FINDING, NO_FINDING_ID

NO_FINDING_BOX = (0.0, 0.0, 1.0, 1.0)
ALL_CLASSES: tuple[str, ...] = tuple(FINDING_CLASSES) + (NO_FINDING,)
COCO_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

GroundTruth = dict[str, list[tuple[int, tuple]]]
Predictions = dict[str, list[tuple[int, float, tuple]]]


# ----------------------------------------------------------------------------- boxes / AP


def iou_matrix(a, b) -> np.ndarray:
    """IoU of (N, 4) boxes against (M, 4) boxes, continuous coordinates -> (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def voc_ap(recall, precision) -> float:
    """VOC 2010+ AP: area under the monotone precision envelope over all recall points."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_ap_11point(recall, precision) -> float:
    """VOC 2007 AP: mean of the best precision at recall >= 0, 0.1, ..., 1.0 (for comparison only)."""
    rec, prec = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    return float(np.mean([prec[rec >= t].max() if np.any(rec >= t) else 0.0 for t in np.linspace(0, 1, 11)]))


@dataclass
class ClassAP:
    ap: float  # nan when the class has no ground truth
    n_gt: int
    n_pred: int
    recall: np.ndarray  # after each prediction, in score order
    precision: np.ndarray
    scores: np.ndarray  # sorted descending
    tp: np.ndarray  # bool per sorted prediction


def class_ap(
    gt_boxes: dict[str, list[tuple]],
    preds: list[tuple[str, float, tuple]],
    iou_thr: float,
    strict: bool = True,
    interpolation: str = "voc2010",
) -> ClassAP:
    """AP of one class. ``gt_boxes``: image -> boxes; ``preds``: (image, score, box) triples."""
    n_gt = sum(len(v) for v in gt_boxes.values())
    order = np.argsort(-np.asarray([p[1] for p in preds], dtype=np.float64), kind="stable")
    gts = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in gt_boxes.items()}
    used = {k: np.zeros(len(v), dtype=bool) for k, v in gts.items()}
    tp = np.zeros(len(preds), dtype=bool)
    for rank, j in enumerate(order):
        image, _, box = preds[j]
        g = gts.get(image)
        if g is None or not len(g):
            continue
        ious = iou_matrix([box], g)[0]
        k = int(np.argmax(ious))
        ok = ious[k] > iou_thr if strict else ious[k] >= iou_thr
        if ok and not used[image][k]:
            tp[rank] = used[image][k] = True
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / n_gt if n_gt else np.zeros(len(preds))
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if not n_gt:
        ap = float("nan")
    elif interpolation == "voc2010":
        ap = voc_ap(recall, precision)
    elif interpolation == "voc2007":
        ap = voc_ap_11point(recall, precision)
    else:
        raise ValueError(f"interpolation must be 'voc2010' or 'voc2007', got {interpolation!r}")
    scores = np.asarray([preds[j][1] for j in order], dtype=np.float64)
    return ClassAP(ap, n_gt, len(preds), recall, precision, scores, tp)


def add_no_finding(
    gts: GroundTruth, preds: Predictions, p_no_finding: dict[str, float]
) -> tuple[GroundTruth, Predictions]:
    """Competition convention: class 14 with box [0, 0, 1, 1] (see the module docstring)."""
    g2 = {
        k: list(v) + ([] if any(c != NO_FINDING_ID for c, _ in v) else [(NO_FINDING_ID, NO_FINDING_BOX)])
        for k, v in gts.items()
    }
    p2 = {k: [p for p in v if p[0] != NO_FINDING_ID] for k, v in preds.items()}
    for k, p in p_no_finding.items():
        p2.setdefault(k, []).append((NO_FINDING_ID, float(p), NO_FINDING_BOX))
    return g2, p2


def _by_class(
    gts: GroundTruth, preds: Predictions, class_id: int
) -> tuple[dict[str, list[tuple]], list[tuple[str, float, tuple]]]:
    g = {k: [b for c, b in v if c == class_id] for k, v in gts.items()}
    p = [(k, s, b) for k, v in preds.items() if k in gts for c, s, b in v if c == class_id]
    return g, p


def detection_map(
    gts: GroundTruth,
    preds: Predictions,
    iou_thr: float = 0.4,
    strict: bool = True,
    interpolation: str = "voc2010",
    classes: range | None = None,
) -> dict:
    """mAP and per-class AP. Predictions for images not in ``gts`` are ignored."""
    classes = classes if classes is not None else range(len(ALL_CLASSES))
    per: dict[int, ClassAP] = {
        c: class_ap(*_by_class(gts, preds, c), iou_thr=iou_thr, strict=strict, interpolation=interpolation)
        for c in classes
    }
    aps = [r.ap for r in per.values() if r.n_gt]
    return {
        "map": float(np.mean(aps)) if aps else float("nan"),
        "per_class": per,
        "iou_thr": iou_thr,
        "strict": strict,
        "interpolation": interpolation,
    }


def map_range(gts: GroundTruth, preds: Predictions, thresholds=COCO_THRESHOLDS, classes: range | None = None) -> dict:
    """mAP at each IoU threshold (IoU >= t) and their mean: ``{"map50", "map50_95", "by_thr"}``."""
    by_thr = {t: detection_map(gts, preds, t, strict=False, classes=classes)["map"] for t in thresholds}
    vals = [v for v in by_thr.values() if v == v]
    return {
        "map50": by_thr.get(0.5, float("nan")),
        "map50_95": float(np.mean(vals)) if vals else float("nan"),
        "by_thr": by_thr,
    }


def map_interval(
    gts: GroundTruth,
    preds: Predictions,
    groups: dict[str, str],
    iou_thr: float = 0.4,
    classes: range | None = None,
    reps: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval of :func:`detection_map` under a bootstrap that resamples ``groups`` (image id
    -> patient id) with replacement, so a patient's films stay together. Replicates whose mAP is undefined (no
    ground-truth box drawn) are left out."""
    by_group: dict[str, list[str]] = {}
    for image_id in gts:
        by_group.setdefault(groups.get(image_id, image_id), []).append(image_id)
    keys = sorted(by_group)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        g: dict = {}
        p: dict = {}
        for n, k in enumerate(rng.integers(0, len(keys), len(keys))):
            for image_id in by_group[keys[k]]:
                g[f"{n}/{image_id}"] = gts[image_id]
                p[f"{n}/{image_id}"] = preds.get(image_id, [])
        v = detection_map(g, p, iou_thr, classes=classes)["map"]
        if v == v:
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- classification


def choose_threshold(y_true, scores, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Decision threshold on validation scores: max Youden's J, or the highest threshold whose
    sensitivity reaches ``target_sensitivity`` (method ``"sensitivity"``)."""
    fpr, tpr, thr = roc_curve(y_true, scores)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if not len(thr):
        return 0.5
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if method == "sensitivity":
        ok = np.where(tpr >= target_sensitivity)[0]
        return float(thr[ok[0]] if len(ok) else thr[-1])
    raise ValueError(f"threshold method must be 'youden' or 'sensitivity', got {method!r}")
