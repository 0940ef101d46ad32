"""Chest X-ray studies made from real radiographs in ``../shared/datasets/nih-matched``, with their labels: what a
site's archive would hold, for backfill, site-validation and drift tests.

Each study is one DX image (8-bit MONOCHROME2, the JPEG's pixels as they are), PA or AP as NIH labels it, with a
device (Manufacturer, Model Name, Station Name), a Study Date, and an Accession Number. The label is NIH's
(1 abnormal, 0 normal). Nothing here is committed: the files are written under the caller's folder.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import generate_uid

from support.dicom_factory import make_cxr

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "nih-matched"
Device = tuple[str, str, str]  # Manufacturer, Manufacturer's Model Name, Station Name
DEFAULT_DEVICE: Device = ("Acme Medical", "DR-1000", "XR-ROOM-1")


@dataclass(frozen=True)
class RealStudy:
    path: Path  # the DICOM file
    study_uid: str
    sop_uid: str
    accession: str
    label: int  # 1 abnormal, 0 normal (NIH's label)
    view: str  # PA or AP
    image_id: str  # the NIH file name
    device: Device
    study_date: str  # YYYYMMDD


def nih_matched_rows(split: str | None = "test") -> list[dict[str, str]]:
    """nih-matched's labels.csv rows (of one split, or all), in file order."""
    with (DATA / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if split is None or r["split"] == split]


def pick(n: int, *, split: str | None = "test", seed: int = 0, offset: int = 0) -> list[dict[str, str]]:
    """``n`` rows, half normal and half abnormal (abnormal first on odd n), in a seeded order; ``offset`` skips
    that many per class first, so that two calls with different offsets never share an image."""
    rows = nih_matched_rows(split)
    rng = np.random.default_rng(seed)
    by_label = {lab: [r for r in rows if r["label"] == lab] for lab in ("0", "1")}
    for lab in by_label:
        order = rng.permutation(len(by_label[lab]))
        by_label[lab] = [by_label[lab][i] for i in order]
    n_abn = (n + 1) // 2
    chosen = by_label["1"][offset : offset + n_abn] + by_label["0"][offset : offset + n - n_abn]
    if len(chosen) < n:
        raise ValueError(f"nih-matched {split or 'all'} has too few images for {n} studies at offset {offset}")
    return [chosen[i] for i in rng.permutation(len(chosen))]  # labels mixed over dates and devices


def make_real_studies(
    folder: str | Path,
    n: int,
    *,
    split: str | None = "test",
    seed: int = 0,
    offset: int = 0,
    devices: Sequence[Device] = (DEFAULT_DEVICE,),
    start_date: str = "20261101",
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    accession_prefix: str = "RS",
) -> list[RealStudy]:
    """``n`` one-image studies from nih-matched (balanced normal/abnormal), written to ``folder/<accession>.dcm``.

    Devices are assigned in turn, and study dates step one day per study from ``start_date``. ``transform``
    changes the picture (uint8 -> uint8) before it is stored, e.g. a gamma, as a new device's processing would."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = date(int(start_date[:4]), int(start_date[4:6]), int(start_date[6:]))
    out = []
    for i, row in enumerate(pick(n, split=split, seed=seed, offset=offset)):
        pixels = cv2.imread(str(DATA / row["path"]), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise FileNotFoundError(DATA / row["path"])
        if transform is not None:
            pixels = np.asarray(transform(pixels), dtype=np.uint8)
        device = devices[i % len(devices)]
        accession = f"{accession_prefix}{seed:02d}{offset + i:05d}"[:16]
        study_date = (first + timedelta(days=i)).strftime("%Y%m%d")
        view = row["view_position"].strip().upper()
        study_uid, sop_uid = generate_uid(), generate_uid()
        path = folder / f"{accession}.dcm"
        make_cxr(
            path,
            view=view,
            bits_stored=8,
            pixels=pixels,
            study_uid=study_uid,
            sop_uid=sop_uid,
            patient_id=f"NIH{row['patient_id']}",
            patient_name=f"NIH^{row['patient_id']}",
            window=(128, 256),
            AccessionNumber=accession,
            StudyDate=study_date,
            SeriesDate=study_date,
            ContentDate=study_date,
            Manufacturer=device[0],
            ManufacturerModelName=device[1],
            StationName=device[2],
            PatientAge=f"{int(row['age']):03d}Y" if row.get("age", "").isdigit() else None,
            PatientBirthDate=None,
        )
        out.append(
            RealStudy(path, study_uid, sop_uid, accession, int(row["label"]), view, row["image"], device, study_date)
        )
    return out


def gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    """A gamma applied to 8-bit pixels (g < 1 brightens, g > 1 darkens)."""
    lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lambda pixels: lut[pixels]


def write_labels(studies: Sequence[RealStudy], path: str | Path, key: str = "accession_number") -> Path:
    """A site's ground-truth CSV: ``key`` (accession_number or study_uid) and label (normal/abnormal)."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([key, "label"])
        for s in studies:
            w.writerow([s.accession if key == "accession_number" else s.study_uid, "abnormal" if s.label else "normal"])
    return path


def write_folder_labels(studies: Sequence[RealStudy], path: str | Path) -> Path:
    """The same films as ``dicom-node evaluate --layout folder`` reads them: image (file name in the studies'
    folder), label, view, batch (the device's station)."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "view", "batch"])
        for s in studies:
            w.writerow([s.path.name, s.label, s.view, s.device[2]])
    return path
