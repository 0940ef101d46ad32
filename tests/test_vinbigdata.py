"""VinBigData layout on generated files: tiny DICOMs + a train.csv with 3 readers per image."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.training.vinbigdata_export import ensure_exported, export_vinbigdata, holds_dicom
from inference.errors import DatasetError
from inference.training.data.images import load_image01
from inference.training.data.split import split_by_patient
from inference.training.data.vinbigdata import read_csv, read_vinbigdata, wbf_annotations

COLS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
NF = ("No finding", 14)
ROWS = [
    # img_a: three readers draw the same cardiomegaly; R10 also an aortic enlargement alone
    ("img_a", "Cardiomegaly", 3, "R9", 20, 30, 60, 70),
    ("img_a", "Cardiomegaly", 3, "R8", 22, 31, 62, 71),
    ("img_a", "Cardiomegaly", 3, "R10", 18, 32, 58, 69),
    ("img_a", "Aortic enlargement", 0, "R10", 70, 5, 78, 15),
    # img_b: everybody says no finding
    ("img_b", *NF, "R9", "", "", "", ""),
    ("img_b", *NF, "R8", "", "", "", ""),
    ("img_b", *NF, "R10", "", "", "", ""),
    # img_c: not read by R9; one of three readers sees an effusion
    ("img_c", "Pleural effusion", 10, "R1", 5, 40, 30, 75),
    ("img_c", *NF, "R2", "", "", "", ""),
    ("img_c", *NF, "R3", "", "", "", ""),
    # img_d: R9 sees a nodule, the two others nothing
    ("img_d", "Nodule/Mass", 8, "R9", 40, 10, 50, 20),
    ("img_d", *NF, "R5", "", "", "", ""),
    ("img_d", *NF, "R6", "", "", "", ""),
]


def write_dicom(path: Path, rows: int, cols: int, seed: int, mono1: bool = False, view: str = "PA") -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.random((rows, cols)) * 3000 + np.linspace(0, 1000, cols)[None]).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = f"SECRET-{seed}"
    ds.Modality, ds.ViewPosition = "DX", view
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def layout(tmp_path):
    dcm = tmp_path / "train"
    dcm.mkdir()
    for i, image_id in enumerate(["img_a", "img_b", "img_c", "img_d"]):
        write_dicom(dcm / f"{image_id}.dicom", rows=80, cols=100, seed=i, mono1=i == 1, view="AP" if i == 2 else "PA")
    with (tmp_path / "train.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLS)
        w.writerows(ROWS)
    return tmp_path / "train.csv", dcm


def test_dicom_folder_must_be_exported_first(layout):
    csv_path, dcm = layout
    assert holds_dicom(dcm)
    with pytest.raises(DatasetError, match="export"):
        read_vinbigdata(csv_path, dcm, "R9")


def test_r9_selection_after_export_scales_boxes(layout, tmp_path):
    csv_path, dcm = layout
    out_csv, images = export_vinbigdata(csv_path, dcm, tmp_path / "png", max_size=50)
    assert sorted(p.name for p in images.iterdir()) == ["img_a.png", "img_b.png", "img_c.png", "img_d.png"]
    assert load_image01(images / "img_a.png").shape == (40, 50)  # 80 x 100 halved
    text = out_csv.read_text()
    assert "SECRET" not in text  # patient id only hashed
    samples = {s.image_id: s for s in read_vinbigdata(out_csv, images, "R9")}
    assert sorted(samples) == ["img_a", "img_b", "img_d"]  # img_c was not read by R9
    a = samples["img_a"]
    assert a.abnormal and a.classes == (3,)
    np.testing.assert_allclose(a.boxes[0], (10, 15, 30, 35), atol=0.01)  # R9's box, halved
    assert not samples["img_b"].abnormal and samples["img_b"].boxes == ()
    assert samples["img_d"].classes == (8,) and samples["img_d"].abnormal
    assert all(s.clahe_applied and s.view == "PA" for s in samples.values())
    assert samples["img_a"].patient_id != "img_a" and len(samples["img_a"].patient_id) == 16
    # a second run reuses the PNGs and gives the same csv
    again, _ = ensure_exported(csv_path, dcm, tmp_path / "png", max_size=50)
    assert again.read_text() == text
    assert ensure_exported(out_csv, images, tmp_path / "unused") == (out_csv, images)


def test_wbf_merges_the_three_readers(layout, tmp_path):
    csv_path, dcm = layout
    out_csv, images = export_vinbigdata(csv_path, dcm, tmp_path / "png", clahe=False)  # no resize
    samples = {s.image_id: s for s in read_vinbigdata(out_csv, images, "wbf")}
    assert sorted(samples) == ["img_a", "img_b", "img_c", "img_d"]
    a = samples["img_a"]
    assert sorted(a.classes) == [0, 3]  # one fused cardiomegaly + the lone aortic box
    card = a.boxes[a.classes.index(3)]
    np.testing.assert_allclose(card, (20, 31, 60, 70), atol=0.01)  # mean of the three boxes
    assert not samples["img_a"].clahe_applied
    assert not samples["img_b"].abnormal
    assert samples["img_c"].abnormal and samples["img_c"].classes == (10,) and samples["img_c"].view == "AP"
    rows = read_csv(csv_path)
    boxes, classes, votes = wbf_annotations(rows["img_a"])
    assert sorted(zip(classes, np.round(votes, 3))) == [(0, 0.333), (3, 1.0)]
    strict = {s.image_id: s for s in read_vinbigdata(out_csv, images, "wbf", min_votes=2)}
    assert strict["img_a"].classes == (3,)
    assert not strict["img_c"].abnormal and not strict["img_d"].abnormal  # single-reader findings
    parts = split_by_patient(list(samples.values()), seed=0)
    assert sum(len(v) for v in parts.values()) == 4


def test_bad_layouts(tmp_path, layout):
    csv_path, dcm = layout
    with pytest.raises(DatasetError, match="not found"):
        read_vinbigdata(tmp_path / "nope.csv", dcm)
    out_csv, images = export_vinbigdata(csv_path, dcm, tmp_path / "png")
    with pytest.raises(DatasetError, match="R42"):
        read_vinbigdata(out_csv, images, "R42")
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,class_id\nx,3\n")
    with pytest.raises(DatasetError, match="missing columns"):
        read_vinbigdata(bad, images)
