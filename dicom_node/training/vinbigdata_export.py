"""VinBigData DICOM folder -> PNG folder + rewritten train.csv that ``inference`` can read.

``inference`` never parses DICOM, so the VinBigData layout (``train.csv`` + ``<image_id>.dicom``)
is exported once::

    OUT/images/<image_id>.png   dicom_node.imaging.pixels.load_image (modality/VOI LUT, MONOCHROME1
                                inverted) -> inference.preprocess.export_image (CLAHE unless
                                clahe=False; longer side shrunk to max_size when given)
    OUT/train.csv               every input row, boxes scaled to the PNG, plus the columns
                                width, height (PNG size), orig_width, orig_height (DICOM size),
                                clahe (1/0), view (ViewPosition) and patient_id (a SHA-256 prefix of
                                PatientID, never the id itself; empty when the header has none)

Images already exported are kept (only their header is read again), so an interrupted export
continues where it stopped. Images whose DICOM cannot be decoded are left out and counted; the
messages never contain patient data. ``ensure_exported(csv, images, out)`` exports when ``images`` holds
DICOM files and returns the (csv, images) pair to train on; ``export_for_training(csv, images, ...)`` does the
same for the training commands, choosing the export folder from the options.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2

from dicom_node.errors import PixelDataError
from dicom_node.imaging.pixels import load_image, read_dataset, read_header
from inference.preprocess import PreprocessParams, export_image, export_scale

log = logging.getLogger(__name__)

DICOM_EXTS = (".dicom", ".dcm")
EXTRA_COLUMNS = ("width", "height", "orig_width", "orig_height", "clahe", "view", "patient_id")
COORDS = ("x_min", "y_min", "x_max", "y_max")

__all__ = ["export_vinbigdata", "ensure_exported", "export_for_training", "holds_dicom"]


def _find_dicom(images: Path, image_id: str) -> Path | None:
    for ext in DICOM_EXTS:
        p = images / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def holds_dicom(images: str | Path) -> bool:
    images = Path(images)
    return images.is_dir() and any(p.suffix.lower() in DICOM_EXTS for p in images.iterdir())


def _header_info(ds) -> dict:
    pid = str(ds.get("PatientID", "") or "").strip()
    return {
        "view": str(ds.get("ViewPosition", "") or "").strip().upper(),
        "patient_id": hashlib.sha256(pid.encode()).hexdigest()[:16] if pid else "",
    }


def _export_one(job: tuple) -> tuple[str, dict | None, str | None]:
    """(image_id, info or None, error text). Runs in worker processes: plain arguments only."""
    image_id, src, dst, params_dict, max_size = job
    src, dst = Path(src), Path(dst)
    try:
        if dst.is_file():
            ds = read_header(src)
            rows, cols = int(ds.Rows), int(ds.Columns)
        else:
            ds = read_dataset(src)
            img01 = load_image(ds)
            rows, cols = img01.shape
            png = export_image(img01, PreprocessParams.from_dict(params_dict), max_size)
            tmp = dst.with_name(f".{dst.stem}.tmp.png")
            if not cv2.imwrite(str(tmp), png):
                return image_id, None, "cannot write PNG"
            tmp.replace(dst)
        k = export_scale((rows, cols), max_size)
        return (
            image_id,
            {
                "k": k,
                "orig": (cols, rows),
                "size": (max(1, round(cols * k)), max(1, round(rows * k))),
                **_header_info(ds),
            },
            None,
        )
    except PixelDataError as exc:
        return image_id, None, str(exc)
    except (AttributeError, ValueError, OSError) as exc:
        return image_id, None, f"{type(exc).__name__}"


def export_vinbigdata(
    csv_path: str | Path,
    images: str | Path,
    out_dir: str | Path,
    max_size: int | None = 1024,
    clahe: bool = True,
    params: PreprocessParams | None = None,
    workers: int = 1,
) -> tuple[Path, Path]:
    """Export (see module docstring); returns ``(OUT/train.csv, OUT/images)``."""
    from tqdm.auto import tqdm

    csv_path, images, out_dir = Path(csv_path), Path(images), Path(out_dir)
    params = params or PreprocessParams()
    if not clahe:
        params = params.with_(clahe_clip_limit=0.0)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "image_id" not in fields or not all(c in fields for c in COORDS):
        raise PixelDataError(f"{csv_path.name}: not a VinBigData train.csv (image_id, {', '.join(COORDS)} needed)")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    ids = sorted({r["image_id"] for r in rows})
    jobs, missing = [], 0
    for image_id in ids:
        src = _find_dicom(images, image_id)
        if src is None:
            missing += 1
            continue
        jobs.append((image_id, str(src), str(out_dir / "images" / f"{image_id}.png"), params.to_dict(), max_size))
    info: dict[str, dict] = {}
    failed = 0
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_export_one, jobs, chunksize=8)
            for image_id, got, err in tqdm(results, total=len(jobs), desc="export DICOM", unit="img"):
                failed += _collect(info, image_id, got, err)
    else:
        for job in tqdm(jobs, desc="export DICOM", unit="img"):
            failed += _collect(info, *_export_one(job))
    out_fields = [f for f in fields if f not in EXTRA_COLUMNS] + list(EXTRA_COLUMNS)
    out_csv = out_dir / "train.csv"
    tmp = out_csv.with_name(".train.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=out_fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            got = info.get(r["image_id"])
            if got is None:
                continue
            r = dict(r)
            for c in COORDS:
                v = (r.get(c) or "").strip()
                r[c] = f"{float(v) * got['k']:.2f}" if v and v.lower() != "nan" else ""
            r.update(
                width=got["size"][0],
                height=got["size"][1],
                orig_width=got["orig"][0],
                orig_height=got["orig"][1],
                clahe=int(clahe),
                view=got["view"],
                patient_id=got["patient_id"],
            )
            w.writerow(r)
    tmp.replace(out_csv)
    if missing or failed:
        log.warning("VinBigData export: %d listed images have no DICOM file, %d could not be decoded", missing, failed)
    log.info("VinBigData export: %d images written to %s", len(info), out_dir / "images")
    return out_csv, out_dir / "images"


def _collect(info: dict, image_id: str, got: dict | None, err: str | None) -> int:
    if got is None:
        log.warning("VinBigData export: image %s skipped: %s", image_id, err)
        return 1
    info[image_id] = got
    return 0


def ensure_exported(csv_path: str | Path, images: str | Path, out_dir: str | Path, **kw) -> tuple[Path, Path]:
    """(csv, images) ready for ``inference.training.data.vinbigdata``: exported first when ``images`` holds DICOM."""
    if holds_dicom(images):
        return export_vinbigdata(csv_path, images, out_dir, **kw)
    return Path(csv_path), Path(images)


def export_for_training(
    csv_path: str,
    images: str,
    *,
    export_dir: str | None = None,
    max_size: int | None = 1024,
    raw: bool = False,
    workers: int = 1,
) -> tuple[str, str]:
    """The (csv, images) a training command reads for a VinBigData set: when ``images`` holds DICOM, the export's
    (``export_dir``, default ``<csv folder>/export-<clahe|raw>-<max size>``; ``raw``: without CLAHE; ``max_size``
    None: full size), else the pair as given."""
    if not holds_dicom(images):
        return csv_path, images
    out = export_dir or Path(csv_path).resolve().parent / f"export-{'raw' if raw else 'clahe'}-{max_size or 'full'}"
    new_csv, new_images = export_vinbigdata(csv_path, images, out, max_size=max_size, clahe=not raw, workers=workers)
    return str(new_csv), str(new_images)
