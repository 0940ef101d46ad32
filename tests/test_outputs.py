"""SR / SC / GSPS outputs: built from synthetic and real sources, written, read back and validated
with dciodvfy (zero errors) and dsrdump."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.errors import EncodingError
from dicom_node.imaging.pixels import display_window, load_image, read_dataset
from dicom_node.outputs import codes as C
from dicom_node.outputs.equipment import model_device_uid
from dicom_node.outputs.gsps import LAYER_NAME, build_gsps
from dicom_node.outputs.sc import BANNER_RGB, build_sc
from dicom_node.outputs.series import SERIES_DESCRIPTION
from dicom_node.outputs.sr import build_sr
from dicom_node.outputs.validate import dciodvfy, dsrdump, sr_validator
from inference.types import FINDING_CLASSES, Finding, Prediction
from support.dicom_factory import make_cxr
from support.provenance import IDENTITY, MODELS

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def finding(class_id: int, score: float, box) -> Finding:
    return Finding(class_id, FINDING_CLASSES[class_id], score, tuple(float(v) for v in box), score)


def abnormal(rows: int, cols: int) -> Prediction:
    return Prediction(
        p_abnormal=0.91,
        p_no_finding=0.12,
        fusion_mode="soft",
        models=MODELS,
        image_size=(rows, cols),
        findings=(
            finding(3, 0.83, (0.30 * cols, 0.45 * rows, 0.75 * cols, 0.80 * rows)),
            finding(0, 0.61, (0.45 * cols, 0.20 * rows, 0.60 * cols, 0.40 * rows)),
        ),
    )


def normal(rows: int, cols: int) -> Prediction:
    return Prediction(
        p_abnormal=0.08, p_no_finding=0.93, findings=(), fusion_mode="soft", models=MODELS, image_size=(rows, cols)
    )


def uids(series_number: int) -> dict:
    return dict(
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        series_number=series_number,
        instance_number=1,
        identity=IDENTITY,
    )


# PixelMed's build in Debian (2022) has an older CID 100 than the standard pydicom 3 follows, in which
# "XR unspecified body region" is listed: its only error on our SRs, and not one.
KNOWN_VALIDATOR_LAG = 'Code (43468-8,LN,"XR unspecified body region") not found in context group 100'


def write_and_check(ds, path, templates: bool = False) -> pydicom.Dataset:
    """Written, read back, zero dciodvfy errors; ``templates``: also PixelMed's template check (a JVM start,
    a few seconds: done for each shape of SR, not for every one)."""
    ds.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    assert report.errors == (), report.output
    if templates:
        templates = sr_validator(path)
        assert "TID_1500" in templates.output
        assert [e for e in templates.errors if KNOWN_VALIDATOR_LAG not in e] == [], templates.output
    return pydicom.dcmread(path)


def containers(sr, name: str) -> list:
    return [
        i for i in content_items(sr) if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeMeaning == name
    ]


def named(items, name: str) -> list:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == name]


def same_patient_and_study(out, src) -> None:
    assert out.StudyInstanceUID == src.StudyInstanceUID
    assert str(out.get("PatientID", "")) == str(src.get("PatientID", ""))
    assert str(out.get("PatientName", "")) == str(src.get("PatientName", ""))
    assert out.SeriesInstanceUID != src.SeriesInstanceUID


def content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def polylines(sr) -> list[tuple[str, list[float]]]:
    """(referenced SOP instance UID, graphic data) of every SCOORD in the SR."""
    out = []
    for item in content_items(sr):
        if item.ValueType == "SCOORD":
            ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert item.GraphicType == "POLYLINE"
            out.append((ref, [float(v) for v in item.GraphicData]))
    return out


def closed_box(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.dcm"
    make_cxr(path, rows=256, cols=200)
    return pydicom.dcmread(path), path


@pytest.fixture(params=["fodicom_CR-MONO1-10-chest.dcm", "pydicomdata_RG1_J2KI.dcm"])
def real_source(request, samples_dir):
    return read_dataset(samples_dir / request.param)


# --- SR ---------------------------------------------------------------------------------------


def test_sr_with_two_findings(tmp_path, source):
    src, _ = source
    pred = abnormal(256, 200)
    sr = write_and_check(build_sr([(src, pred)], **uids(9001)), tmp_path / "sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    same_patient_and_study(sr, src)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # the boxes, in score order, as closed 5-point polylines on the source image
    lines = polylines(sr)
    expected = [closed_box(f.box) for f in sorted(pred.findings, key=lambda f: -f.score)]
    assert [ref for ref, _ in lines] == [src.SOPInstanceUID] * 2
    np.testing.assert_allclose([g for _, g in lines], expected, atol=1e-3)
    # the device UID of the contributing equipment is the weights' hash
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == IDENTITY.manufacturer]
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert ours[0].DeviceUID == model_device_uid(MODELS)
    text = dsrdump(tmp_path / "sr.dcm")
    assert "Cardiomegaly" in text and "Aortic enlargement" in text and "(8186001,SCT" in text
    printed = [[float(v) for v in re.split("[,/]", m)] for m in re.findall(r"\(POLYLINE,([-0-9.,/e]+)\)", text)]
    np.testing.assert_allclose(printed, expected, atol=1e-3)  # dsrdump prints the box coordinates
    assert src.SOPInstanceUID in text
    assert '"Device Observer UID")="1.2.826.0.1.3680043.8.498.1"' in text
    assert '(263654008,SCT,"Abnormal")' in text and '"Probability")="0.83"' in text
    # study level, in Qualitative Evaluations: 1 - p_no_finding, with the operating point
    assert '"Comment")="AI: abnormality suspected, P(abnormal) = 0.88, operating point 0.50; 2 findings marked"' in text


def test_sr_is_shaped_as_viewers_read_it(tmp_path, source):
    """Imaging Measurements holds only the per-finding TID 1501 groups (what OHIF and dwv draw), each with
    tracking identifier and UID, finding, finding site, the probability INFERRED FROM its box, and a comment
    "<label> <score>" (the words OHIF writes next to the box); the study-level result is in Qualitative
    Evaluations; an Image Library lists the images; every container is SEPARATE."""
    src, _ = source
    pred = abnormal(256, 200)
    sr = write_and_check(build_sr([(src, pred)], **uids(9001)), tmp_path / "sr.dcm", templates=True)
    root = sr.ContentSequence
    assert [c.ConceptNameCodeSequence[0].CodeMeaning for c in root if c.ValueType == "CONTAINER"] == [
        "Image Library",
        "Imaging Measurements",
        "Qualitative Evaluations",
    ]
    (measurements,) = containers(sr, "Imaging Measurements")
    groups = list(measurements.ContentSequence)
    assert len(groups) == len(pred.findings)
    for group, f in zip(groups, sorted(pred.findings, key=lambda f: -f.score)):
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        items = list(group.ContentSequence)
        assert len(named(items, "Tracking Identifier")) == 1 and len(named(items, "Tracking Unique Identifier")) == 1
        assert len(named(items, "Finding")) == 1
        assert [i.ValueType for i in items if i.ValueType in ("SCOORD", "SCOORD3D")] == []  # not at the top
        (probability,) = named(items, "Probability")
        (region,) = probability.ContentSequence
        assert (region.ValueType, region.RelationshipType) == ("SCOORD", "INFERRED FROM")
        assert region.GraphicType == "POLYLINE" and list(region.GraphicData[:2]) == list(region.GraphicData[-2:])
        assert [i.TextValue for i in named(items, "Comment")] == [f"{f.label} {f.score:.2f}"]
    sites = [named(g.ContentSequence, "Finding Site")[0].ConceptCodeSequence[0].CodeMeaning for g in groups]
    assert sites == ["Heart", "Thoracic aorta"]  # cardiomegaly, aortic enlargement: no side
    (evaluations,) = containers(sr, "Qualitative Evaluations")
    assert [i.ValueType for i in evaluations.ContentSequence] == ["CODE", "TEXT"]
    assert named(evaluations.ContentSequence, "Finding")[0].ConceptCodeSequence[0].CodeMeaning == "Abnormal"
    (library,) = containers(sr, "Image Library")
    assert src.SOPInstanceUID in str(library)
    assert {c.ContinuityOfContent for c in content_items(sr) if c.ValueType == "CONTAINER"} | {
        sr.ContinuityOfContent
    } == {"SEPARATE"}


@pytest.mark.parametrize(
    "box,orientation,side",
    [
        ((10, 50, 80, 150), None, "Right"),  # image left = patient's right on a PA/AP chest as displayed
        ((120, 50, 190, 150), None, "Left"),
        ((10, 50, 80, 150), ["R", "F"], "Left"),  # flipped: columns run towards the patient's right
        ((10, 50, 80, 150), ["RA", "F"], "Left"),  # oblique: by its principal (first) letter
        ((10, 50, 80, 150), ["P", "F"], None),  # a lateral film: the image's halves are not the patient's sides
        ((10, 50, 80, 150), ["PL", "F"], None),  # mainly lateral
        ((60, 50, 150, 150), None, None),  # across the midline: no side
    ],
)
def test_lung_findings_carry_the_side_of_the_patient(tmp_path, box, orientation, side):
    src = make_cxr(rows=256, cols=200, **({"PatientOrientation": orientation} if orientation else {}))
    pred = dataclasses.replace(abnormal(256, 200), findings=(finding(4, 0.7, box),))  # consolidation
    sr = write_and_check(build_sr([(src, pred)], **uids(9001)), tmp_path / "sr.dcm", templates=side == "Right")
    (site,) = [i for i in content_items(sr) if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"]
    assert site.ConceptCodeSequence[0].CodeMeaning == "Lung"
    lateral = named(site.get("ContentSequence", []), "Laterality")
    assert [i.ConceptCodeSequence[0].CodeMeaning for i in lateral] == ([side] if side else [])


def test_sr_for_a_normal_study_says_no_finding(tmp_path, source):
    src, _ = source
    sr = write_and_check(build_sr([(src, normal(256, 200))], **uids(9001)), tmp_path / "sr.dcm", templates=True)
    # one "No abnormality" region per image, the whole image: viewers fail on an SR without any region
    assert polylines(sr) == [(src.SOPInstanceUID, [0.0, 0.0, 200.0, 0.0, 200.0, 256.0, 0.0, 256.0, 0.0, 0.0])]
    (group,) = containers(sr, "Imaging Measurements")[0].ContentSequence
    statement = "AI: no abnormality detected, P(abnormal) = 0.07, operating point 0.50"
    assert named(group.ContentSequence, "Finding")[0].ConceptCodeSequence[0].CodeMeaning == "No abnormality"
    assert named(group.ContentSequence, "Finding Site")[0].ConceptCodeSequence[0].CodeMeaning == "Chest"
    assert named(group.ContentSequence, "Tracking Identifier")[0].TextValue == statement
    comments = [i.TextValue for i in named(group.ContentSequence, "Comment")]
    assert comments == ["AI: no abnormality"]  # what OHIF shows beside the image, over "P(abnormal): 0.07 1"
    (p,) = named(group.ContentSequence, "P(abnormal)")
    assert float(p.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.07)
    text = dsrdump(tmp_path / "sr.dcm", "+Pl")
    assert '"Finding")=(111286,DCM,"No abnormality")' in text
    assert f'"Comment")="{statement}"' in text
    assert src.SOPInstanceUID in dsrdump(tmp_path / "sr.dcm", "+Pu")  # in the Image Library


def test_sr_of_an_abnormal_study_without_a_box_says_abnormal_everywhere(tmp_path, source):
    """P(abnormal) 0.85 and no finding above its floor: the whole-image region a viewer needs carries the
    study's verdict, never "No abnormality" (issue 21: 5 of 11 real SRs said both)."""
    src, _ = source
    pred = dataclasses.replace(normal(256, 200), p_abnormal=0.9, p_no_finding=0.15)
    sr = write_and_check(build_sr([(src, pred)], **uids(9001)), tmp_path / "sr.dcm", templates=True)
    (group,) = containers(sr, "Imaging Measurements")[0].ContentSequence
    statement = "AI: abnormality suspected, P(abnormal) = 0.85, operating point 0.50"
    assert named(group.ContentSequence, "Finding")[0].ConceptCodeSequence[0].CodeMeaning == "Abnormal"
    assert named(group.ContentSequence, "Tracking Identifier")[0].TextValue == statement
    assert [i.TextValue for i in named(group.ContentSequence, "Comment")] == ["AI: abnormality suspected"]
    (evaluations,) = containers(sr, "Qualitative Evaluations")
    assert named(evaluations.ContentSequence, "Finding")[0].ConceptCodeSequence[0].CodeMeaning == "Abnormal"
    assert "No abnormality" not in dsrdump(tmp_path / "sr.dcm", "+Pl")


def test_sr_of_an_urgent_study_says_so(tmp_path, source):
    src, _ = source
    reasons = ("Pneumothorax 0.91 >= 0.50",)
    pred = dataclasses.replace(abnormal(256, 200), findings=(finding(12, 0.91, (10, 20, 80, 150)),))
    sr = write_and_check(
        build_sr([(src, pred)], priority="urgent", priority_reasons=reasons, **uids(9001)),
        tmp_path / "sr.dcm",
        templates=True,
    )
    (evaluations,) = containers(sr, "Qualitative Evaluations")
    (priority,) = named(evaluations.ContentSequence, "Priority")
    assert priority.ConceptCodeSequence[0].CodeValue == "103391001"  # SCT Urgent
    (comment,) = named(evaluations.ContentSequence, "Comment")
    assert comment.TextValue.startswith("URGENT (Pneumothorax 0.91 >= 0.50): AI: abnormality suspected")
    (group,) = containers(sr, "Imaging Measurements")[0].ContentSequence
    assert [i.TextValue for i in named(group.ContentSequence, "Comment")] == [
        "URGENT",
        "Pneumothorax 0.91",
    ]
    routine = build_sr([(src, pred)], **uids(9001))  # the default: routine, no priority item
    assert not [i for i in content_items(routine) if i.ConceptNameCodeSequence[0].CodeMeaning == "Priority"]
    with pytest.raises(EncodingError):
        build_sr([(src, pred)], priority="stat", **uids(9001))


def test_sr_names_an_image_the_models_could_not_judge(tmp_path):
    study = generate_uid()
    a, b = make_cxr(study_uid=study, rows=128, cols=128), make_cxr(study_uid=study, rows=128, cols=128)
    refused = Prediction.unanalysable("blank or nearly constant image", "soft", MODELS, (128, 128))
    sr = write_and_check(
        build_sr([(a, normal(128, 128)), (b, refused)], **uids(9001)), tmp_path / "sr.dcm", templates=True
    )
    groups = containers(sr, "Imaging Measurements")[0].ContentSequence
    findings = [named(g.ContentSequence, "Finding")[0].ConceptCodeSequence[0].CodeMeaning for g in groups]
    assert findings == ["No abnormality", "Indeterminate"]
    assert named(groups[1].ContentSequence, "Tracking Identifier")[0].TextValue == (
        "AI: not analysable (blank or nearly constant image)"
    )
    (source,) = named(groups[1].ContentSequence, "Source of Measurement")  # the whole image, for viewers
    assert source.ValueType == "SCOORD" and list(source.GraphicData) == [0, 0, 128, 0, 128, 128, 0, 128, 0, 0]


def test_sr_template_warnings_are_the_known_ones(tmp_path):
    """PixelMed's 2022 tables lack rows the SR uses: TID 4019 "Algorithm Manufacturer" and a Comment in a TID 1501
    group (the words OHIF shows); everything else matches the templates."""
    study = generate_uid()
    a, b = make_cxr(study_uid=study, rows=128, cols=128), make_cxr(study_uid=study, rows=128, cols=128)
    refused = Prediction.unanalysable("blank or nearly constant image", "soft", MODELS, (128, 128))
    path = tmp_path / "sr.dcm"
    build_sr([(a, abnormal(128, 128)), (b, refused)], **uids(9001)).save_as(path, enforce_file_format=True)
    report = sr_validator(path)
    known = (
        'TEXT (122405,DCM,"Algorithm Manufacturer"): Content Item not in template',
        'TEXT (121106,DCM,"Comment"): Content Item not in template',
    )
    assert [w for w in report.warnings if not w.endswith(known)] == [], report.output
    assert [e for e in report.errors if KNOWN_VALIDATOR_LAG not in e] == [], report.output


def test_sr_on_real_radiographs(tmp_path, real_source):
    rows, cols = int(real_source.Rows), int(real_source.Columns)
    pred = abnormal(rows, cols)
    sr = write_and_check(build_sr([(real_source, pred)], **uids(9001)), tmp_path / "sr.dcm")
    same_patient_and_study(sr, real_source)
    lines = polylines(sr)
    np.testing.assert_allclose([g for _, g in lines], [closed_box(f.box) for f in pred.findings], atol=1e-3)
    assert real_source.SOPInstanceUID in dsrdump(tmp_path / "sr.dcm")


def test_sr_covers_several_images_of_one_study(tmp_path):
    study = generate_uid()
    a, b = make_cxr(study_uid=study, rows=128, cols=128), make_cxr(study_uid=study, view="AP", rows=120, cols=100)
    sr = write_and_check(
        build_sr([(a, abnormal(128, 128)), (b, normal(120, 100))], **uids(9001)), tmp_path / "sr.dcm", templates=True
    )
    assert {ref for ref, _ in polylines(sr)} == {a.SOPInstanceUID}
    text = dsrdump(tmp_path / "sr.dcm")
    assert a.SOPInstanceUID in text and b.SOPInstanceUID in text
    assert '(263654008,SCT,"Abnormal")' in text


def test_sr_is_deterministic_for_the_same_result(source):
    src, _ = source
    kw = uids(9001)
    one, two = build_sr([(src, abnormal(256, 200))], **kw), build_sr([(src, abnormal(256, 200))], **kw)
    assert one.ContentSequence == two.ContentSequence


def test_private_codes_are_declared(tmp_path, source):
    src, _ = source
    sr = build_sr([(src, abnormal(256, 200))], **uids(9001))
    schemes = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    assert C.PRIVATE_SCHEME in schemes


@pytest.mark.parametrize("problem", ["size", "study", "score", "class"])
def test_sr_refuses_inconsistent_input(source, problem):
    src, _ = source
    pred, sources = abnormal(256, 200), None
    if problem == "size":
        pred = dataclasses.replace(pred, image_size=(512, 400))
    elif problem == "score":
        pred = dataclasses.replace(pred, findings=(finding(3, 1.5, (1, 1, 5, 5)),))
    elif problem == "class":
        pred = dataclasses.replace(pred, findings=(Finding(14, "No finding", 0.5, (1, 1, 5, 5), 0.5),))
    elif problem == "study":
        sources = [(src, pred), (make_cxr(rows=256, cols=200), pred)]
    with pytest.raises(EncodingError):
        build_sr(sources or [(src, pred)], **uids(9001))


def test_boxes_outside_the_image_are_clipped(source):
    src, _ = source
    pred = dataclasses.replace(abnormal(256, 200), findings=(finding(12, 0.7, (-10, 240, 230, 300)),))
    [(_, line)] = polylines(build_sr([(src, pred)], **uids(9001)))
    assert line == [0, 240, 200, 240, 200, 256, 0, 256, 0, 240]


# --- codes and provenance -----------------------------------------------------------------------


def test_code_table_covers_every_class():
    seen = set()
    for class_id in range(len(FINDING_CLASSES) + 1):
        code = C.finding_code(class_id)
        assert code.scheme_designator in ("SCT", "DCM", C.PRIVATE_SCHEME) and code.meaning
        seen.add((code.value, code.scheme_designator))
    assert len(seen) == len(FINDING_CLASSES) + 1
    assert C.finding_code(7).value == "112001" and C.finding_code(3).value == "8186001"
    with pytest.raises(KeyError):
        C.finding_code(15)


def test_device_uid_changes_with_the_weights():
    uid = model_device_uid(MODELS)
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == model_device_uid(reversed(MODELS))
    changed = (MODELS[0], dataclasses.replace(MODELS[1], sha256="c3" * 32))
    assert model_device_uid(changed) != uid
    assert model_device_uid(MODELS[:1]) == "2.25." + str(int(("a1" * 32)[:32], 16))
    with pytest.raises(EncodingError):
        model_device_uid([])


# --- Secondary Capture --------------------------------------------------------------------------


def check_sc(sc, src, pred) -> None:
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    same_patient_and_study(sc, src)
    assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    px = sc.pixel_array
    rows, cols = int(src.Rows), int(src.Columns)
    band = (px.shape[0] - rows) // 2
    assert px.shape == (rows + 2 * band, cols, 3) and band >= 28
    banner = px[:band]
    assert (banner.reshape(-1, 3).max(axis=1) > 0).all(), "banner must be visible, no black pixels"
    assert (banner == BANNER_RGB).all(axis=2).mean() > 0.5  # red background ...
    assert (banner == 255).all(axis=2).any()  # ... with white text
    for f in pred.findings:  # box edges are coloured
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        edge = px[band + (y0 + y1) // 2, x0]
        assert not (edge[0] == edge[1] == edge[2]), f"{f.label}: box edge is grey {edge}"


def test_sc_with_two_findings_and_normal(tmp_path, source):
    src, path = source
    img = load_image(path)
    for name, pred in (("abn", abnormal(256, 200)), ("norm", normal(256, 200))):
        sc = write_and_check(build_sc(src, img, pred, **uids(9002)), tmp_path / f"sc_{name}.dcm")
        check_sc(sc, src, pred)


def test_sc_on_real_radiographs(tmp_path, real_source):
    rows, cols = int(real_source.Rows), int(real_source.Columns)
    pred = abnormal(rows, cols)
    sc = write_and_check(build_sc(real_source, load_image(real_source), pred, **uids(9002)), tmp_path / "sc.dcm")
    check_sc(sc, real_source, pred)


@pytest.mark.parametrize(
    "orientation,expected",
    [
        (["P", "FL"], ["P", "FL"]),  # oblique, valid: kept (highdicom's SCImage alone refuses it)
        (["L", "F"], ["L", "F"]),
        (["LR", "F"], None),  # both ends of one axis: not an orientation, left empty (unknown, not invented)
        (["L", "R"], None),  # rows and columns along one axis
        (["X", "F"], None),
        ("LF", None),  # one value, not two
    ],
)
def test_sc_keeps_the_sources_patient_orientation_oblique_too(tmp_path, orientation, expected):
    src = make_cxr(rows=256, cols=200, PatientOrientation=orientation)
    pred = abnormal(256, 200)
    sc = write_and_check(build_sc(src, np.zeros((256, 200), np.float32), pred, **uids(9002)), tmp_path / "sc.dcm")
    assert (list(sc.PatientOrientation) if sc.PatientOrientation else None) == expected


def test_sc_refuses_an_image_of_another_size(source):
    src, _ = source
    with pytest.raises(EncodingError):
        build_sc(src, np.zeros((10, 10), np.float32), normal(256, 200), **uids(9002))


# --- GSPS ---------------------------------------------------------------------------------------


def graphic_objects(pr):
    return [g for ann in pr.GraphicAnnotationSequence for g in ann.get("GraphicObjectSequence", [])]


def test_gsps_with_two_findings(tmp_path, source):
    src, path = source
    pred = abnormal(256, 200)
    pr = write_and_check(build_gsps(src, pred, window=display_window(path), **uids(9003)), tmp_path / "pr.dcm")
    assert pr.SOPClassUID == GSPS and pr.Modality == "PR"
    same_patient_and_study(pr, src)
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [LAYER_NAME]
    ann = pr.GraphicAnnotationSequence[0]
    assert ann.GraphicLayer == LAYER_NAME
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    objs = graphic_objects(pr)
    assert all(
        g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL" and g.NumberOfGraphicPoints == 5
        for g in objs
    )
    expected = [closed_box(f.box) for f in sorted(pred.findings, key=lambda f: -f.score)]
    np.testing.assert_allclose([list(g.GraphicData) for g in objs], expected, atol=1e-3)
    texts = [t.UnformattedTextValue for t in ann.TextObjectSequence]
    assert "Cardiomegaly 0.83" in texts and "Aortic enlargement 0.61" in texts
    assert any(t.startswith("AI result - not for primary diagnosis") for t in texts)
    assert pr.PresentationLUTShape == "IDENTITY"
    voi = pr.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == display_window(path)


def test_gsps_normal_has_text_but_no_boxes(tmp_path, source):
    src, _ = source
    pr = write_and_check(build_gsps(src, normal(256, 200), **uids(9003)), tmp_path / "pr.dcm")
    assert graphic_objects(pr) == []
    assert (
        "No abnormality, P(abnormal) = 0.07"
        in pr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    )


def test_gsps_on_real_radiographs_keeps_the_display(tmp_path, real_source):
    rows, cols = int(real_source.Rows), int(real_source.Columns)
    pred = abnormal(rows, cols)
    pr = write_and_check(
        build_gsps(real_source, pred, window=display_window(real_source), **uids(9003)), tmp_path / "pr.dcm"
    )
    same_patient_and_study(pr, real_source)
    assert len(graphic_objects(pr)) == 2
    assert pr.PresentationLUTShape == "INVERSE"  # both samples are MONOCHROME1


def test_gsps_does_not_copy_a_nonsense_window(tmp_path):
    src = make_cxr(rows=64, cols=64, window=(2048, 0))
    pr = write_and_check(build_gsps(src, normal(64, 64), **uids(9003)), tmp_path / "pr.dcm")
    assert "SoftcopyVOILUTSequence" not in pr
    pr = build_gsps(src, normal(64, 64), window=display_window(src), **uids(9003))
    assert float(pr.SoftcopyVOILUTSequence[0].WindowWidth) > 1


# --- the validator itself -------------------------------------------------------------------------


def test_dciodvfy_reports_errors(tmp_path):
    broken = make_cxr(rows=32, cols=32)
    del broken.ViewPosition, broken.ImagerPixelSpacing
    broken.Modality = "XX"
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    report = dciodvfy(tmp_path / "broken.dcm")
    assert not report.ok and any("Modality" in e or "Imager Pixel Spacing" in e for e in report.errors)
    with pytest.raises(EncodingError):
        dsrdump(tmp_path / "broken.dcm")


def test_each_output_series_has_its_own_description_date_and_number(tmp_path, source):
    """Viewers list the three output series side by side: they must tell which is which, and PACS file
    series by date (Orthanc shows "?" without one)."""
    src, path = source
    pred = abnormal(256, 200)
    made = {
        "sr": build_sr([(src, pred)], **uids(9001)),
        "sc": build_sc(src, load_image(path), pred, **uids(9002)),
        "gsps": build_gsps(src, pred, **uids(9003)),
    }
    for kind, ds in made.items():
        out = write_and_check(ds, tmp_path / f"{kind}.dcm")
        assert out.SeriesDescription == SERIES_DESCRIPTION[kind]
        assert re.fullmatch(r"\d{8}", out.SeriesDate) and re.fullmatch(r"\d{6}(\.\d+)?", out.SeriesTime)
    assert [int(d.SeriesNumber) for d in made.values()] == [9001, 9002, 9003]
    assert len({d.SeriesDescription for d in made.values()}) == 3
    assert all(d.startswith("AI ") and d.endswith("not for primary diagnosis") for d in SERIES_DESCRIPTION.values())


def test_gsps_layer_has_colour_and_grayscale_display_values(source):
    src, _ = source
    (layer,) = build_gsps(src, abnormal(256, 200), **uids(9003)).GraphicLayerSequence
    assert len(layer.GraphicLayerRecommendedDisplayCIELabValue) == 3
    assert layer.GraphicLayerRecommendedDisplayGrayscaleValue == 0xFFFF
