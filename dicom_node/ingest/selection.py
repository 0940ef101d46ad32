"""Which received instances the node analyses: frontal (PA/AP) chest CR/DX images, by default.

Everything else is stored, marked skipped with a human-readable reason, and left alone.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_node.config import SelectionConfig

OWN_MANUFACTURER = "dicom-node"  # Manufacturer written into every object this node makes


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


def select(ds: Dataset, rules: SelectionConfig, own_output: bool = False) -> tuple[bool, str | None]:
    """Return (eligible, skip reason)."""
    if own_output or _get(ds, "Manufacturer") == OWN_MANUFACTURER.upper():
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
    frames = ds.get("NumberOfFrames", 1) or 1
    if int(frames) > 1:
        return False, f"multi-frame image ({frames} frames)"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return False, "colour image (SamplesPerPixel != 1)"
    return True, None
