"""Who made an output object: the node's identity and the provenance of the models.

:class:`NodeIdentity` is built once by the composition root (from the config and the loaded model
files) and handed to the SR / SC / GSPS encoders. The Contributing Equipment item's Device UID is
derived from the weights' sha256, so a new model file gives a new Device UID and the same file
always gives the same one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from highdicom import ContributingEquipment
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.errors import EncodingError
from inference.types import ModelInfo, Prediction

__all__ = [
    "SERIES_DESCRIPTION",
    "series_date_time",
    "NodeIdentity",
    "model_device_uid",
    "contributing_equipment",
    "derived_uid",
    "models_summary",
    "check_same_study",
    "require_source_image",
    "check_geometry",
    "source_header",
    "library_error",
    "no_phi_warnings",
    "copy_body_part",
]

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


# One Series Description per output kind, the distinguishing words first: viewers cut the text short, and three
# rows reading "AI result - not for primar..." told nobody which is which.
SERIES_DESCRIPTION = {
    "sr": "AI findings report (SR) - not for primary diagnosis",
    "sc": "AI overlay image (SC) - not for primary diagnosis",
    "gsps": "AI boxes to toggle (PR) - not for primary diagnosis",
}
assert all(len(v) <= 64 for v in SERIES_DESCRIPTION.values())  # LO


def series_date_time(ds: Dataset) -> None:
    """Series Date/Time of an output (Type 3, but viewers and PACS file series under them) = its content
    date/time, which highdicom sets when the object is made."""
    date = ds.get("ContentDate") or datetime.now().strftime("%Y%m%d")
    time_ = ds.get("ContentTime") or datetime.now().strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = date, time_


@dataclass(frozen=True)
class NodeIdentity:
    """The node as the author of its output objects (General Equipment, observer, algorithm)."""

    device_observer_uid: str  # stable UID of this node installation
    software_version: str  # the dicom-node package version
    manufacturer: str = "dicom-node"
    model_name: str = "dicom-node chest X-ray AI"
    algorithm_name: str = "dicom-node CXR CLAHE-classifier-YOLOv8"
    institution: str | None = None
    station_name: str | None = None  # e.g. the node's AE title
    device_serial_number: str = "0"  # required by the GSPS IOD (Type 1 in highdicom)
    models: tuple[ModelInfo, ...] = field(default_factory=tuple)


def _uid_from_hex(hex_digest: str) -> str:
    return "2.25." + str(int(hex_digest[:32], 16))


def model_device_uid(models: Iterable[ModelInfo]) -> str:
    """``2.25.<int of the first 32 hex digits>`` of the weights' sha256 (one model) or of the
    sha256 over ``name:sha256`` lines (several models, sorted by name)."""
    models = sorted(models, key=lambda m: m.name)
    if not models:
        raise EncodingError("no model provenance: cannot derive the Contributing Equipment Device UID")
    for m in models:
        if len(m.sha256) < 32 or any(c not in "0123456789abcdefABCDEF" for c in m.sha256):
            raise EncodingError(f"model {m.name!r}: sha256 {m.sha256!r} is not a hex digest")
    if len(models) == 1:
        return _uid_from_hex(models[0].sha256.lower())
    joined = "\n".join(f"{m.name}:{m.sha256.lower()}" for m in models)
    return _uid_from_hex(hashlib.sha256(joined.encode()).hexdigest())


def models_summary(models: Iterable[ModelInfo]) -> str:
    """``classifier efficientnet_b0 1.0.0; detector yolov8n 1.2.0`` (for version/description text)."""
    return "; ".join(f"{m.name} {m.architecture} {m.version}" for m in models)


def contributing_equipment(identity: NodeIdentity, models: tuple[ModelInfo, ...]) -> Dataset:
    """One Contributing Equipment Sequence item (Processing Equipment) for the AI pipeline, with
    Software Versions per model and a Device UID that changes with the weights."""
    versions = [f"{m.name}:{m.architecture}:{m.version}" for m in models] or [identity.software_version]
    item = ContributingEquipment(
        manufacturer=identity.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=identity.model_name,
        software_versions=[identity.software_version, *versions],
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution,
        station_name=identity.station_name,
        contribution_description=("AI analysis: " + models_summary(models))[:1024],
    )
    item.DeviceUID = model_device_uid(models)
    return item


def derived_uid(base_uid: str, *parts: object) -> str:
    """A deterministic UID from an output's SOP Instance UID and a purpose (tracking UIDs, ...)."""
    joined = "\n".join([str(base_uid), *map(str, parts)])
    return _uid_from_hex(hashlib.sha256(joined.encode()).hexdigest())


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


def check_geometry(ds: Dataset, pred: Prediction) -> None:
    """The prediction's boxes must be in the source's pixels (see :meth:`Prediction.rescaled`)."""
    size = (int(ds.Rows), int(ds.Columns))
    if tuple(pred.image_size) != size:
        raise EncodingError(
            f"prediction was made on a {pred.image_size[0]}x{pred.image_size[1]} image but the source "
            f"is {size[0]}x{size[1]}: boxes would not match the image"
        )


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


def library_error(exc: BaseException) -> str:
    """A library's exception without its message (which can quote a header value, i.e. patient data): its type
    and the function that raised it, for logs and job reasons."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        where = f"{tb.tb_frame.f_code.co_name} ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]})"
        tb = tb.tb_next
    return f"{type(exc).__name__} in {where}" if where else type(exc).__name__


@contextlib.contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence library warnings that quote patient data (highdicom's person-name check prints the
    name) while an output object is built: no PHI in logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        yield


def copy_body_part(out: Dataset, source: Dataset) -> None:
    """General Series: Body Part Examined from the source, so that Laterality (Type 2C, paired
    body parts only) may stay absent for a chest; without a body part, Laterality is left empty
    (unknown) rather than invented."""
    if source.get("BodyPartExamined"):
        out.BodyPartExamined = source.BodyPartExamined
    elif "Laterality" not in out:
        out.Laterality = ""
