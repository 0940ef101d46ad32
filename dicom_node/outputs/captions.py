"""The words an output shows a reader on the image: the disclaimer (led by URGENT and why for an urgent study)
and the one-line summary of a prediction.

Burned into the Secondary Capture's banner and bar, and written as the GSPS's top-left text object; an urgent
study's Secondary Capture also says it in its header (Image Comments, :func:`urgent_comment`).
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.outputs.codes import finding_label
from dicom_node.outputs.verdict import HEADLINES, image_verdict
from inference.types import Finding, Prediction

__all__ = ["BANNER_TEXT", "URGENT", "banner_text", "finding_caption", "summary_text", "urgent_comment"]

BANNER_TEXT = "AI result - not for primary diagnosis"
URGENT = "urgent"  # the study priority that the outputs flag (dicom_node.work.priority); any other is routine


def banner_text(priority: str = "routine", reasons: Sequence[str] = ()) -> str:
    """The banner: the disclaimer, led for an urgent study by "URGENT" and why, e.g.
    "URGENT - suspected Pneumothorax (0.72) - AI result - not for primary diagnosis"."""
    if priority != URGENT:
        return BANNER_TEXT
    why = "; ".join(reasons)
    return f"URGENT - {why} - {BANNER_TEXT}" if why else f"URGENT - {BANNER_TEXT}"


def urgent_comment(priority: str, reasons: Sequence[str]) -> str | None:
    """What an urgent study's Secondary Capture says in its header ("URGENT: ..."); None for a routine one."""
    if priority != URGENT:
        return None
    return f"URGENT: {'; '.join(reasons)}" if reasons else "URGENT"


def summary_text(prediction: Prediction) -> str:
    """One image's result in the words of the study verdict (:mod:`dicom_node.outputs.verdict`) and with the SR's
    P(abnormal): "Abnormal, P(abnormal) = 0.85, 2 findings marked" (or "no finding marked"), "No abnormality,
    P(abnormal) = 0.07", "Not analysable: <reason>"."""
    headline = HEADLINES[image_verdict(prediction)]
    if prediction.not_analysable:
        return f"{headline}: {prediction.not_analysable}"
    p = f"P(abnormal) = {1.0 - prediction.p_no_finding:.2f}"
    if not prediction.abnormal:
        return f"{headline}, {p}"
    n = len(prediction.findings)
    return f"{headline}, {p}, " + (f"{n} finding{'s' if n != 1 else ''} marked" if n else "no finding marked")


def finding_caption(finding: Finding) -> str:
    """A box's label, as the SC, the GSPS and the SR's region comment write it: "Cardiomegaly 0.66"."""
    return f"{finding_label(finding.class_id)} {finding.score:.2f}"
