"""Who made an output object: the node's identity and the provenance of the models.

:class:`NodeIdentity` is built once by the composition root (from the config and the loaded model
files) and handed to the SR / SC / GSPS encoders. The Contributing Equipment item's Device UID is
derived from the weights' sha256, so a new model file gives a new Device UID and the same file
always gives the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from highdicom import ContributingEquipment
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.errors import EncodingError
from dicom_node.outputs.uids import uid_from_hex
from inference.types import ModelInfo, models_summary

__all__ = ["NodeIdentity", "model_device_uid", "contributing_equipment"]


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
    # The model pair's site validation, an SR Algorithm Parameter: "site-validated 2026-12-01, n=412" or "no site
    # validation" (the worker looks it up before each job); "" leaves the parameter out.
    site_validation: str = ""


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
        return uid_from_hex(models[0].sha256.lower())
    joined = "\n".join(f"{m.name}:{m.sha256.lower()}" for m in models)
    return uid_from_hex(hashlib.sha256(joined.encode()).hexdigest())


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
    item.DeviceUID = model_device_uid(models)  # highdicom's ContributingEquipment has no Device UID parameter
    return item
