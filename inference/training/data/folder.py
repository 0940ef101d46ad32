"""A site's own labelled set for evaluation and calibration: ``--layout folder --csv labels.csv --images DIR``.

``labels.csv`` has a header row with ``image`` (file name relative to DIR: DICOM, PNG or JPEG), ``label``
(``1``/``abnormal`` or ``0``/``normal``) and optionally ``view`` (PA, AP, ...), ``patient_id`` and ``batch``
(e.g. the acquisition device, for a per-batch report). Every image belongs to the ``test`` split: a local set is
for evaluating and calibrating, not for training.
"""

from __future__ import annotations

import csv
from pathlib import Path

from inference.errors import DatasetError
from inference.training.data.sample import Sample

LABELS = {"1": True, "abnormal": True, "0": False, "normal": False}


def read_folder(csv_path: str | Path, images: str | Path) -> list[Sample]:
    csv_path, images = Path(csv_path), Path(images)
    if not csv_path.is_file():
        raise DatasetError(f"labels file {csv_path} not found")
    if not images.is_dir():
        raise DatasetError(f"image folder {images} not found")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise DatasetError(f"{csv_path}: needs a header with the columns image,label (and optionally view)")
    out, seen = [], set()
    for i, r in enumerate(rows, start=2):
        name = (r.get("image") or "").strip()
        label = (r.get("label") or "").strip().lower()
        if not name or label not in LABELS:
            raise DatasetError(f"{csv_path} line {i}: image must be given and label be 0/1 or normal/abnormal")
        path = images / name
        if not path.is_file():
            raise DatasetError(f"{csv_path} line {i}: {path} not found")
        if name in seen:
            raise DatasetError(f"{csv_path} line {i}: {name} is listed twice")
        seen.add(name)
        out.append(
            Sample(
                image_id=name,
                path=path,
                patient_id=(r.get("patient_id") or "").strip() or name,
                abnormal=LABELS[label],
                view=(r.get("view") or "").strip().upper() or None,
                source=str(csv_path),
                batch=(r.get("batch") or "").strip(),
                split="test",
            )
        )
    return out
