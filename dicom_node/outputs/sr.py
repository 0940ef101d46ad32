"""The AI result as a Comprehensive 3D SR, TID 1500 "Imaging Measurement Report" (IHE AI Results).

Content tree (highdicom's template classes for the parts it has, the root assembled here)::

    Imaging Measurement Report (TID 1500)
    ├── Language, Observer: device (uid, name, manufacturer, model), Procedure reported: LN 43468-8
    ├── Image Library (TID 1600): every analysed image
    ├── Imaging Measurements
    │   └── Measurement Group (TID 1410) per finding (a normal study: one "No abnormality" group per image,
    │       its region the whole image, its site the chest; an image the models could not judge: an
    │       "Indeterminate" whole-image group "AI: not analysable (<reason>)")
    │         Tracking identifier "Finding N: <label>" + UID; Finding (type, DCM 121071): its code
    │         Finding Site: lung / pleura / heart / thoracic aorta / chest, with Laterality when the box
    │                       lies on one side of the patient
    │         Algorithm identification (name, versions of the models, parameters)
    │         Image region: closed 5-point POLYLINE (x_min,y_min)->(x_max,y_min)->(x_max,y_max)->
    │                       (x_min,y_max)->(x_min,y_min) on the source image (SOP Class/Instance UID)
    │         Measurement: DCM 122157 Probability = the fused score, unit UCUM "1"
    └── Qualitative Evaluations (UMLS C0034375): the study-level result
          CODE  Finding (DCM 121071) = SCT 263654008 Abnormal | DCM 111286 No abnormality
                                       | SCT 82334004 Indeterminate (no image could be judged)
          TEXT  Comment (DCM 121106) = what the AI did, with its probability and operating point, e.g.
                "AI: no abnormality detected, P(abnormal) = 0.12, operating point 0.50", and the images
                it could not judge with the reason, e.g. "AI: no result, 1 of 1 image not analysable (...)"

Why this shape: viewers draw TID 1410 groups (OHIF, dwv) but stop at a measurement group without image
geometry, so the study-level result is not a measurement group but TID 1500's own "Qualitative Evaluations"
(CODE and TEXT items only; its probability is stated in the text). OHIF 3 cannot open an SR without any
measurement group at all, hence the whole-image "No abnormality" groups of a normal study. Every container is
ContinuityOfContent SEPARATE, so renderers (dsr2html, DICOMscope) list items instead of running them together.

Same patient and study as the sources, a new series, CompletionFlag COMPLETE, VerificationFlag
UNVERIFIED, PreliminaryFlag FINAL (the algorithm's output will not change; no human verified it),
and a Contributing Equipment item whose Device UID is derived from the model weights.
UIDs inside the content (tracking UIDs) are derived from the SR's SOP Instance UID, so encoding the
same result twice gives the same document. Everything, the Series Date/Time included, goes through highdicom's
``Comprehensive3DSR`` constructor: nothing is set on the document after it is built.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import EncodingError
from dicom_node.outputs import codes as C
from dicom_node.outputs.equipment import NodeIdentity, contributing_equipment
from dicom_node.outputs.geometry import box_polyline, check_geometry
from dicom_node.outputs.image_library import image_library
from dicom_node.outputs.library_messages import library_error, no_phi_warnings
from dicom_node.outputs.series import SERIES_DESCRIPTION, series_dates
from dicom_node.outputs.source import check_same_study, source_header
from dicom_node.outputs.uids import derived_uid
from inference.types import ABNORMAL_OPERATING_POINT, NO_FINDING_ID, Finding, ModelInfo, Prediction, models_summary

__all__ = ["build_sr", "study_statement"]


def _models(predictions: list[Prediction], identity: NodeIdentity) -> tuple[ModelInfo, ...]:
    seen: dict[tuple[str, str], ModelInfo] = {}
    for p in predictions:
        for m in p.models:
            seen.setdefault((m.name, m.sha256), m)
    return tuple(seen.values()) or tuple(identity.models)


def _algorithm(identity: NodeIdentity, models: tuple[ModelInfo, ...], fusion: str) -> hd.sr.AlgorithmIdentification:
    version = models_summary(models) or identity.software_version
    params = [f"dicom-node {identity.software_version}", f"fusion={fusion}"]
    params += [f"{m.name}.sha256={m.sha256}" for m in models]
    if identity.site_validation:
        params.append(identity.site_validation)
    return hd.sr.AlgorithmIdentification(
        name=identity.algorithm_name,
        version=version,
        parameters=params,
        family=C.ALGORITHM_FAMILY,
        manufacturer=identity.manufacturer,
    )


def _probability(value: float, name=C.PROBABILITY) -> hd.sr.Measurement:
    v = float(value)
    if not np.isfinite(v) or not 0.0 <= v <= 1.0:
        raise EncodingError(f"probability {value!r} is outside [0, 1]")
    return hd.sr.Measurement(name=name, value=round(v, 6), unit=C.UNIT_NO_UNITS)


def _patient_side(ds: Dataset, box: tuple[float, float, float, float]) -> Code | None:
    """Right or Left when at least 85 % of the box lies on one side of the image's vertical midline.

    Which side of the image is the patient's right: Patient Orientation's row direction says where the
    columns run ("L": towards the patient's left, the usual display of a PA or AP chest); without it the
    usual display is assumed."""
    cols = float(ds.Columns)
    x0, x1 = sorted((min(max(float(box[0]), 0.0), cols), min(max(float(box[2]), 0.0), cols)))
    width = x1 - x0
    if width <= 0:
        return None
    on_left = (min(x1, cols / 2) - min(x0, cols / 2)) / width  # share of the box in the image's left half
    orientation = ds.get("PatientOrientation")
    rows_towards = str(orientation[0]).upper()[:1] if orientation and len(orientation) == 2 else "L"
    left_half_is, right_half_is = codes.SCT.Right, codes.SCT.Left  # the usual display of a PA/AP chest
    if rows_towards == "R":  # columns run towards the patient's right: flipped
        left_half_is, right_half_is = right_half_is, left_half_is
    if on_left >= 0.85:
        return left_half_is
    if on_left <= 0.15:
        return right_half_is
    return None


def _finding_site(ds: Dataset, f: Finding) -> hd.sr.FindingSite:
    site, lateral = C.finding_site(f.class_id)
    return hd.sr.FindingSite(anatomic_location=site, laterality=_patient_side(ds, f.box) if lateral else None)


def _finding_group(
    ds: Dataset, f: Finding, n: int, sop_uid: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    if not 0 <= int(f.class_id) < NO_FINDING_ID:
        raise EncodingError(f"finding {n}: class id {f.class_id!r} is not a finding class (0-13)")
    code = C.finding_code(f.class_id)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box_polyline(f.box, int(ds.Rows), int(ds.Columns)),
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_uid, "finding", ds.SOPInstanceUID, n),
            identifier=f"Finding {n}: {C.finding_label(f.class_id)}"[:64],
        ),
        referenced_region=region,
        finding_type=code,
        finding_sites=[_finding_site(ds, f)],
        algorithm_id=algorithm,
        measurements=[_probability(f.score)],
    )


def _whole_image_group(
    ds: Dataset, sop_uid: str, algorithm: hd.sr.AlgorithmIdentification, pred: Prediction
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A measurement group with the whole image as its region, the chest as its site: "No abnormality" for
    each image of a study without findings, "Indeterminate" for an image the models could not judge.

    A normal study's SR still needs one group with an image region: OHIF 3 fails to open an SR without any
    (black viewport) and dwv ignores it."""
    rows, cols = float(ds.Rows), float(ds.Columns)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
    )
    if pred.not_analysable:
        kind, label, finding = "not analysable", f"AI: not analysable ({pred.not_analysable})", C.INDETERMINATE
    else:
        kind, label, finding = "no abnormality", "AI: no abnormality detected", C.finding_code(NO_FINDING_ID)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_uid, kind, ds.SOPInstanceUID), identifier=label[:64]
        ),
        referenced_region=region,
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(anatomic_location=C.CHEST)],
        algorithm_id=algorithm,
    )


def study_statement(predictions: list[Prediction]) -> tuple[Code, str]:
    """(the study-level Finding code, the sentence the SR states) for a study's predictions.

    P(abnormal) is the fused probability of the most suspicious image, 1 - P(no finding); an image is abnormal
    when something is boxed or that probability reaches the operating point (see :mod:`inference.fusion`).
    Images the models could not judge are named with their reason; when no image could be judged the
    finding is "Indeterminate" and no probability is stated."""
    judged = [p for p in predictions if not p.not_analysable]
    refused = [p.not_analysable for p in predictions if p.not_analysable]
    unjudged = ""
    if refused:
        reasons = "; ".join(sorted(set(refused)))
        images = f"image{'s' if len(predictions) != 1 else ''}"
        unjudged = f"{len(refused)} of {len(predictions)} {images} not analysable ({reasons})"
    if not judged:
        return C.INDETERMINATE, f"AI: no result, {unjudged}"
    abnormal = any(p.abnormal for p in judged)
    p_abnormal = max(1.0 - float(p.p_no_finding) for p in judged)
    if not np.isfinite(p_abnormal) or not 0.0 <= p_abnormal <= 1.0:
        raise EncodingError(f"P(abnormal) {p_abnormal!r} is outside [0, 1]")
    n = sum(len(p.findings) for p in judged)
    where = f"; {n} finding{'s' if n != 1 else ''} marked" if n else ""
    what = "abnormality suspected" if abnormal else "no abnormality detected"
    statement = f"AI: {what}, P(abnormal) = {p_abnormal:.2f}, operating point {ABNORMAL_OPERATING_POINT:.2f}{where}"
    return (C.ABNORMAL if abnormal else C.finding_code(NO_FINDING_ID)), statement + (
        f"; {unjudged}" if unjudged else ""
    )


def _qualitative_evaluations(predictions: list[Prediction]) -> hd.sr.ContainerContentItem:
    finding, statement = study_statement(predictions)
    container = hd.sr.ContainerContentItem(
        name=C.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=C.FINDING,
                value=finding,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=C.COMMENT, value=statement, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            ),
        ]
    )
    return container


def build_sr(
    sources: list[tuple[Dataset, Prediction]],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    identity: NodeIdentity,
) -> Dataset:
    """Encode the predictions for one study's images as one TID 1500 Comprehensive 3D SR.

    ``sources``: (source image dataset, its prediction) pairs, all from the same patient and study;
    the datasets need their header only (pixel data is not read). Raises :class:`EncodingError`.
    """
    if not sources:
        raise EncodingError("build_sr needs at least one (source, prediction) pair")
    check_same_study(ds for ds, _ in sources)
    sources = [(source_header(ds), pred) for ds, pred in sources]
    for ds, pred in sources:
        check_geometry(ds, pred)
    preds = [p for _, p in sources]
    models = _models(preds, identity)
    fusion = ",".join(sorted({p.fusion_mode for p in preds}))
    try:
        with no_phi_warnings():
            return _build(
                sources,
                models,
                fusion,
                series_uid=series_uid,
                sop_uid=sop_uid,
                series_number=series_number,
                instance_number=instance_number,
                identity=identity,
            )
    except EncodingError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"cannot build the SR: {library_error(exc)}") from exc


def _separate(items) -> None:
    """ContinuityOfContent SEPARATE on every container of the tree (highdicom's default is CONTINUOUS)."""
    for item in items:
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        if "ContentSequence" in item:
            _separate(item.ContentSequence)


def _build(
    sources, models, fusion, *, series_uid, sop_uid, series_number, instance_number, identity: NodeIdentity
) -> Dataset:
    algorithm = _algorithm(identity, models, fusion)
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for ds, pred in sources:
        for f in sorted(pred.findings, key=lambda f: -f.score):
            groups.append(_finding_group(ds, f, len(groups) + 1, sop_uid, algorithm))
    if not groups:  # no finding: every image says what it is, "No abnormality" or "not analysable"
        groups = [_whole_image_group(ds, sop_uid, algorithm, pred) for ds, pred in sources]
    else:  # findings, and the images the models could not judge say so, where they are
        groups += [_whole_image_group(ds, sop_uid, algorithm, p) for ds, p in sources if p.not_analysable]

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_observer_uid,
        name=identity.model_name[:64],
        manufacturer_name=identity.manufacturer,
        model_name=identity.model_name[:64],
        serial_number=identity.device_serial_number,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    # TID 1500, assembled as highdicom's MeasurementReport does, with the parts it does not offer: no
    # "Imaging Measurements" for a normal study, and "Qualitative Evaluations" for the study-level result.
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(C.LANGUAGE))
    content.extend(context)
    content.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=C.PROCEDURE_XR,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(image_library([ds for ds, _ in sources]))
    if groups:  # always: a normal study has its "No abnormality" regions
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
        content.append(measurements)
    content.append(_qualitative_evaluations([p for _, p in sources]))
    root.ContentSequence = content
    _separate([root])
    # The private scheme is declared when a code of it is used (two finding classes have no standard code).
    schemes = [
        CodingSchemeIdentificationItem(
            designator=C.PRIVATE_SCHEME,
            name=C.PRIVATE_SCHEME_NAME,
            responsible_organization=C.PRIVATE_SCHEME_RESPONSIBLE,
        )
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ds for ds, _ in sources],
        content=root,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=identity.institution,
        contributing_equipment=[contributing_equipment(identity, models)],
        manufacturer_model_name=identity.model_name[:64],
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        series_description=SERIES_DESCRIPTION["sr"],
        coding_schemes=schemes,
        **series_dates(),
    )
    return sr
