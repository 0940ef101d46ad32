"""Export :class:`Sample` splits as an ultralytics YOLO detection dataset (CLAHE'd images).

::

    OUT/images/{train,val}/<image_id>.png   CLAHE'd (inference.preprocess.export_image), longer side
                                            at most ``max_size``
    OUT/labels/{train,val}/<image_id>.txt   "class cx cy w h" normalised; empty file = background
    OUT/data.yaml                           path, train, val, names = the 14 VinDr-CXR classes
    OUT/manifest.json                       what was exported; a matching manifest is reused as is

Normal images are exported with empty label files (ultralytics trains on them as backgrounds).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

from inference.preprocess import PreprocessParams, export_image, export_scale
from inference.training.data.images import load_image01
from inference.training.data.sample import Sample
from inference.types import FINDING_CLASSES

__all__ = ["export_yolo_dataset", "yolo_label_lines"]


def yolo_label_lines(boxes: np.ndarray, classes: np.ndarray, width: int, height: int) -> list[str]:
    lines = []
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        lines.append(
            f"{int(c)} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
        )
    return lines


def _manifest(splits: dict[str, list[Sample]], params: PreprocessParams, max_size: int | None) -> dict:
    h = hashlib.sha256()
    for name in sorted(splits):
        for s in splits[name]:
            h.update(f"{name}|{s.image_id}|{s.path}|{s.boxes}|{s.classes}|{s.clahe_applied}\n".encode())
    return {
        "format": 1,
        "samples_sha256": h.hexdigest(),
        "max_size": max_size,
        "clahe": [params.clahe_clip_limit, params.clahe_tile_grid, params.clahe_bits],
        "counts": {k: len(v) for k, v in splits.items()},
    }


def export_yolo_dataset(
    splits: dict[str, list[Sample]],
    out_dir: str | Path,
    params: PreprocessParams,
    max_size: int | None = None,
    include_normals: bool = True,
) -> Path:
    """Write the dataset (see module docstring); return the path of ``data.yaml``."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if not include_normals:
        splits = {k: [s for s in v if s.abnormal] for k, v in splits.items()}
    manifest = _manifest(splits, params, max_size)
    data_yaml = out / "data.yaml"
    man_path = out / "manifest.json"
    if data_yaml.is_file() and man_path.is_file() and json.loads(man_path.read_text()) == manifest:
        return data_yaml
    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name, samples in splits.items():
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "labels" / name).mkdir(parents=True, exist_ok=True)
        for s in tqdm(samples, desc=f"YOLO export {name}", unit="img", leave=False):
            img01 = load_image01(s.path)
            if s.clahe_applied:  # already CLAHE'd: only resize
                p = params.with_(clahe_clip_limit=0.0)
            else:
                p = params
            img = export_image(img01, p, max_size)
            k = export_scale(img01.shape, max_size)
            h, w = img.shape
            cv2.imwrite(str(out / "images" / name / f"{s.image_id}.png"), img)
            lines = yolo_label_lines(s.boxes_array() * k, s.classes_array(), w, h)
            (out / "labels" / name / f"{s.image_id}.txt").write_text("".join(f"{x}\n" for x in lines))
    data = {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(FINDING_CLASSES)),
    }
    if "test" in splits and splits["test"]:
        data["test"] = "images/test"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    man_path.write_text(json.dumps(manifest))
    return data_yaml
