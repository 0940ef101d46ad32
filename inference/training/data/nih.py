"""The NIH ChestX-ray14 sets in ``../shared/datasets``: nih-bbox (abnormal, boxes) + nih-normal.

Layout (read, never copied)::

    DATA/nih-bbox/boxes_512.csv     image,finding,x,y,w,h     (512x512 pixel space, top-left + size)
    DATA/nih-bbox/images/*.jpg      880 abnormal images
    DATA/nih-normal/labels.csv      image,source_label,patient_id,view_position,...
    DATA/nih-normal/images/*.jpg    428 normal images

The patient id is the first 8 digits of the file name in both sets. nih-bbox has no view
position (``view=None``); nih-normal has PA/AP. The 8 NIH findings map to 7 VinDr-CXR classes
(:data:`NIH_TO_VINDR`; Pneumonia -> Consolidation by default, or Lung Opacity).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from inference.errors import DatasetError
from inference.training.data.sample import Sample
from inference.training.data.split import SPLITS
from inference.types import FINDING_CLASSES

NIH_TO_VINDR: dict[str, int] = {
    "Atelectasis": FINDING_CLASSES.index("Atelectasis"),  # 1
    "Cardiomegaly": FINDING_CLASSES.index("Cardiomegaly"),  # 3
    "Effusion": FINDING_CLASSES.index("Pleural effusion"),  # 10
    "Infiltrate": FINDING_CLASSES.index("Infiltration"),  # 6
    "Mass": FINDING_CLASSES.index("Nodule/Mass"),  # 8
    "Nodule": FINDING_CLASSES.index("Nodule/Mass"),  # 8
    "Pneumonia": FINDING_CLASSES.index("Consolidation"),  # 4
    "Pneumothorax": FINDING_CLASSES.index("Pneumothorax"),  # 12
}
NIH_IMAGE_SIZE = 512
DESCRIPTION = (
    "NIH ChestX-ray14 subsets: nih-bbox (880 abnormal, 984 boxes, 8 findings -> VinDr ids) + "
    "nih-normal (428 'No Finding'); https://nihcc.app.box.com/v/ChestXray-NIHCC, "
    "Wang et al., CVPR 2017, NIH Clinical Center"
)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} not found: expected the NIH layout under {path.parent.parent}")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def patient_of(image_name: str) -> str:
    stem = Path(image_name).stem
    if len(stem) < 8 or not stem[:8].isdigit():
        raise DatasetError(f"NIH file name {image_name!r} does not start with an 8-digit patient id")
    return stem[:8]


def read_nih_bbox(root: Path, pneumonia_class: int = NIH_TO_VINDR["Pneumonia"]) -> list[Sample]:
    folder = Path(root) / "nih-bbox"
    mapping = {**NIH_TO_VINDR, "Pneumonia": int(pneumonia_class)}
    boxes: dict[str, list[tuple]] = defaultdict(list)
    for i, r in enumerate(_rows(folder / "boxes_512.csv"), start=2):
        try:
            x, y, w, h = (float(r[k]) for k in ("x", "y", "w", "h"))
            cls = mapping[r["finding"]]
        except (KeyError, ValueError) as exc:
            raise DatasetError(f"{folder / 'boxes_512.csv'} line {i}: bad row {r!r}") from exc
        lim = float(NIH_IMAGE_SIZE)
        box = (max(0.0, x), max(0.0, y), min(lim, x + w), min(lim, y + h))
        if box[2] > box[0] and box[3] > box[1]:
            boxes[r["image"]].append((box, cls))
    out = []
    for name in sorted(boxes):
        path = folder / "images" / name
        if not path.is_file():
            raise DatasetError(f"{path} listed in boxes_512.csv but missing")
        out.append(
            Sample(
                image_id=Path(name).stem,
                path=path,
                patient_id=patient_of(name),
                abnormal=True,
                boxes=tuple(b for b, _ in boxes[name]),
                classes=tuple(c for _, c in boxes[name]),
                view=None,
                source="nih-bbox",
            )
        )
    return out


def read_nih_normal(root: Path) -> list[Sample]:
    folder = Path(root) / "nih-normal"
    out = []
    for r in _rows(folder / "labels.csv"):
        path = folder / "images" / r["image"]
        if not path.is_file():
            raise DatasetError(f"{path} listed in labels.csv but missing")
        view = (r.get("view_position") or "").strip().upper() or None
        out.append(
            Sample(
                image_id=Path(r["image"]).stem,
                path=path,
                patient_id=patient_of(r["image"]),
                abnormal=False,
                view=view,
                source="nih-normal",
            )
        )
    return sorted(out, key=lambda s: s.image_id)


MATCHED_DESCRIPTION = (
    "NIH ChestX-ray14 nih-matched (485 normal + 485 abnormal adult frontal CXRs, balanced on NIH conversion "
    "batch x view x sex, matched on brightness, contrast and sharpness; its own patient-level split); "
    "https://nihcc.app.box.com/v/ChestXray-NIHCC, Wang et al., CVPR 2017, NIH Clinical Center"
)


def read_nih_matched(root: str | Path, pneumonia_class: int = NIH_TO_VINDR["Pneumonia"]) -> list[Sample]:
    """The 970 images of ``nih-matched`` (``root`` holds it, or is it), with view, batch, split and boxes."""
    root = Path(root)
    folder = root if (root / "labels.csv").is_file() and (root / "normal").is_dir() else root / "nih-matched"
    mapping = {**NIH_TO_VINDR, "Pneumonia": int(pneumonia_class)}
    boxes: dict[str, list[tuple]] = defaultdict(list)
    box_csv = folder / "abnormal" / "boxes_512.csv"
    if box_csv.is_file():
        for r in _rows(box_csv):
            if r["finding"] not in mapping:
                continue
            x, y, w, h = (float(r[k]) for k in ("x", "y", "w", "h"))
            lim = float(NIH_IMAGE_SIZE)
            box = (max(0.0, x), max(0.0, y), min(lim, x + w), min(lim, y + h))
            if box[2] > box[0] and box[3] > box[1]:
                boxes[r["image"]].append((box, mapping[r["finding"]]))
    out = []
    for i, r in enumerate(_rows(folder / "labels.csv"), start=2):
        path = folder / r["path"]
        if not path.is_file():
            raise DatasetError(f"{path} listed in {folder / 'labels.csv'} line {i} but missing")
        if r["label"] not in ("0", "1") or r["split"] not in SPLITS:
            raise DatasetError(f"{folder / 'labels.csv'} line {i}: label must be 0/1 and split train/val/test")
        found = boxes.get(r["image"], [])
        out.append(
            Sample(
                image_id=Path(r["image"]).stem,
                path=path,
                patient_id=patient_of(r["image"]),
                abnormal=r["label"] == "1",
                boxes=tuple(b for b, _ in found),
                classes=tuple(c for _, c in found),
                view=(r.get("view_position") or "").strip().upper() or None,
                source="nih-matched",
                batch=r.get("nih_batch", ""),
                split=r["split"],
            )
        )
    return sorted(out, key=lambda s: s.image_id)


def read_nih(root: str | Path, pneumonia_class: int = NIH_TO_VINDR["Pneumonia"]) -> list[Sample]:
    """All 1308 NIH samples (abnormal with boxes + normal), sorted by image id."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"NIH data folder {root} not found (expected nih-bbox/ and nih-normal/ in it)")
    samples = read_nih_bbox(root, pneumonia_class) + read_nih_normal(root)
    return sorted(samples, key=lambda s: s.image_id)
