"""Choosing what the detector reports, on validation data: ``dicom-node tune-detector``.

For every class the detector is run (all classes, no floors) on the validation images and scored at IoU 0.4:

- **reportable**: the class had training boxes and its validation AP@0.4 is at least ``min_ap`` (0.1). A class
  below that is not reported at all: a box the model cannot support is worse than none.
- **floor**: the detector confidence that maximises F1 (at IoU 0.4) for the class on validation; boxes below it
  are dropped. Classes without validation boxes keep floor 0 and are not reportable.

The result goes into a copy of the model file (``extra.reportable_classes``, ``extra.class_floors``,
``extra.postprocess``); the weights are not touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.detector import Detector
from inference.errors import DatasetError
from inference.modelfile import load_model_file, save_model_file
from inference.preprocess import apply_clahe, to_model_input, working_image
from inference.training.data.images import WORKING_SIZE, load_image01
from inference.training.data.sample import Sample, describe
from inference.training.metrics import class_ap

IOU = 0.4


def best_f1_floor(result) -> tuple[float, float]:
    """(confidence floor, F1 at it) maximising F1 along a class's score-sorted predictions."""
    if not result.n_gt or not len(result.scores):
        return 0.0, 0.0
    tp = np.cumsum(result.tp)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / result.n_gt
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    k = int(np.argmax(f1))
    return float(result.scores[k]), float(f1[k])


def detect_all(detector: Detector, samples: list[Sample], conf: float = 0.01) -> dict[str, list[tuple]]:
    """image id -> [(class id, score, box in file pixels)] for every class (no reporting rules)."""
    p = detector.preprocess
    out: dict[str, list[tuple]] = {}
    for s in samples:
        img = load_image01(s.path)
        work, (fx, fy) = working_image(img, max(WORKING_SIZE, p.input_size))
        x, geom = to_model_input(apply_clahe(work, p), p)
        d = detector.detect(x, geom, conf=conf, all_classes=True)
        boxes = d.boxes * np.array([fx, fy, fx, fy])
        out[s.image_id] = [(int(c), float(sc), tuple(b)) for c, sc, b in zip(d.class_ids, d.scores, boxes)]
    return out


def tune(detector: Detector, samples: list[Sample], min_ap: float = 0.1) -> dict:
    """Per class AP@0.4, n boxes, floor and F1 on ``samples``; the reportable class names.

    Abnormal images without boxes are left out (a true detection on them would count as a false positive)."""
    samples = [s for s in samples if s.boxes or not s.abnormal]
    if not any(s.boxes for s in samples):
        raise DatasetError("tune-detector needs validation images with boxes; this set has none")
    preds = detect_all(detector, samples)
    classes = detector.loaded.metadata.classes
    trained = (detector.loaded.metadata.extra.get("train_set") or {}).get("boxes_per_class")
    per_class: dict[str, dict] = {}
    for c, name in enumerate(classes):
        gt = {s.image_id: [b for b, k in zip(s.boxes, s.classes) if k == c] for s in samples}
        pr = [(i, sc, b) for i, v in preds.items() for k, sc, b in v if k == c]
        r = class_ap(gt, pr, IOU)
        floor, f1 = best_f1_floor(r)
        had_training = trained is None or bool(trained.get(name))
        ap = float(r.ap) if r.n_gt else float("nan")
        per_class[name] = {
            "val_ap@0.4": ap,
            "val_boxes": r.n_gt,
            "floor": round(floor, 4),
            "val_f1_at_floor": round(f1, 4),
            "trained": had_training,
            "reportable": bool(had_training and r.n_gt and ap >= min_ap),
        }
    return {
        "reportable_classes": [n for n, v in per_class.items() if v["reportable"]],
        "class_floors": {n: v["floor"] for n, v in per_class.items() if v["reportable"]},
        "per_class": per_class,
        "min_ap": min_ap,
        "iou": IOU,
        "val_set": describe(samples),
    }


def write_tuned(src: str | Path, dst: str | Path, result: dict, description: str) -> Path:
    """A copy of the detector file ``src`` with the reporting rules of ``result`` in its metadata."""
    loaded = load_model_file(src, "detector")
    md = loaded.metadata
    md.extra.update(
        {
            "reportable_classes": result["reportable_classes"],
            "class_floors": result["class_floors"],
            "postprocess": {"tuned_on": description, **{k: result[k] for k in ("per_class", "min_ap", "iou")}},
        }
    )
    return save_model_file(dst, md, loaded.state_dict, loaded.model_yaml)
