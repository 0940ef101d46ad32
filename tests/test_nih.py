"""NIH readers on the real ../shared/datasets files; the split is by patient and deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.training.data.nih import NIH_TO_VINDR, read_nih
from inference.training.data.sample import Sample
from inference.training.data.split import split_by_patient, subsample

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
pytestmark = pytest.mark.skipif(not (DATA / "nih-bbox").is_dir(), reason="../shared/datasets not present")


@pytest.fixture(scope="module")
def samples():
    return read_nih(DATA)


def test_reader_counts_and_mapping(samples):
    ab = [s for s in samples if s.abnormal]
    assert len(ab) == 880 and len(samples) - len(ab) == 428
    assert sum(len(s.boxes) for s in ab) == 984
    assert {c for s in ab for c in s.classes} == set(NIH_TO_VINDR.values())
    assert NIH_TO_VINDR["Mass"] == NIH_TO_VINDR["Nodule"] == 8 and NIH_TO_VINDR["Pneumonia"] == 4
    for s in ab:
        for x0, y0, x1, y1 in s.boxes:
            assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert {s.view for s in samples if not s.abnormal} == {"PA", "AP"}
    assert all(s.patient_id == s.image_id[:8] for s in samples)


def test_split_is_by_patient_and_deterministic(samples):
    a = split_by_patient(samples, seed=7)
    b = split_by_patient(list(reversed(samples)), seed=7)
    assert {k: [s.image_id for s in v] for k, v in a.items()} == {k: [s.image_id for s in v] for k, v in b.items()}
    patients = {k: {s.patient_id for s in v} for k, v in a.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(v) for v in a.values()) == len(samples)
    n = len(samples)
    assert abs(len(a["train"]) / n - 0.70) < 0.03 and abs(len(a["test"]) / n - 0.15) < 0.03
    for part in a.values():  # stratified: label and view shares close to the whole set
        assert abs(sum(s.abnormal for s in part) / len(part) - 880 / 1308) < 0.05
        normals = [s for s in part if not s.abnormal]
        assert abs(sum(s.view == "AP" for s in normals) / len(normals) - 303 / 428) < 0.08
    c = split_by_patient(samples, seed=8)
    assert [s.image_id for s in c["val"]] != [s.image_id for s in a["val"]]


def test_split_keeps_a_patients_images_together():
    s = [Sample(f"p{i // 3}_{i}", Path("x"), f"p{i // 3}", abnormal=i % 2 == 0) for i in range(60)]
    parts = split_by_patient(s, seed=0)
    where = {}
    for name, part in parts.items():
        for x in part:
            assert where.setdefault(x.patient_id, name) == name
    sub = subsample(s, 10, seed=0)
    assert len(sub) == 10 and sum(x.abnormal for x in sub) == 5
