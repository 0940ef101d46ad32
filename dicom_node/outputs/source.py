"""What an output takes from its source image: checks that it can, and the header copy the encoders build from.

- :func:`require_source_image` and :func:`check_same_study`: the source(s) have what an output refers to;
- :func:`source_header`: a cleaned copy of the source's header (without pixel data) that highdicom copies patient
  and study from;
- :func:`copy_body_part`: General Series' Body Part Examined (or an empty Laterality), set on the built output;
- :func:`patient_orientation`: the source's Patient Orientation when it is a valid one.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable
from datetime import datetime

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

from dicom_node.errors import EncodingError

__all__ = ["check_same_study", "require_source_image", "source_header", "copy_body_part", "patient_orientation"]

_AXES = ("AP", "RL", "HF")

# Type 2 patient/study attributes that highdicom reads from a source; real files lack some of them.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def check_same_study(sources: Iterable[Dataset]) -> list[Dataset]:
    """All sources must share patient and study; returns them as a list."""
    sources = list(sources)
    if not sources:
        raise EncodingError("no source image given")
    first = sources[0]
    require_source_image(first)
    for ds in sources[1:]:
        if ds.get("StudyInstanceUID") != first.StudyInstanceUID:
            raise EncodingError("all source images must belong to the same study")
        if str(ds.get("PatientID", "")) != str(first.get("PatientID", "")):
            raise EncodingError("all source images must belong to the same patient")
    return sources


def require_source_image(ds: Dataset) -> None:
    """An output refers to its source by study, class and instance UID and draws on its rows x columns."""
    for attr in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        if not ds.get(attr):
            raise EncodingError(f"source image has no {attr}")


def source_header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data that every encoder can copy from: ``ds`` is untouched.

    Real headers are often not quite valid, and one odd value must not cost the radiologist the result:
    - missing Type 2 patient/study attributes are present and empty ("unknown");
    - dates, times and ages that do not parse are emptied (Type 2 "unknown"), never guessed;
    - a multi-valued name keeps its first value (the outputs' names have one);
    - the character set is kept when it is a defined term (a first value left empty, the default repertoire
      of an ISO 2022 set, is written out as "ISO 2022 IR 6"); an unknown or empty one with non-ASCII text is
      decoded as well as it can be and written as UTF-8 (ISO_IR 192).
    """
    header = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0:
            header.add(copy.deepcopy(elem) if elem.VR == "SQ" else copy.copy(elem))
    _character_set(header)
    for keyword in _CHECKED:
        if keyword in header:
            _clean_value(header, keyword)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_AS = re.compile(r"\d{3}[DWMY]")
_CHECKED = (
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "ContentDate",
    "AcquisitionDate",
    "StudyTime",
    "SeriesTime",
    "ContentTime",
    "AcquisitionTime",
    "PatientAge",
    "PatientName",
    "ReferringPhysicianName",
)


def _valid_date(text: str) -> bool:
    if not _DA.fullmatch(text):
        return False
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _clean_value(header: Dataset, keyword: str) -> None:
    elem = header[keyword]
    if elem.VR == "PN":
        if elem.VM > 1:
            elem.value = elem.value[0]
        return
    value = elem.value
    text = (value[0] if elem.VM > 1 else value) if value is not None else ""
    text = str(text).strip()
    if elem.VR == "DA":
        ok = _valid_date(text)
    elif elem.VR in ("TM", "AS"):
        ok = bool((_TM if elem.VR == "TM" else _AS).fullmatch(text))
    else:
        ok = True
    if text and not ok:
        elem.value = ""
    elif elem.VM > 1:
        elem.value = text


def _character_set(header: Dataset) -> None:
    raw = header.get("SpecificCharacterSet")
    if raw is None:
        return
    values = [str(v).strip() for v in ([raw] if isinstance(raw, str) else raw)]
    if values and all(v in python_encoding for v in values) and any(values):
        if values[0] == "" and len(values) > 1:
            values[0] = "ISO 2022 IR 6"
        if len(values) == 1 and values[0].startswith("ISO 2022") and values[0] != "ISO 2022 IR 6":
            values = ["ISO 2022 IR 6", values[0]]
        header.SpecificCharacterSet = values if len(values) > 1 else values[0]
        return
    with warnings.catch_warnings():  # pydicom warns about the unknown term, quoting no patient data
        warnings.simplefilter("ignore")
        header.decode()  # with pydicom's fallbacks for unknown terms
    del header.SpecificCharacterSet
    text = [str(e.value) for e in header if e.VR in _TEXT_VRS and e.value not in (None, "")]
    if any(not t.isascii() for t in text):
        header.SpecificCharacterSet = "ISO_IR 192"


_TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")


def copy_body_part(out: Dataset, source: Dataset) -> None:
    """General Series: Body Part Examined from the source, so that Laterality (Type 2C, paired
    body parts only) may stay absent for a chest; without a body part, Laterality is left empty
    (unknown) rather than invented.

    Set on the built output: highdicom's constructors take no body part, and take a laterality only as
    R or L (an empty, unknown one they refuse)."""
    if source.get("BodyPartExamined"):
        out.BodyPartExamined = source.BodyPartExamined
    elif "Laterality" not in out:
        out.Laterality = ""


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) as (row direction, column direction) when valid, else None: two
    values, each of 1 to 3 letters among A/P, R/L, H/F with at most one per axis, the first (principal) letters of
    the two on different axes. Oblique values such as ``P\\FL`` are valid."""
    value = ds.get("PatientOrientation")
    if isinstance(value, (str, bytes)) or value is None or len(value) != 2:  # one value ("LF") is not two
        return None
    row, col = (str(v).strip().upper() for v in value)
    if not (_direction(row) and _direction(col)):
        return None
    return (row, col) if _axis(row[0]) != _axis(col[0]) else None


def _direction(value: str) -> bool:
    return (
        0 < len(value) <= 3
        and all(_axis(c) is not None for c in value)
        and all(sum(c in axis for c in value) <= 1 for axis in _AXES)
    )


def _axis(letter: str) -> str | None:
    return next((axis for axis in _AXES if letter in axis), None)
