"""The AI result as a Comprehensive 3D SR, TID 1500 "Imaging Measurement Report" (IHE AI Results).

Content tree (built with highdicom, which checks the templates as it builds)::

    Imaging Measurement Report (TID 1500)
    ├── Language, Observer: device (uid, name, manufacturer, model), Procedure: LN 43468-8
    └── Imaging Measurements
        ├── Measurement Group (TID 1501, whole image(s)): the study-level result
        │     Tracking identifier "Study assessment" + UID
        │     Finding (type): SCT 263654008 Abnormal | DCM 111286 No abnormality ("No finding")
        │     Algorithm identification (name, versions of the models, parameters)
        │     Qualitative evaluation: DCM 121402 Normality = SCT 17621005 Normal | 263654008 Abnormal
        │     Measurement: DCM 122157 Probability (of that evaluation), unit UCUM "1"
        │     Measurement: 99DCMNODE CLSPABN classifier probability of abnormality, unit "1"
        └── Measurement Group (TID 1410) per finding
              Tracking identifier "Finding N: <label>" + UID; Finding (type, DCM 121071): its code
              Image region: closed 5-point POLYLINE (x_min,y_min)->(x_max,y_min)->(x_max,y_max)->
                            (x_min,y_max)->(x_min,y_min) on the source image (SOP Class/Instance UID)
              Measurement: DCM 122157 Probability = the fused score, unit UCUM "1"

Same patient and study as the sources, a new series, CompletionFlag COMPLETE, VerificationFlag
UNVERIFIED, PreliminaryFlag FINAL (the algorithm's output will not change; no human verified it),
and a Contributing Equipment item whose Device UID is derived from the model weights.
UIDs inside the content (tracking UIDs) are derived from the SR's SOP Instance UID, so encoding the
same result twice gives the same document.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.errors import EncodingError
from dicom_node.outputs import codes as C
from dicom_node.outputs.identity import (
    NodeIdentity,
    check_geometry,
    check_same_study,
    contributing_equipment,
    derived_uid,
    models_summary,
    no_phi_warnings,
    source_header,
)
from inference.types import NO_FINDING_ID, Finding, ModelInfo, Prediction

__all__ = ["build_sr", "box_polyline"]


def box_polyline(box: tuple[float, float, float, float], rows: int, cols: int) -> np.ndarray:
    """Closed 5-point polyline (column, row) for a box, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise EncodingError(f"box {box!r} has non-finite coordinates")
    x0, x1 = sorted((min(max(x0, 0.0), cols), min(max(x1, 0.0), cols)))
    y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


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
        algorithm_id=algorithm,
        measurements=[_probability(f.score)],
    )


def _study_group(
    sources: list[tuple[Dataset, Prediction]], sop_uid: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    preds = [p for _, p in sources]
    abnormal = any(p.abnormal for p in preds)
    if abnormal:  # the strongest evidence for "abnormal" among the images
        probability = max(1.0 - float(p.p_no_finding) for p in preds)
        finding_type, evaluation = C.ABNORMAL, C.ABNORMAL
    else:  # "no finding" is only as certain as the least certain image
        probability = min(float(p.p_no_finding) for p in preds)
        finding_type, evaluation = C.finding_code(NO_FINDING_ID), C.NORMAL
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(sop_uid, "study"), identifier="Study assessment"),
        finding_type=finding_type,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds, _ in sources],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=C.NORMALITY, value=evaluation)],
        measurements=[
            _probability(probability),
            _probability(max(float(p.p_abnormal) for p in preds), C.CLASSIFIER_P_ABNORMAL),
        ],
    )


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
        raise EncodingError(f"cannot build the SR: {type(exc).__name__}: {exc}") from exc


def _build(
    sources, models, fusion, *, series_uid, sop_uid, series_number, instance_number, identity: NodeIdentity
) -> Dataset:
    algorithm = _algorithm(identity, models, fusion)
    groups: list = [_study_group(sources, sop_uid, algorithm)]
    n = 0
    for ds, pred in sources:
        for f in sorted(pred.findings, key=lambda f: -f.score):
            n += 1
            groups.append(_finding_group(ds, f, n, sop_uid, algorithm))

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
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=C.PROCEDURE_XR,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    # The private scheme is always used (classifier probability), so always declared.
    schemes = [
        CodingSchemeIdentificationItem(
            designator=C.PRIVATE_SCHEME,
            name=C.PRIVATE_SCHEME_NAME,
            responsible_organization=C.PRIVATE_SCHEME_RESPONSIBLE,
        )
    ]
    return hd.sr.Comprehensive3DSR(
        evidence=[ds for ds, _ in sources],
        content=report,
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
        series_description="AI result - not for primary diagnosis",
        coding_schemes=schemes,
    )
