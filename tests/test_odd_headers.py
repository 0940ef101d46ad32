"""Ordinary odd headers must not cost the radiologist the result: the SR, SC and GSPS are built from real-world
headers with character sets, multi-valued names and unparsable dates, keep what is valid, empty what is not, and
never put a header value into a log line or a job's failure reason."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.library_messages import library_error
from dicom_node.outputs.sc import build_sc
from dicom_node.outputs.source import source_header
from dicom_node.outputs.sr import build_sr
from dicom_node.outputs.validate import dciodvfy
from inference.types import Finding, Prediction
from support.dicom_factory import make_cxr
from support.provenance import IDENTITY, MODELS

PRED = Prediction(
    0.9, 0.1, (Finding(3, "Cardiomegaly", 0.8, (40.0, 80.0, 200.0, 220.0), 0.8),), "soft", MODELS, (256, 256)
)
JAPANESE = "ヤマダ^タロウ=山田^太郎=やまだ^たろう"


def outputs(src, tmp_path) -> dict[str, pydicom.Dataset]:
    """SR, SC and GSPS for ``src`` (a file, read back as the worker reads it), written and read back."""
    kw = dict(series_number=1, instance_number=1, identity=IDENTITY)
    built = {
        "sr": build_sr([(src, PRED)], series_uid=generate_uid(), sop_uid=generate_uid(), **kw),
        "sc": build_sc(
            src, np.full((256, 256), 0.5, np.float32), PRED, series_uid=generate_uid(), sop_uid=generate_uid(), **kw
        ),
        "gsps": build_gsps(src, PRED, series_uid=generate_uid(), sop_uid=generate_uid(), **kw),
    }
    out = {}
    for name, ds in built.items():
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        out[name] = pydicom.dcmread(tmp_path / f"{name}.dcm")
    return out


def written(tmp_path, **kw) -> pydicom.Dataset:
    make_cxr(tmp_path / "src.dcm", **kw)
    return pydicom.dcmread(tmp_path / "src.dcm")


def test_a_japanese_data_set_keeps_its_character_set_and_names(tmp_path):
    src = written(tmp_path, SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName=JAPANESE)
    for name, ds in outputs(src, tmp_path).items():
        assert str(ds.PatientName) == JAPANESE, name
        assert list(ds.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"], name
    # dciodvfy counts the ISO 2022 escape sequences against the 64-character limit of a name: its only complaint
    errors = [
        e for e in dciodvfy(tmp_path / "sr.dcm").errors if "Patient's Name" not in e and "invalid data values" not in e
    ]
    assert errors == []


@pytest.mark.parametrize("charset", ["ISO_IR 999", ""])
def test_an_unknown_or_empty_character_set_gives_utf8_outputs(tmp_path, charset):
    src = written(tmp_path, SpecificCharacterSet=charset, PatientName="Muller^Jorg")
    for name, ds in outputs(src, tmp_path).items():
        assert str(ds.PatientName) == "Muller^Jorg", name
        assert ds.get("SpecificCharacterSet") in (None, "ISO_IR 192"), name


def test_utf8_names_survive(tmp_path):
    src = written(tmp_path, SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jörg")
    for name, ds in outputs(src, tmp_path).items():
        assert str(ds.PatientName) == "Müller^Jörg", name


def test_multi_valued_name_keeps_its_first_value(tmp_path):
    src = written(tmp_path, PatientName=["DOE^JANE", "ROE^JANE"])
    for name, ds in outputs(src, tmp_path).items():
        assert str(ds.PatientName) == "DOE^JANE", name


def test_unparsable_dates_and_ages_are_emptied_not_guessed(tmp_path):
    src = written(tmp_path, PatientBirthDate="19X01301", StudyDate="20261340", StudyTime="25a", PatientAge="abc")
    for name, ds in outputs(src, tmp_path).items():
        assert ds.PatientBirthDate == "" and ds.StudyDate == "", name
        assert ds.get("PatientAge", "") == "", name
    good = written(tmp_path, PatientBirthDate="19600229", StudyDate="20261130")
    for name, ds in outputs(good, tmp_path).items():
        assert (ds.PatientBirthDate, ds.StudyDate) == ("19600229", "20261130"), name


def test_the_source_is_left_untouched(tmp_path):
    src = written(tmp_path, PatientBirthDate="19X01301", PatientName=["DOE^JANE", "ROE^JANE"])
    source_header(src)
    assert src.PatientBirthDate == "19X01301" and len(src.PatientName) == 2


def test_library_errors_are_reported_without_their_message():
    def parse_date(value):
        raise ValueError(f"Unable to convert '{value}' to 'DA'")

    try:
        parse_date("CANARY-0042")
    except ValueError as exc:
        text = library_error(exc)
    assert "CANARY" not in text and text.startswith("ValueError in parse_date")
