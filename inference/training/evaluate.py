"""Evaluating the two-stage pipeline on a held-out split, in one or more fusion modes.

``evaluate(predictors, samples, out_dir)`` runs each predictor (a callable ``(img01, view) -> Prediction``,
e.g. ``Pipeline(...).run`` built with ``FusionParams(mode="gate")`` and ``mode="soft"``) on every
sample and writes ``OUT/report.json`` and PNG plots (matplotlib, Agg backend):

- ``classifier``: P(abnormal) vs the image label at ``classifier_threshold``: accuracy,
  sensitivity, specificity, ROC AUC, false negatives, confusion matrix, and the same per view;
- per mode: ``map40`` (the VinBigData competition metric: VOC 2010 AP at IoU > 0.4 over the 14
  findings + "No finding" scored with p_no_finding), ``map40_findings`` (the 14 findings only),
  ``map50`` and ``map50_95`` (IoU >= 0.50:0.05:0.95, findings only), per-class AP@0.4, and the
  image-level decision "abnormal = p_no_finding < 0.5" with its metrics, overall and per view;
- ``recommended_fusion_mode``: the mode with the highest ``map40``.

Findings are scored with their fused score. Build the predictors with a low ``min_score`` /
``detector_conf`` (e.g. 0.0 / 0.01) and a high ``max_findings``: AP needs the low-score tail.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from inference.errors import DatasetError
from inference.statistics import classifier_line, format_ci
from inference.training.data.images import load_image01
from inference.training.data.sample import Sample, describe
from inference.training.metrics import (
    ALL_CLASSES,
    add_no_finding,
    binary_metrics,
    detection_map,
    map_interval,
    map_range,
    roc_curve,
)
from inference.types import FINDING_CLASSES, Prediction

log = logging.getLogger(__name__)
Predictor = Callable[[np.ndarray, str | None], Prediction]  # (image, view) -> prediction


def _clean(obj):
    """JSON-safe: nan/inf -> None, numpy -> python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _per_view(samples: list[Sample], scores: np.ndarray, thr: float) -> dict:
    return _per_group(samples, scores, thr, lambda s: s.view or "unknown")


def _per_batch(samples: list[Sample], scores: np.ndarray, thr: float) -> dict:
    return _per_group(samples, scores, thr, lambda s: s.batch or "unknown")


def _per_group(samples: list[Sample], scores: np.ndarray, thr: float, key: Callable[[Sample], str]) -> dict:
    out = {}
    for group in sorted({key(s) for s in samples}):
        idx = [i for i, s in enumerate(samples) if key(s) == group]
        out[group] = binary_metrics([samples[i].label for i in idx], scores[idx], thr)
    return out


def ground_truth(samples: list[Sample]) -> dict:
    return {s.image_id: [(int(c), tuple(map(float, b))) for c, b in zip(s.classes, s.boxes)] for s in samples}


def _mode_report(samples: list[Sample], preds: list[Prediction]) -> tuple[dict, dict]:
    gts = ground_truth(samples)
    dets = {s.image_id: [(f.class_id, f.score, f.box) for f in p.findings] for s, p in zip(samples, preds)}
    g14, p14 = add_no_finding(gts, dets, {s.image_id: p.p_no_finding for s, p in zip(samples, preds)})
    full = detection_map(g14, p14, 0.4)
    findings_only = detection_map(gts, dets, 0.4, classes=range(len(FINDING_CLASSES)))
    coco = map_range(gts, dets, classes=range(len(FINDING_CLASSES)))
    y = np.asarray([s.label for s in samples])
    s_abn = np.asarray([1.0 - p.p_no_finding for p in preds])
    report = {
        "map40": full["map"],
        "map40_findings": findings_only["map"],
        "map40_findings_ci": map_interval(
            gts, dets, {s.image_id: s.patient_id for s in samples}, 0.4, range(len(FINDING_CLASSES)), reps=500
        ),
        "map50": coco["map50"],
        "map50_95": coco["map50_95"],
        "ap40_per_class": {ALL_CLASSES[c]: r.ap for c, r in full["per_class"].items() if r.n_gt},
        "gt_per_class": {ALL_CLASSES[c]: r.n_gt for c, r in full["per_class"].items() if r.n_gt},
        "image_level": binary_metrics(y, s_abn, 0.5),
        "image_level_per_view": _per_view(samples, s_abn, 0.5),
        "findings_per_image": float(np.mean([len(p.findings) for p in preds])) if preds else 0.0,
        "mean_total_s": float(np.mean([p.timings_s.get("total", 0.0) for p in preds])) if preds else 0.0,
    }
    return report, full["per_class"]


def _plots(out: Path, y: np.ndarray, p_abn: np.ndarray, thr: float, curves: dict[str, dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    fpr, tpr, _ = roc_curve(y, p_abn)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label="classifier")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, P(abnormal)")
    fig.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append("roc.png")

    cm = binary_metrics(y, p_abn, thr)["confusion"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(cm), cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center")
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["normal", "abnormal"],
        yticklabels=["normal", "abnormal"],
        xlabel="predicted",
        ylabel="true",
        title=f"classifier @ {thr:.3f}",
    )
    fig.savefig(out / "confusion_matrix.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append("confusion_matrix.png")

    for mode, per_class in curves.items():
        fig, ax = plt.subplots(figsize=(7, 5))
        for c, r in per_class.items():
            if r.n_gt:
                rec = np.concatenate(([0.0], r.recall))
                prec = np.concatenate(([1.0], r.precision))
                ax.plot(rec, prec, label=f"{ALL_CLASSES[c]} {r.ap:.3f}")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"PR @ IoU>0.4, {mode}")
        ax.legend(fontsize=7, loc="upper right")
        name = f"pr_curves_{mode}.png"
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written


def evaluate(
    predictors: Mapping[str, Predictor],
    samples: list[Sample],
    out_dir: str | Path,
    classifier_threshold: float = 0.5,
    description: str = "",
    load: Callable[[Path], tuple[np.ndarray, str | None]] = lambda path: (load_image01(path), None),
) -> dict:
    """Run, score, write ``report.json`` + plots; return the report dict (see module docstring).

    ``load`` reads an image file as (float32 [0, 1], its header's view or None); the DICOM side passes one that
    reads DICOM too; DatasetError = unreadable. Images the
    pipeline finds not analysable are counted (``not_analysable``) and left out of every metric."""
    from tqdm.auto import tqdm

    if not predictors:
        raise ValueError("evaluate needs at least one predictor")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(s.clahe_applied for s in samples):
        log.warning(
            "some evaluation images were exported CLAHE'd; the pipeline applies CLAHE again "
            "(export with clahe=False for evaluation)"
        )
    preds: dict[str, list[Prediction]] = {m: [] for m in predictors}
    for s in tqdm(samples, desc="evaluate", unit="img"):
        try:
            img, header_view = load(s.path)
        except DatasetError as exc:  # unreadable or a colour picture: as the node would, no result for it
            for mode in predictors:
                preds[mode].append(Prediction.unanalysable(str(exc), mode, (), (0, 0)))
            continue
        for mode, fn in predictors.items():
            preds[mode].append(fn(img, s.view or header_view))
    refused = {s.image_id: p.not_analysable for s, p in zip(samples, next(iter(preds.values()))) if p.not_analysable}
    if refused:
        log.warning("%d of %d images not analysable; left out of the metrics", len(refused), len(samples))
        keep = [i for i, s in enumerate(samples) if s.image_id not in refused]
        samples = [samples[i] for i in keep]
        preds = {m: [pl[i] for i in keep] for m, pl in preds.items()}
    if not samples:
        raise DatasetError("no image could be analysed; nothing to evaluate")
    first = next(iter(preds.values()))
    y = np.asarray([s.label for s in samples])
    p_abn = np.asarray([p.p_abnormal for p in first])
    report: dict = {
        "description": description,
        "data": describe(samples),
        "not_analysable": refused,
        "classifier": {
            **binary_metrics(y, p_abn, classifier_threshold),
            "per_view": _per_view(samples, p_abn, classifier_threshold),
            "per_batch": _per_batch(samples, p_abn, classifier_threshold),
        },
        "modes": {},
        "models": [m.__dict__ for m in (first[0].models if first else ())],
        "metric_notes": "map40: VOC2010 AP at IoU>0.4 incl. 'No finding' (class 14, box [0,0,1,1], score "
        "p_no_finding), mean over classes with ground truth; map50/map50_95: findings only, IoU>=t",
    }
    curves = {}
    for mode, plist in preds.items():
        report["modes"][mode], curves[mode] = _mode_report(samples, plist)

    def score(mode: str) -> float:
        v = report["modes"][mode]["map40"]
        return v if v == v else -1.0

    report["recommended_fusion_mode"] = max(report["modes"], key=score)
    report["plots"] = _plots(out, y, p_abn, classifier_threshold, curves)
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    preds_json = {m: [{"image_id": s.image_id, **p.to_json()} for s, p in zip(samples, pl)] for m, pl in preds.items()}
    (out / "predictions.json").write_text(json.dumps(_clean(preds_json)))
    return report


def summary_lines(report: dict) -> list[str]:
    c = report["classifier"]
    lines = [classifier_line(f"classifier (operating point {c['threshold']})", c)]
    for group in ("per_view", "per_batch"):
        for name, m in c.get(group, {}).items():
            lines.append("  " + classifier_line(f"{group[4:]} {name}", m))
    if report.get("not_analysable"):
        lines.append(f"not analysable (left out): {len(report['not_analysable'])} images")
    for mode, r in report["modes"].items():
        lines.append(
            # the interval is undefined (None) on a set without boxes, e.g. a local folder of labelled films
            f"{mode}: mAP@0.4 {r['map40']} (findings only {r['map40_findings']}, 95 % CI "
            f"{format_ci(r['map40_findings_ci'])[1:-1]}), mAP50 {r['map50']}, "
            f"mAP50-95 {r['map50_95']}, image-level acc {r['image_level']['accuracy']}"
        )
    lines.append(f"recommended fusion mode: {report['recommended_fusion_mode']}")
    return lines
