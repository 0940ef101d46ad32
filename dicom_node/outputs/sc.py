"""The AI result as a Secondary Capture: the radiograph with boxes, labels and scores burned in.

RGB, 8 bits, the source image (as displayed: VOI applied, MONOCHROME1 inverted) with

- a red banner above it: "AI result - not for primary diagnosis"; for an urgent study (:mod:`dicom_node.work.priority`)
  in yellow, led by "URGENT" and why ("URGENT - suspected Pneumothorax (0.72) - AI result - ..."), which the
  header's Image Comments also say ("URGENT: suspected Pneumothorax (0.72)"),
- each finding's box in its class colour with "<label> <score>" on a filled tag,
- a summary bar below it: "Abnormal (p=0.91), 2 findings" / "No finding (p=0.93)".

The banner and bar are added rows (the image itself is not covered), so box coordinates in the SC
are the source coordinates shifted down by the banner height. Built with highdicom's ``SCImage``
(same patient and study as the source, a new series); what it cannot be given (Image Type
DERIVED\\SECONDARY, Burned In Annotation YES, Source Image Sequence -> the source, Conversion Type WSD,
...) is set in one step after it, :func:`_after_construction`.
Text uses OpenCV's built-in Hershey font (no font files).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import EncodingError
from dicom_node.outputs.captions import banner_text, summary_text, urgent_comment
from dicom_node.outputs.codes import finding_label
from dicom_node.outputs.equipment import NodeIdentity, contributing_equipment
from dicom_node.outputs.library_messages import library_error, no_phi_warnings
from dicom_node.outputs.series import SERIES_DESCRIPTION, series_dates
from dicom_node.outputs.source import copy_body_part, patient_orientation, require_source_image, source_header
from inference.types import Prediction

__all__ = ["build_sc", "render_overlay"]

BANNER_RGB = (176, 0, 0)
URGENT_TEXT_RGB = (255, 255, 0)  # an urgent study's banner text: yellow on the red banner
BAR_RGB = (32, 32, 32)
FONT = cv2.FONT_HERSHEY_SIMPLEX
# One colour per VinDr-CXR class id (RGB), distinct on a grey radiograph.
PALETTE = [
    (255, 64, 64),
    (255, 160, 0),
    (255, 255, 0),
    (0, 230, 0),
    (0, 200, 255),
    (64, 128, 255),
    (200, 64, 255),
    (255, 64, 200),
    (255, 128, 128),
    (128, 255, 128),
    (128, 200, 255),
    (255, 200, 128),
    (0, 255, 180),
    (180, 255, 0),
]


def _fit_scale(text: str, max_w: float, max_h: float, thickness: int) -> float:
    (w, h), base = cv2.getTextSize(text, FONT, 1.0, thickness)
    return max(0.3, min(max_w / max(w, 1), max_h / max(h + base, 1)))


def _centered_text(img: np.ndarray, text: str, y0: int, y1: int, color=(255, 255, 255)) -> None:
    height = y1 - y0
    thickness = max(1, height // 18)
    scale = _fit_scale(text, img.shape[1] * 0.94, height * 0.62, thickness)
    (w, h), base = cv2.getTextSize(text, FONT, scale, thickness)
    x = max(0, (img.shape[1] - w) // 2)
    y = y0 + (height + h) // 2 - base // 2
    cv2.putText(img, text, (x, y), FONT, scale, color, thickness, cv2.LINE_AA)


def render_overlay(
    image01: np.ndarray, prediction: Prediction, priority: str = "routine", reasons: Sequence[str] = ()
) -> tuple[np.ndarray, int]:
    """RGB uint8 picture with banner, boxes, labels and summary; returns (rgb, banner_height). An urgent study's
    banner says URGENT and why (``reasons``), in yellow; its size, and so every box's place, stays the same."""
    img = np.asarray(image01, dtype=np.float32)
    if img.ndim != 2 or not np.isfinite(img).all():
        raise EncodingError(f"expected a finite 2-D image in [0, 1], got shape {img.shape}")
    rows, cols = img.shape
    grey = np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    band = max(28, int(round(min(rows, cols) * 0.06)))
    canvas = np.zeros((rows + 2 * band, cols, 3), dtype=np.uint8)
    canvas[band : band + rows] = grey[..., None]
    canvas[:band] = BANNER_RGB
    canvas[band + rows :] = BAR_RGB
    urgent = urgent_comment(priority, reasons) is not None
    _centered_text(canvas, banner_text(priority, reasons), 0, band, URGENT_TEXT_RGB if urgent else (255, 255, 255))
    _centered_text(canvas, summary_text(prediction), band + rows, rows + 2 * band)

    line = max(2, int(round(min(rows, cols) / 350)))
    tag_h = max(14, int(round(min(rows, cols) * 0.028)))
    for f in sorted(prediction.findings, key=lambda f: f.score):  # strongest drawn last (on top)
        color = PALETTE[int(f.class_id) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in f.box)
        x0, x1 = sorted((min(max(x0, 0), cols - 1), min(max(x1, 0), cols - 1)))
        y0, y1 = sorted((min(max(y0, 0), rows - 1), min(max(y1, 0), rows - 1)))
        p0, p1 = (int(round(x0)), int(round(y0)) + band), (int(round(x1)), int(round(y1)) + band)
        cv2.rectangle(canvas, p0, p1, color, line, cv2.LINE_AA)
        text = f"{finding_label(f.class_id)} {f.score:.2f}"
        thickness = max(1, tag_h // 14)
        scale = _fit_scale(text, cols, tag_h * 0.75, thickness)
        (w, h), base = cv2.getTextSize(text, FONT, scale, thickness)
        tx = min(p0[0], max(0, cols - w - 4))
        ty = p0[1] - 2 if p0[1] - tag_h >= band else min(p0[1] + tag_h, band + rows - 2)
        cv2.rectangle(canvas, (tx, ty - h - base), (tx + w + 4, ty + base // 2), color, cv2.FILLED)
        cv2.putText(canvas, text, (tx + 2, ty - base // 2), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas, band


def _sc_image(
    source: Dataset,
    rgb: np.ndarray,
    models,
    *,
    series_uid,
    sop_uid,
    series_number,
    instance_number,
    identity: NodeIdentity,
) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_header(source),
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        patient_orientation=("L", "F"),  # replaced after construction: SCImage takes only one letter each
        contributing_equipment=[contributing_equipment(identity, models)] if models else None,
        series_description=SERIES_DESCRIPTION["sc"],
        manufacturer_model_name=identity.model_name[:64],
        software_versions=identity.software_version,
        institution_name=identity.institution,
        **series_dates(),
    )


def build_sc(
    source: Dataset,
    image01: np.ndarray,
    prediction: Prediction,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    identity: NodeIdentity,
    priority: str = "routine",
    priority_reasons: Sequence[str] = (),
) -> Dataset:
    """Secondary Capture of ``image01`` (the source as decoded by :func:`dicom_node.imaging.pixels.decode_image`: full
    size, or a smaller JPEG 2000 resolution level) with ``prediction`` (on image01's pixels) burned in. ``priority``
    "urgent" (the study's, with ``priority_reasons``) flags it in the banner and the Image Comments.
    Raises :class:`EncodingError`."""
    require_source_image(source)
    shape = tuple(np.shape(image01))
    if len(shape) != 2 or shape[0] > int(source.Rows) or shape[1] > int(source.Columns):
        raise EncodingError(f"image shape {shape} does not fit the source ({source.Rows}x{source.Columns})")
    if tuple(prediction.image_size) != shape:
        raise EncodingError("prediction image size does not match the image: boxes would be misplaced")
    rgb, _band = render_overlay(image01, prediction, priority, priority_reasons)
    orientation = patient_orientation(source)
    models = tuple(prediction.models) or tuple(identity.models)
    try:
        with no_phi_warnings():
            sc = _sc_image(
                source,
                rgb,
                models,
                series_uid=series_uid,
                sop_uid=sop_uid,
                series_number=series_number,
                instance_number=instance_number,
                identity=identity,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"cannot build the Secondary Capture: {library_error(exc)}") from exc
    _after_construction(sc, source, orientation)
    comment = urgent_comment(priority, priority_reasons)
    if comment is not None:
        sc.ImageComments = comment[:10240]
    return sc


def _after_construction(sc: Dataset, source: Dataset, orientation: tuple[str, str] | None) -> None:
    """What highdicom's ``SCImage`` cannot be given, set on the built image: the one edit after construction.

    - Patient Orientation as the source has it, or empty (Type 2C: unknown, not invented) when it has no valid
      one: for the PATIENT coordinate system (the other, SLIDE, is for microscopy) ``SCImage`` requires an
      orientation of one letter per direction, so it is given L\\F, and an oblique one (``P\\FL``) or none is
      set here.
    - Body Part Examined from the source, or an empty Laterality (:func:`copy_body_part`): ``SCImage`` takes no
      body part, and a laterality only as R or L.
    - Image Type DERIVED\\SECONDARY: ``SCImage`` writes DERIVED\\SECONDARY\\OTHER.
    - Conversion Type WSD (workstation): ``SCImage`` writes DI (digitized image).
    - Burned In Annotation YES, Recognizable Visual Features NO, Derivation Description, Source Image Sequence
      (the source) and, for a lossy source, Lossy Image Compression with its ratio and method: ``SCImage`` has
      no parameters for them.

    Series Date/Time are not set here: they go to the constructor (:func:`series_dates`). View Position is
    deliberately not copied: the SC is not a radiograph to analyse.
    """
    sc.PatientOrientation = list(orientation) if orientation else ""
    copy_body_part(sc, source)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = (
        "AI findings burned in; banner and summary rows added above and below the source image"
    )[:1024]
    src_item = Dataset()
    src_item.ReferencedSOPClassUID = source.SOPClassUID
    src_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [src_item]
    if str(source.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in source:
                setattr(sc, kw, source[kw].value)
