"""Which received instances the node analyses: frontal (PA/AP) chest CR/DX images of adults, by default.

Everything else is stored, marked skipped with a human-readable reason, and left alone. The age gate is the
models' intended use (trained on adult films): a patient known to be younger than
``selection.min_patient_age_years`` is skipped; an image that says nothing about the age is analysed.
"""

from __future__ import annotations

import re
from datetime import date

from pydicom.dataset import Dataset

from dicom_node.config import SelectionConfig


def _get(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str):  # multi-valued: take the first
        value = value[0] if len(value) else ""
    return str(value).strip().upper()


def header_fields(ds: Dataset) -> dict[str, str]:
    return {
        "modality": _get(ds, "Modality"),
        "body_part": _get(ds, "BodyPartExamined"),
        "view_position": _get(ds, "ViewPosition"),
    }


def device_fields(ds: Dataset) -> dict[str, str]:
    """The acquiring device, the study date and the accession number, as the header gives them (at most 64
    characters; "" when absent): site validation and drift watching group results by them."""
    out = {}
    for key, keyword in (
        ("manufacturer", "Manufacturer"),
        ("model_name", "ManufacturerModelName"),
        ("station_name", "StationName"),
        ("study_date", "StudyDate"),
        ("accession_number", "AccessionNumber"),
    ):
        out[key] = _raw_text(ds, keyword)[: 8 if key == "study_date" else 64]
    return out


_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _raw_text(ds: Dataset, keyword: str) -> str:
    """An element's text as received, without pydicom converting it: its validation would log an invalid
    value (a birth date is patient data) before we could judge it ourselves."""
    elem = ds.get_item(keyword)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return str(value or "").strip()


def _date(text: str) -> date | None:
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """The patient's age in years at the study: Patient's Age (nnnD/W/M/Y), else Patient's Birth Date and
    the Study (or Content, Acquisition) Date. None when the header does not say, or says nonsense."""
    age = _raw_text(ds, "PatientAge").upper()
    m = re.fullmatch(r"(\d{3})([DWMY])", age)
    if m:
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]
    born = _date(_raw_text(ds, "PatientBirthDate"))
    when = next((d for k in ("StudyDate", "ContentDate", "AcquisitionDate") if (d := _date(_raw_text(ds, k)))), None)
    if born is None or when is None or when < born:
        return None
    return (when - born).days / 365.25


def select(ds: Dataset, rules: SelectionConfig, own_output: bool = False) -> tuple[bool, str | None]:
    """Return (eligible, skip reason)."""
    # What only the node knows decides, never a string anyone may write: the store handler looks the SOP Instance
    # UID up among the results the node made (its outputs are SR, SC and PR objects, which the modality rule
    # skips anyway). A radiograph whose Manufacturer happens to say "dicom-node" is analysed like any other.
    if own_output:
        return False, "output of this node (ignored to avoid a routing loop)"
    f = header_fields(ds)
    if f["modality"] not in {m.upper() for m in rules.modalities}:
        return False, f"modality {f['modality'] or '(none)'} is not one of {', '.join(rules.modalities)}"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return False, "no pixel data"
    if f["body_part"]:
        if f["body_part"] not in {b.upper() for b in rules.body_parts}:
            return False, f"body part {f['body_part']} is not a chest ({', '.join(rules.body_parts)})"
    elif not rules.allow_missing_body_part:
        return False, "body part examined is missing"
    if f["view_position"]:
        if f["view_position"] not in {v.upper() for v in rules.view_positions}:
            return False, f"view position {f['view_position']} is not frontal ({', '.join(rules.view_positions)})"
    elif not rules.allow_missing_view_position:
        return False, "view position is missing (set selection.allow_missing_view_position to analyse such images)"
    if rules.min_patient_age_years is not None:
        age = patient_age_years(ds)
        if age is not None and age < rules.min_patient_age_years:
            return False, (
                f"patient age {age:.1f} years is below selection.min_patient_age_years "
                f"({rules.min_patient_age_years:g}): the models are for adults"
            )
    frames = ds.get("NumberOfFrames", 1) or 1
    if int(frames) > 1:
        return False, f"multi-frame image ({frames} frames)"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return False, "colour image (SamplesPerPixel != 1)"
    return True, None
