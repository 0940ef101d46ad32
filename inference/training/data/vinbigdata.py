"""The VinBigData (VinDr-CXR Kaggle) layout: ``train.csv`` + one image per ``image_id``.

``train.csv`` columns: ``image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max``; each
image was read by 3 radiologists (``rad_id`` R1..R17); class 14 "No finding" rows have empty box
columns. Optional columns understood here:

- ``width, height``: the pixel space the box coordinates refer to (the original DICOM size in
  public PNG re-exports). When the image file has another size, boxes are scaled to it.
- ``patient_id``, ``view``: written by ``dicom_node.training.vinbigdata_export`` when the DICOM header has
  them; VinBigData itself has no patient id, so the image id is the patient otherwise.
- ``clahe``: 1 when the image files were CLAHE'd by the export (training must not CLAHE again).

Images are ``<images>/<image_id>.png|.jpg|.jpeg``. DICOM files (``.dicom``/``.dcm``) are never read
here (``inference`` does not parse DICOM): export them first with ``dicom_node.training.vinbigdata_export``.

Annotation choice: a reader id (``"R9"``: only the images that reader read, with that reader's
boxes; the original project used R9) or ``"wbf"``: all images, the boxes of all readers fused per
class with weighted boxes fusion (ensemble-boxes, IoU 0.4); a fused box's score is the share of the
image's readers that drew it, and ``min_votes`` drops boxes fewer readers agree on.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from inference.errors import DatasetError
from inference.training.data.sample import Sample
from inference.types import FINDING_CLASSES, NO_FINDING_ID

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DICOM_EXTS = (".dicom", ".dcm")
REQUIRED = ("image_id", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
WBF_IOU = 0.4
WBF_SKIP = 1e-4


@dataclass
class ImageRows:
    """All csv rows of one image, per reader: ``readers[rad_id] = [(class_id, box or None), ...]``."""

    image_id: str
    readers: dict[str, list[tuple[int, tuple | None]]] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # (width, height) of the coordinate space, if given
    patient_id: str | None = None
    view: str | None = None
    clahe: bool | None = None


def _float(v: str) -> float | None:
    v = (v or "").strip()
    if v == "" or v.lower() == "nan":
        return None
    return float(v)


def read_csv(path: str | Path) -> dict[str, ImageRows]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"VinBigData csv {path} not found")
    out: dict[str, ImageRows] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path}: missing columns {missing}; expected the VinBigData train.csv "
                f"layout ({', '.join(REQUIRED)}, class_name)"
            )
        for line, r in enumerate(reader, start=2):
            try:
                cid = int(float(r["class_id"]))
                coords = [_float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
                w, h = _float(r.get("width", "")), _float(r.get("height", ""))
            except ValueError as exc:
                raise DatasetError(f"{path} line {line}: unreadable number in {r!r}") from exc
            if not 0 <= cid <= NO_FINDING_ID:
                raise DatasetError(f"{path} line {line}: class_id {cid} outside 0-{NO_FINDING_ID}")
            box = None
            if cid != NO_FINDING_ID:
                x0, y0, x1, y1 = coords
                if x0 is None or y0 is None or x1 is None or y1 is None:
                    raise DatasetError(f"{path} line {line}: class {cid} without a box")
                box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            img = out.setdefault(r["image_id"], ImageRows(r["image_id"]))
            img.readers.setdefault(r["rad_id"].strip(), []).append((cid, box))
            if w and h:
                img.size = (int(w), int(h))
            if r.get("patient_id"):
                img.patient_id = r["patient_id"].strip()
            if r.get("view"):
                img.view = r["view"].strip().upper()
            if r.get("clahe", "").strip() != "":
                img.clahe = r["clahe"].strip() in ("1", "true", "True", "yes")
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def reader_annotations(rows: ImageRows, rad_id: str) -> tuple[list[tuple], list[int]] | None:
    """Boxes and classes of one reader, or None when that reader did not read the image."""
    items = rows.readers.get(rad_id)
    if items is None:
        return None
    found = [(b, c) for c, b in items if c != NO_FINDING_ID and b is not None]
    return [b for b, _ in found], [c for _, c in found]


def wbf_annotations(
    rows: ImageRows, iou_thr: float = WBF_IOU, skip_box_thr: float = WBF_SKIP, min_votes: int = 1
) -> tuple[list[tuple], list[int], list[float]]:
    """Weighted boxes fusion of all readers of one image: (boxes, classes, reader share)."""
    from ensemble_boxes import weighted_boxes_fusion

    readers = sorted(rows.readers)
    all_boxes = [b for r in readers for c, b in rows.readers[r] if c != NO_FINDING_ID and b is not None]
    if not all_boxes:
        return [], [], []
    # WBF wants [0, 1] coordinates; it is scale-invariant, so any scale >= the extent will do.
    scale = float(max(max(rows.size) if rows.size else 0, max(max(b) for b in all_boxes), 1.0))
    boxes_l, scores_l, labels_l = [], [], []
    for r in readers:
        items = [(c, b) for c, b in rows.readers[r] if c != NO_FINDING_ID and b is not None]
        boxes_l.append([[v / scale for v in b] for _, b in items])
        scores_l.append([1.0] * len(items))
        labels_l.append([c for c, _ in items])
    boxes, scores, labels = weighted_boxes_fusion(
        boxes_l, scores_l, labels_l, iou_thr=iou_thr, skip_box_thr=skip_box_thr
    )
    keep = scores >= (min_votes / len(readers)) - 1e-6
    out_b = [tuple(float(v) * scale for v in b) for b in boxes[keep]]
    return out_b, [int(c) for c in labels[keep]], [float(s) for s in scores[keep]]


def find_image(images: Path, image_id: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = images / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def read_vinbigdata(
    csv_path: str | Path, images: str | Path, annotations: str = "R9", min_votes: int = 1, iou_thr: float = WBF_IOU
) -> list[Sample]:
    """Samples of a VinBigData layout with exported PNG/JPEG images (see the module docstring)."""
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"VinBigData image folder {images} not found")
    table = read_csv(csv_path)
    wbf = annotations.lower() == "wbf"
    if not wbf and not any(annotations in t.readers for t in table.values()):
        known = sorted({r for t in table.values() for r in t.readers})
        raise DatasetError(f"no image in {csv_path} was read by {annotations!r}; readers: {known} (or use 'wbf')")
    out, missing, dicoms = [], 0, 0
    for image_id in sorted(table):
        rows = table[image_id]
        if wbf:
            boxes, classes, _ = wbf_annotations(rows, iou_thr=iou_thr, min_votes=min_votes)
        else:
            got = reader_annotations(rows, annotations)
            if got is None:
                continue
            boxes, classes = got
        path = find_image(images, image_id)
        if path is None:
            missing += 1
            dicoms += any((images / f"{image_id}{e}").is_file() for e in DICOM_EXTS)
            continue
        if boxes and rows.size is not None:
            w, h = image_size(path)
            sx, sy = w / rows.size[0], h / rows.size[1]
            boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in boxes]
        out.append(
            Sample(
                image_id=image_id,
                path=path,
                patient_id=rows.patient_id or image_id,
                abnormal=bool(boxes),
                boxes=tuple(tuple(b) for b in boxes),
                classes=tuple(classes),
                view=rows.view,
                clahe_applied=bool(rows.clahe),
                source=f"vinbigdata:{annotations}",
            )
        )
    if dicoms:
        raise DatasetError(
            f"{images} holds DICOM files ({dicoms} of the listed images): export them to "
            "PNG first (dicom_node.training.vinbigdata_export / `--layout vinbigdata` in the "
            "dicom-node CLI does it); inference code reads images only"
        )
    if missing:
        log.warning("%d images listed in %s are not in %s and were left out", missing, csv_path, images)
    if not out:
        raise DatasetError(f"no usable image of {csv_path} found in {images}")
    return out


def describe_source(csv_path, annotations: str) -> str:
    how = (
        "weighted boxes fusion of all readers (IoU 0.4)"
        if annotations.lower() == "wbf"
        else f"reader {annotations} only"
    )
    return f"VinBigData layout {Path(csv_path).name}, annotations: {how}; {len(FINDING_CLASSES)} classes"
