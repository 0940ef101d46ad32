"""The AI result as a Comprehensive 3D SR, TID 1500 "Imaging Measurement Report" (IHE AI Results).

Content tree (highdicom's template classes for the parts it has, the root assembled here)::

    Imaging Measurement Report (TID 1500)
    ├── Language, Observer: device (uid, name, manufacturer, model), Procedure reported: LN 43468-8
    ├── Image Library (TID 1600): every analysed image
    ├── Imaging Measurements
    │   └── Measurement Group (TID 1501) per finding
    │         Tracking identifier "Finding N: <label>" + UID; Finding (DCM 121071): its code
    │         Finding Site: lung / pleura / heart / thoracic aorta / chest, with Laterality when the box
    │                       lies on one side of the patient
    │         Algorithm identification (name, versions of the models, parameters)
    │         Measurement: DCM 122157 Probability = the fused score, unit UCUM "1",
    │           INFERRED FROM its box: a closed 5-point POLYLINE (x_min,y_min)->(x_max,y_min)->(x_max,y_max)->
    │           (x_min,y_max)->(x_min,y_min) on the source image (SOP Class/Instance UID)
    │         Comment (DCM 121106): "<label> <score>", e.g. "Cardiomegaly 0.66" (the words viewers show);
    │           the first group of an urgent study also "URGENT" before it
    │     and, where no box says what the study is, a whole-image group (TID 1501) with the study's verdict:
    │         Finding: Abnormal | No abnormality (as the study says), tracking identifier: the study statement,
    │         Comment: "AI: abnormality suspected" | "AI: no abnormality" (after "URGENT" when urgent),
    │         Finding Site: chest, Measurement: private "P(abnormal)" of
    │         that image INFERRED FROM the whole image (a normal study: every image; an abnormal study without
    │         a box: its abnormal images);
    │     and for an image the models could not judge (TID 1501): Finding "Indeterminate", tracking
    │         identifier "AI: not analysable (<reason>)", the whole image as Source of Measurement (a SCOORD)
    └── Qualitative Evaluations (UMLS C0034375): the study-level result (:mod:`dicom_node.outputs.verdict`)
          CODE  Finding (DCM 121071) = SCT 263654008 Abnormal | DCM 111286 No abnormality
                                       | SCT 82334004 Indeterminate (no image could be judged)
          CODE  Priority (SCT 260870009) = SCT 103391001 Urgent, for an urgent study only
          TEXT  Comment (DCM 121106) = what the AI did, with its probability and operating point, e.g.
                "AI: no abnormality detected, P(abnormal) = 0.12, operating point 0.50", and the images
                it could not judge with the reason, e.g. "AI: no result, 1 of 1 image not analysable (...)";
                an urgent study's starts "URGENT (<reasons>): "

Why this shape: what OHIF 3.13 writes next to a region depends on where the region is
(extensions/cornerstone-dicom-sr, getSopClassHandlerModule ``_processMeasurement``). A group with the region at
its top level (TID 1410) is labelled only with each NUM as "<concept meaning>: <value, 2 decimals> <unit code>"
and its first Finding Site as "363698007: <site>" ("Probability: 0.66 1", "363698007: Heart"); the Finding
and any text are never shown. A group whose region is the source of its measurement (TID 1501, the NUM
INFERRED FROM the SCOORD, as OHIF's own SRs are written) is labelled with each of its DCM 121106 Comment
texts, then the NUMs: "Cardiomegaly 0.66:" over "Probability: 0.66 1". dwv 0.36 draws both shapes. Every
group needs a region: OHIF 3 fails on a group without one and on an SR without any group, hence the
whole-image groups. OHIF writes a label to the right of its region, so a whole-image region's words stand
beside the image: they are kept short. PixelMed's 2022 template tables lack a Comment row in TID 1501 and say
"Content Item not in template" (a warning, not an error) for it; it also checks every group of Imaging
Measurements against TID 1410 as soon as one has an "Image Region", so all groups are TID 1501. The
study-level result is TID 1500's own "Qualitative Evaluations" (CODE and TEXT items only; its probability is
stated in the text). Every container is ContinuityOfContent SEPARATE, so renderers (dsr2html, DICOMscope) list
items instead of running them together.

Same patient and study as the sources, a new series, CompletionFlag COMPLETE, VerificationFlag
UNVERIFIED, PreliminaryFlag FINAL (the algorithm's output will not change; no human verified it),
and a Contributing Equipment item whose Device UID is derived from the model weights.
UIDs inside the content (tracking UIDs) are derived from the SR's SOP Instance UID, so encoding the
same result twice gives the same document. Everything, the Series Date/Time included, goes through highdicom's
``Comprehensive3DSR`` constructor: nothing is set on the document after it is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import EncodingError
from dicom_node.outputs import codes as C
from dicom_node.outputs.captions import finding_caption
from dicom_node.outputs.equipment import NodeIdentity, contributing_equipment
from dicom_node.outputs.geometry import box_polyline, check_geometry
from dicom_node.outputs.image_library import image_library
from dicom_node.outputs.library_messages import library_error, no_phi_warnings
from dicom_node.outputs.series import SERIES_DESCRIPTION, series_dates
from dicom_node.outputs.source import check_same_study, patient_orientation, source_header
from dicom_node.outputs.uids import derived_uid
from dicom_node.outputs.verdict import NOT_ANALYSABLE, ROUTINE, StudyVerdict, image_verdict, study_verdict
from inference.types import NO_FINDING_ID, Finding, ModelInfo, Prediction, models_summary

__all__ = ["build_sr", "study_statement"]

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


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


def _checked_probability(value: float) -> float:
    v = float(value)
    if not np.isfinite(v) or not 0.0 <= v <= 1.0:
        raise EncodingError(f"probability {value!r} is outside [0, 1]")
    return round(v, 6)


def _patient_side(ds: Dataset, box: tuple[float, float, float, float]) -> Code | None:
    """Right or Left when at least 85 % of the box lies on one side of the image's vertical midline.

    Which side of the image is the patient's right: Patient Orientation's row direction says where the
    columns run ("L": towards the patient's left, the usual display of a PA or AP chest); without it the
    usual display is assumed (also for an invalid one). Columns that run mainly another way (a lateral film: "A"
    or "P", or "PL") give no side; an oblique row direction counts by its principal (first) letter."""
    cols = float(ds.Columns)
    x0, x1 = sorted((min(max(float(box[0]), 0.0), cols), min(max(float(box[2]), 0.0), cols)))
    width = x1 - x0
    if width <= 0:
        return None
    on_left = (min(x1, cols / 2) - min(x0, cols / 2)) / width  # share of the box in the image's left half
    orientation = patient_orientation(ds)
    rows_towards = orientation[0][0] if orientation else "L"  # the principal letter of the row direction
    if rows_towards not in "LR":
        return None  # the image's halves are not the patient's sides
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


def _region(ds: Dataset, polyline: np.ndarray) -> hd.sr.CoordinatesForMeasurement:
    """The region a measurement is INFERRED FROM: a closed polyline on the source image."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=polyline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
    )


def _group(
    *,
    uid: str,
    identifier: str,
    finding: Code,
    site: hd.sr.FindingSite,
    algorithm: hd.sr.AlgorithmIdentification,
    measurement: hd.sr.Measurement,
    comments: Sequence[str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 measurement group, its comments (the words OHIF shows next to its region) last."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        finding_type=finding,
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=[measurement],
    )
    for text in comments:
        group[0].ContentSequence.append(hd.sr.TextContentItem(name=C.COMMENT, value=text, relationship_type=_CONTAINS))
    return group


def _finding_group(
    ds: Dataset,
    f: Finding,
    n: int,
    sop_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    extra: Sequence[str] = (),
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    if not 0 <= int(f.class_id) < NO_FINDING_ID:
        raise EncodingError(f"finding {n}: class id {f.class_id!r} is not a finding class (0-13)")
    probability = hd.sr.Measurement(
        name=C.PROBABILITY,
        value=_checked_probability(f.score),
        unit=C.UNIT_NO_UNITS,
        referenced_coordinates=[_region(ds, box_polyline(f.box, int(ds.Rows), int(ds.Columns)))],
    )
    return _group(
        uid=derived_uid(sop_uid, "finding", ds.SOPInstanceUID, n),
        identifier=f"Finding {n}: {C.finding_label(f.class_id)}"[:64],
        finding=C.finding_code(f.class_id),
        site=_finding_site(ds, f),
        algorithm=algorithm,
        measurement=probability,
        comments=[*extra, finding_caption(f)],
    )


def _whole_image(ds: Dataset) -> np.ndarray:
    rows, cols = float(ds.Rows), float(ds.Columns)
    return np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], dtype=np.float64)


def _verdict_group(
    ds: Dataset, sop_uid: str, algorithm: hd.sr.AlgorithmIdentification, pred: Prediction, verdict: StudyVerdict
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The whole image, carrying the study's own verdict where no box says it: its finding is the study's
    (Abnormal, No abnormality), its tracking identifier the study statement, its comment the verdict in a few
    words ("AI: no abnormality", after "URGENT" for an urgent study: OHIF writes them to the right of the region,
    beside the image, where a whole sentence does not fit), its measurement this image's P(abnormal). OHIF 3
    cannot open an SR without any region (black viewport) and dwv ignores it."""
    p = hd.sr.Measurement(
        name=C.P_ABNORMAL,
        value=_checked_probability(1.0 - float(pred.p_no_finding)),
        unit=C.UNIT_NO_UNITS,
        referenced_coordinates=[_region(ds, _whole_image(ds))],
    )
    return _group(
        uid=derived_uid(sop_uid, verdict.verdict, ds.SOPInstanceUID),
        identifier=verdict.statement,
        finding=C.verdict_code(verdict.verdict),
        site=hd.sr.FindingSite(anatomic_location=C.CHEST),
        algorithm=algorithm,
        measurement=p,
        comments=[verdict.flag, verdict.label] if verdict.urgent else [verdict.label],
    )


def _unjudged_group(
    ds: Dataset, sop_uid: str, algorithm: hd.sr.AlgorithmIdentification, pred: Prediction
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The whole image of an image the models could not judge: "Indeterminate", "AI: not analysable (<reason>)",
    and the image as the source of the measurement not made: a SCOORD of the whole image in the group itself
    (TID 1501 row 10). It has no probability to carry its region (highdicom writes no NUM without a value), so
    OHIF takes it for a TID 1410 region and labels it with its measurements and Finding Site only: it has
    neither, and OHIF draws the frame without words (and without a code)."""
    label = f"AI: not analysable ({pred.not_analysable})"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_uid, "not analysable", ds.SOPInstanceUID), identifier=label
        ),
        finding_type=C.INDETERMINATE,
        algorithm_id=algorithm,
    )
    source = hd.sr.ScoordContentItem(
        name=C.SOURCE_OF_MEASUREMENT,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_whole_image(ds),
        pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.VOLUME,
        relationship_type=_CONTAINS,
    )
    source.ContentSequence = hd.sr.ContentSequence([hd.sr.SourceImageForRegion.from_source_image(ds)])
    group[0].ContentSequence.append(source)
    return group


def study_statement(predictions: list[Prediction]) -> tuple[Code, str]:
    """(the study-level Finding code, the sentence the SR states) for a study's predictions, routine priority.

    P(abnormal) is the fused probability of the most suspicious image, 1 - P(no finding); an image is abnormal
    when something is boxed or that probability reaches the operating point (see :mod:`inference.fusion`).
    Images the models could not judge are named with their reason; when no image could be judged the
    finding is "Indeterminate" and no probability is stated. The logic is :func:`verdict.study_verdict`'s."""
    verdict = study_verdict(predictions)
    return C.verdict_code(verdict.verdict), verdict.statement


def _qualitative_evaluations(verdict: StudyVerdict) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=C.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS, is_content_continuous=False
    )
    finding = C.verdict_code(verdict.verdict)
    items: list = [hd.sr.CodeContentItem(name=C.FINDING, value=finding, relationship_type=_CONTAINS)]
    if verdict.urgent:
        items.append(hd.sr.CodeContentItem(name=C.PRIORITY, value=C.URGENT, relationship_type=_CONTAINS))
    items.append(hd.sr.TextContentItem(name=C.COMMENT, value=verdict.statement, relationship_type=_CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(
    sources: list[tuple[Dataset, Prediction]],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    identity: NodeIdentity,
    priority: str = ROUTINE,
    priority_reasons: Sequence[str] = (),
) -> Dataset:
    """Encode the predictions for one study's images as one TID 1500 Comprehensive 3D SR.

    ``sources``: (source image dataset, its prediction) pairs, all from the same patient and study;
    the datasets need their header only (pixel data is not read). ``priority``: "urgent" or "routine" (the
    site's priority rules, with their ``priority_reasons``): an urgent study says so in Qualitative Evaluations
    and in its statement. Raises :class:`EncodingError`.
    """
    if not sources:
        raise EncodingError("build_sr needs at least one (source, prediction) pair")
    check_same_study(ds for ds, _ in sources)
    sources = [(source_header(ds), pred) for ds, pred in sources]
    for ds, pred in sources:
        check_geometry(ds, pred)
    preds = [p for _, p in sources]
    try:
        verdict = study_verdict([(str(ds.SOPInstanceUID), p) for ds, p in sources], priority, priority_reasons)
    except ValueError as exc:
        raise EncodingError(str(exc)) from exc
    models = _models(preds, identity)
    fusion = ",".join(sorted({p.fusion_mode for p in preds}))
    try:
        with no_phi_warnings():
            return _build(
                sources,
                models,
                fusion,
                verdict,
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


def _groups(sources, sop_uid: str, algorithm, verdict: StudyVerdict) -> list:
    """Every finding's group; where no box says what the study is, the study's verdict on the images that
    carry it; and each image the models could not judge, where it is."""
    groups: list = []
    for ds, pred in sources:
        for f in sorted(pred.findings, key=lambda f: -f.score):
            extra = [verdict.flag] if verdict.urgent and not groups else []
            groups.append(_finding_group(ds, f, len(groups) + 1, sop_uid, algorithm, extra))
    if not groups and verdict.verdict != NOT_ANALYSABLE:
        groups = [
            _verdict_group(ds, sop_uid, algorithm, pred, verdict)
            for ds, pred in sources
            if image_verdict(pred) == verdict.verdict
        ]
    return groups + [_unjudged_group(ds, sop_uid, algorithm, p) for ds, p in sources if p.not_analysable]


def _build(
    sources,
    models,
    fusion,
    verdict: StudyVerdict,
    *,
    series_uid,
    sop_uid,
    series_number,
    instance_number,
    identity: NodeIdentity,
) -> Dataset:
    algorithm = _algorithm(identity, models, fusion)
    groups = _groups(sources, sop_uid, algorithm, verdict)
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
    if groups:  # always: a study without a box has its whole-image regions
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
        content.append(measurements)
    content.append(_qualitative_evaluations(verdict))
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
