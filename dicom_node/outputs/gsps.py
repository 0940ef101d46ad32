"""The AI result as a Grayscale Softcopy Presentation State over the original radiograph.

For viewers that do not draw SR graphics (Weasis, many PACS): one graphic layer "AI" holding, for
each finding, a closed 5-point POLYLINE in PIXEL units around its box and a text object
"<label> <score>" just above it (inside the box when there is no room), plus a text object with
the disclaimer and the study-level summary in the top-left corner. The presentation state keeps
the source's display: its Modality LUT, the VOI window the node itself used (the source's window,
or the percentile window when the source's is absent or nonsense), and Presentation LUT Shape
INVERSE for MONOCHROME1 sources (a presentation state overrides the image's photometric
interpretation), IDENTITY otherwise. Built with highdicom's ``GrayscaleSoftcopyPresentationState`` (same
patient and study, a new series); the body part, which it cannot be given, is set in one step after it,
:func:`_after_construction`.
For an urgent study (:mod:`dicom_node.work.priority`) that text leads with "URGENT" and why.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import EncodingError
from dicom_node.imaging.pixels import first_value
from dicom_node.outputs.captions import BANNER_TEXT, banner_text, summary_text
from dicom_node.outputs.codes import finding_label
from dicom_node.outputs.equipment import NodeIdentity, contributing_equipment
from dicom_node.outputs.geometry import box_polyline, check_geometry
from dicom_node.outputs.library_messages import library_error, no_phi_warnings
from dicom_node.outputs.series import SERIES_DESCRIPTION, series_dates
from dicom_node.outputs.source import copy_body_part, require_source_image, source_header
from inference.types import Prediction

__all__ = ["build_gsps", "LAYER_NAME", "CONTENT_LABEL"]

LAYER_NAME = "AI"
CONTENT_LABEL = "AI_FINDINGS"
LAYER_COLOR = hd.color.CIELabColor(97.0, -21.0, 94.0)  # yellow
LAYER_GRAYSCALE = 0xFFFF  # P-value: the brightest a grayscale display shows


def _text_box(x0: float, y0: float, x1: float, rows: int, cols: int, text: str) -> tuple[float, float, float, float]:
    """Bounding box (left, top, right, bottom) for a label at the top-left of a box, inside the image."""
    height = max(12.0, rows * 0.025)
    width = min(float(cols), max(x1 - x0, len(text) * height * 0.6))
    left = min(max(x0, 0.0), cols - width)
    top = y0 - height if y0 - height >= 0 else y0
    bottom = min(top + height, float(rows))
    return (left, max(top, 0.0), left + width, bottom)


def _annotation(
    header: Dataset, prediction: Prediction, layer: hd.pr.GraphicLayer, banner: str
) -> hd.pr.GraphicAnnotation:
    rows, cols = int(header.Rows), int(header.Columns)
    graphics, texts = [], []
    for f in sorted(prediction.findings, key=lambda f: -f.score):
        poly = box_polyline(f.box, rows, cols)
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=poly,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
        )
        label = f"{finding_label(f.class_id)} {f.score:.2f}"
        texts.append(
            hd.pr.TextObject(
                text_value=label[:1024],
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=_text_box(poly[0, 0], poly[0, 1], poly[1, 0], rows, cols, label),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    summary = f"{banner}: {summary_text(prediction)}"
    texts.append(
        hd.pr.TextObject(
            text_value=summary,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            bounding_box=(0.0, 0.0, float(cols), max(12.0, rows * 0.03)),
            text_justification=hd.pr.TextJustificationValues.LEFT,
        )
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[header], graphic_layer=layer, graphic_objects=graphics or None, text_objects=texts
    )


def build_gsps(
    source: Dataset,
    prediction: Prediction,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    identity: NodeIdentity,
    window: tuple[float, float] | None = None,
    priority: str = "routine",
    priority_reasons: Sequence[str] = (),
) -> Dataset:
    """A GSPS referencing ``source`` with the findings as graphic annotations on layer "AI"; its top-left text
    leads with "URGENT" and why when ``priority`` (the study's) is "urgent".

    ``window``: the (center, width) the node displayed the image with (see
    :func:`dicom_node.imaging.pixels.display_window`); None uses the source's first window if it has a
    valid one (width > 1), else none is written. Raises :class:`EncodingError`.
    """
    require_source_image(source)
    check_geometry(source, prediction)
    header = source_header(source)
    voi = _voi(header, window)
    for kw in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction"):
        if kw in header:
            del header[kw]  # highdicom would copy these as they are (all values, even nonsense)
    photometric = str(source.get("PhotometricInterpretation", "")).strip().upper()
    shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    models = tuple(prediction.models) or tuple(identity.models)
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER_NAME, order=1, description="AI findings (dicom-node)", display_color=LAYER_COLOR
    )
    # A grayscale display value for the layer too: a monochrome display does not use the CIELab colour
    # (GraphicLayer has no parameter for it; the presentation state keeps this item as it is).
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = LAYER_GRAYSCALE
    try:
        with no_phi_warnings():
            gsps = hd.pr.GrayscaleSoftcopyPresentationState(
                referenced_images=[header],
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=identity.manufacturer,
                manufacturer_model_name=identity.model_name[:64],
                software_versions=identity.software_version,
                device_serial_number=identity.device_serial_number,
                content_label=CONTENT_LABEL,
                content_description=BANNER_TEXT,
                graphic_layers=[layer],
                graphic_annotations=[_annotation(header, prediction, layer, banner_text(priority, priority_reasons))],
                institution_name=identity.institution,
                voi_lut_transformations=voi,
                presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
                contributing_equipment=[contributing_equipment(identity, models)] if models else None,
                series_description=SERIES_DESCRIPTION["gsps"],
                **series_dates(has_content_date=False),
            )
    except EncodingError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"cannot build the presentation state: {library_error(exc)}") from exc
    _after_construction(gsps, source)
    return gsps


def _after_construction(gsps: Dataset, source: Dataset) -> None:
    """What highdicom's ``GrayscaleSoftcopyPresentationState`` cannot be given, set on the built presentation
    state: the one edit after construction.

    - Body Part Examined from the source, or an empty Laterality (:func:`copy_body_part`): the constructor takes
      neither (it copies patient and study from the image, not its series).

    Series Date/Time go to the constructor (:func:`series_dates`), the layer's grayscale display value to the
    layer before it.
    """
    copy_body_part(gsps, source)


def _voi(header: Dataset, window: tuple[float, float] | None) -> list | None:
    if window is None:
        c, w = first_value(header.get("WindowCenter")), first_value(header.get("WindowWidth"))
        if c is None or w is None or w <= 1:
            return None
        window = (c, w)
    c, w = (float(v) for v in window)
    if not (np.isfinite(c) and np.isfinite(w) and w >= 1):
        raise EncodingError(f"invalid display window {window!r}")
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=c, window_width=w)]
