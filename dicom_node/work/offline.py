"""Offline analysis of files (the ``dicom-node analyze`` command): DICOM, PNG or JPEG in, JSON and
an overlay PNG (the same picture as the Secondary Capture) out, without any network or storage.

``analyze_files(pipeline, files, output_dir)`` writes for every input ``<stem>.json`` and
``<stem>.png`` (``<stem>_2`` ... when two inputs share a stem) and returns one dict per input.

JSON written per image (``schema`` = ``dicom-node/analyze/1``)::

    {
      "schema": "dicom-node/analyze/1",
      "file": "/abs/path/input.dcm",
      "p_abnormal": 0.83,            # classifier P(abnormal)
      "p_no_finding": 0.17,          # after fusion (see inference.fusion)
      "abnormal": true,              # any finding, or p_no_finding < 0.5
      "not_analysable": null,        # or the reason the models could not judge the image (then
                                     # p_abnormal, p_no_finding and abnormal are null)
      "fusion_mode": "soft",
      "image_size": [rows, columns],
      "findings": [                  # sorted by score, highest first
        {"label": "Pleural effusion", "class_id": 10,
         "code": {"scheme": "SCT", "value": "60046008", "meaning": "Pleural effusion"},
         "score": 0.71,              # fused score in [0, 1]
         "detector_score": 0.64,     # raw detector confidence
         "box": [x_min, y_min, x_max, y_max]}     # source pixels (columns, rows), floats
      ],
      "models": [{"name", "architecture", "version", "sha256"}, ...],
      "timings_s": {"decode": ..., "clahe": ..., "classifier": ..., "detector": ..., "fusion": ..., "total": ...},
      "disclaimer": "AI result - not for primary diagnosis"
    }

A file that cannot be read or analysed does not stop the run: its dict is
``{"file": ..., "error": "<reason>"}`` (also written as ``<stem>.json``) and it is logged.
PNG/JPEG inputs are read as greyscale and scaled to [0, 1] by their bit depth; DICOM goes through
:func:`dicom_node.imaging.pixels.load_image` (modality/VOI LUT, MONOCHROME1 inversion).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from dicom_node.errors import DicomNodeError
from dicom_node.outputs.captions import BANNER_TEXT
from dicom_node.outputs.sc import render_overlay
from inference.pipeline import Pipeline
from inference.quality import colour_problem
from inference.types import Prediction

__all__ = ["analyze_files", "expand_inputs", "read_image", "prediction_dict", "DISCLAIMER", "IMAGE_SUFFIXES", "SCHEMA"]

log = logging.getLogger(__name__)

SCHEMA = "dicom-node/analyze/1"
DISCLAIMER = BANNER_TEXT
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", "")


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to DICOM/PNG/JPEG-looking files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES
            )
        else:
            out.append(p)
    return out


def read_image(path: str | os.PathLike, at_least: int | None = None) -> tuple[np.ndarray, tuple[int, int], str | None]:
    """A file -> (float32 image in [0, 1], (rows, columns) of the source, its ViewPosition when a DICOM header
    says): PNG/JPEG via OpenCV, anything else as DICOM. ``at_least``: see
    :func:`dicom_node.imaging.pixels.decode_image` (the image may come back smaller than the source; boxes are
    then scaled to the source size). A colour PNG/JPEG photograph is refused (ValueError)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"{path.name}: cannot read the image (missing or not a PNG/JPEG)")
        if img.ndim == 3:
            problem = colour_problem(img)
            if problem:
                raise ValueError(f"{path.name}: not analysable: {problem}")
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
        top = np.iinfo(img.dtype).max if np.issubdtype(img.dtype, np.integer) else 1.0
        return (img.astype(np.float32) / np.float32(top)).clip(0, 1), img.shape[:2], None
    from dicom_node.imaging.pixels import decode_image, read_dataset
    from dicom_node.ingest.selection import header_fields

    ds = read_dataset(path)
    view = header_fields(ds)["view_position"] or None
    return decode_image(ds, at_least=at_least)[0], (int(ds.Rows), int(ds.Columns)), view


def _finding_code(class_id: int) -> dict:
    from dicom_node.outputs.codes import finding_code

    c = finding_code(class_id)
    return {"scheme": c.scheme_designator, "value": c.value, "meaning": c.meaning}


def prediction_dict(pred: Prediction, source: str | os.PathLike | None = None) -> dict:
    """The documented JSON form of one prediction."""
    return {
        "schema": SCHEMA,
        "file": str(source) if source is not None else None,
        "p_abnormal": None if pred.not_analysable else round(pred.p_abnormal, 4),
        "p_no_finding": None if pred.not_analysable else round(pred.p_no_finding, 4),
        "abnormal": None if pred.not_analysable else pred.abnormal,
        "not_analysable": pred.not_analysable or None,
        "fusion_mode": pred.fusion_mode,
        "image_size": list(pred.image_size),
        "findings": [
            {
                "label": f.label,
                "class_id": f.class_id,
                "code": _finding_code(f.class_id),
                "score": round(f.score, 4),
                "detector_score": round(f.detector_score, 4),
                "box": [round(v, 1) for v in f.box],
            }
            for f in pred.findings
        ],
        "models": [
            {"name": m.name, "architecture": m.architecture, "version": m.version, "sha256": m.sha256}
            for m in pred.models
        ],
        "timings_s": {k: round(v, 4) for k, v in pred.timings_s.items()},
        "disclaimer": DISCLAIMER,
    }


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem or path.name, 2
    candidate = stem
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def analyze_files(
    pipeline: Pipeline, files: Iterable[str | os.PathLike], output_dir: str | os.PathLike, *, overlay: bool = True
) -> list[dict]:
    """Analyse each file; write ``<stem>.json`` (+ ``<stem>.png`` overlay) under ``output_dir``.

    Returns the JSON dicts in input order, each with ``"json"`` (and ``"overlay"``) output paths
    added; failed inputs give ``{"file", "error", "json"}``. Never raises for a bad input file.
    """
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    results: list[dict] = []
    for f in map(Path, files):
        stem = _unique_stem(f, used)
        json_path = out_dir / f"{stem}.json"
        try:
            t0 = time.perf_counter()
            img, source_size, view = read_image(f, at_least=pipeline.working_size)
            decode_s = time.perf_counter() - t0
            shown = pipeline.run(img, view=view)  # on img's pixels
            shown.timings_s["decode"] = decode_s
            pred = shown.rescaled(source_size)  # on the source's pixels, as the SR has them
            data = prediction_dict(pred, f.resolve())
            if overlay:
                png_path = out_dir / f"{stem}.png"
                rgb, _ = render_overlay(img, shown)  # the Secondary Capture picture, so both look alike
                if not cv2.imwrite(str(png_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"cannot write {png_path}")
                data["overlay"] = str(png_path)
            log.info(
                "analysed %s: %s",
                f.name,
                f"not analysable: {pred.not_analysable}"
                if pred.not_analysable
                else f"p_abnormal={pred.p_abnormal:.3f} findings={len(pred.findings)}",
            )
        except (DicomNodeError, ValueError, OSError) as exc:  # ModelError etc. are DicomNodeErrors too
            log.warning("cannot analyse %s: %s", f.name, exc)
            data = {"schema": SCHEMA, "file": str(f.resolve()), "error": str(exc)}
        _write_json(json_path, {k: v for k, v in data.items() if k != "overlay"})
        data["json"] = str(json_path)
        results.append(data)
    return results
