"""One labelled image of a training/evaluation set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.types import FINDING_CLASSES

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """An image file with its labels.

    ``boxes`` are ``(x_min, y_min, x_max, y_max)`` in pixels of the file at ``path``; ``classes``
    are the VinDr-CXR ids 0-13 of the boxes (same order). ``abnormal`` is the image-level label of
    the normal/abnormal classifier. ``clahe_applied`` says the file was written by
    ``inference.preprocess.export_image`` (already CLAHE'd: training must not apply CLAHE again).
    """

    image_id: str
    path: Path
    patient_id: str
    abnormal: bool
    boxes: tuple[Box, ...] = ()
    classes: tuple[int, ...] = ()
    view: str | None = None
    clahe_applied: bool = False
    source: str = ""
    batch: str = ""  # acquisition/conversion batch where the data set records one (NIH: bright/dark)
    split: str = ""  # the data set's own split (train/val/test) where it ships one

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.classes):
            raise ValueError(f"{self.image_id}: {len(self.boxes)} boxes but {len(self.classes)} classes")
        for c in self.classes:
            if not 0 <= c < len(FINDING_CLASSES):
                raise ValueError(f"{self.image_id}: class id {c} outside 0-{len(FINDING_CLASSES) - 1}")

    @property
    def label(self) -> int:
        return int(self.abnormal)

    def boxes_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)

    def classes_array(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=np.int64).reshape(-1)


def describe(samples: list[Sample]) -> dict:
    """Counts for logs and model metadata: images, patients, abnormal, views, batches, boxes per class."""
    views: dict[str, int] = {}
    batches: dict[str, int] = {}
    per_class = [0] * len(FINDING_CLASSES)
    for s in samples:
        views[s.view or "unknown"] = views.get(s.view or "unknown", 0) + 1
        if s.batch:
            batches[s.batch] = batches.get(s.batch, 0) + 1
        for c in s.classes:
            per_class[c] += 1
    return {
        "images": len(samples),
        "patients": len({s.patient_id for s in samples}),
        "abnormal": sum(s.abnormal for s in samples),
        "normal": sum(not s.abnormal for s in samples),
        "views": dict(sorted(views.items())),
        **({"batches": dict(sorted(batches.items()))} if batches else {}),
        "boxes": sum(per_class),
        "boxes_per_class": {FINDING_CLASSES[i]: n for i, n in enumerate(per_class) if n},
    }
