"""Export :class:`Sample` splits as an ultralytics YOLO detection dataset (CLAHE'd images).

::

    OUT/images/{train,val}/<image_id>.png   as the node sees it: at the working size, intensity-normalised
                                            and CLAHE'd, longer side at most ``max_size``
    OUT/labels/{train,val}/<image_id>.txt   "class cx cy w h" normalised; empty file = background
    OUT/data.yaml                           path, train, val, names = the 14 VinDr-CXR classes
    OUT/manifest.json                       what was exported; a matching manifest is reused as is

Normal images are exported with empty label files (ultralytics trains on them as backgrounds).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import yaml

from inference.preprocess import PreprocessParams, apply_clahe, export_image, working_image
from inference.training.data.images import WORKING_SIZE, load_image01
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
        "samples_sha256": h.hexdigest(),
        "max_size": max_size,
        "format": 2,
        "intensity": params.intensity,
        "clahe": [params.clahe_clip_limit, params.clahe_tile_grid, params.clahe_bits],
        "counts": {k: len(v) for k, v in splits.items()},
    }


def _export_one(job: tuple[Sample, str, Path, PreprocessParams, int | None]) -> None:
    """One image and its label file, as the node would see it: shrunk to the working size, normalised and
    CLAHE'd there, then at most ``max_size`` on its longer side."""
    s, name, out, params, max_size = job
    raw = load_image01(s.path)
    if s.clahe_applied:  # exported CLAHE'd already: only resized
        work = raw
    else:  # the node's order: working size first, then intensity normalisation and CLAHE
        work = apply_clahe(working_image(raw, max(WORKING_SIZE, params.input_size))[0], params)
    img = export_image(work, params.with_(intensity="none", clahe_clip_limit=0.0), max_size)
    h, w = img.shape
    k = w / raw.shape[1], h / raw.shape[0]
    boxes = s.boxes_array().reshape(-1, 4) * np.array([k[0], k[1], k[0], k[1]], dtype=np.float64)
    cv2.imwrite(str(out / "images" / name / f"{s.image_id}.png"), img)
    lines = yolo_label_lines(boxes, s.classes_array(), w, h)
    (out / "labels" / name / f"{s.image_id}.txt").write_text("".join(f"{x}\n" for x in lines))


def export_yolo_dataset(
    splits: dict[str, list[Sample]],
    out_dir: str | Path,
    params: PreprocessParams,
    max_size: int | None = None,
    include_normals: bool = True,
    workers: int = 1,
) -> Path:
    """Write the dataset (see module docstring) with ``workers`` processes; return the path of ``data.yaml``."""
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
        jobs = [(s, name, out, params, max_size) for s in samples]
        bar = tqdm(total=len(jobs), desc=f"YOLO export {name}", unit="img", leave=False)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_export_one, jobs, chunksize=8):
                    bar.update()
        else:
            for job in jobs:
                _export_one(job)
                bar.update()
        bar.close()
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
