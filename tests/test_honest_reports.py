"""Reports that say only what the models support: the input check ("not analysable"), the detector's reportable
classes and floors, and a site's own operating points (``dicom-node calibrate``), on real NIH films."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.outputs.captions import summary_text
from dicom_node.outputs.sr import build_sr, study_statement
from dicom_node.outputs.validate import dsrdump
from inference.calibration import Calibration
from inference.detector import Detector
from inference.modelfile import load_model_file, save_model_file
from inference.pipeline import Pipeline
from inference.preprocess import apply_clahe, to_model_input
from inference.quality import colour_problem, input_problem
from inference.training.calibrate import choose_calibration
from inference.training.data.images import load_image01
from inference.training.data.nih import read_nih_matched
from inference.types import FINDING_CLASSES, Prediction
from support.dicom_factory import make_cxr
from support.models import make_tiny_models
from support.provenance import IDENTITY, MODELS

REPO = Path(__file__).resolve().parents[1]


def dicom_node(*args: object) -> subprocess.CompletedProcess:
    """The command line as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def matched(datasets_dir):
    return read_nih_matched(datasets_dir)


@pytest.fixture(scope="module")
def real_image(matched) -> np.ndarray:
    return load_image01(matched[0].path)


# --- the input check -----------------------------------------------------------------------------


def test_real_radiographs_pass_the_input_check(matched):
    assert [s.image_id for s in matched[::10] if input_problem(load_image01(s.path))] == []


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda img: np.full_like(img, 0.5), "blank"),
        (lambda img: np.zeros_like(img), "blank"),
        (lambda img: (img > 0.5).astype(np.float32), "grey levels"),  # a mask
        (lambda img: np.where(img > np.quantile(img, 0.3), 1.0, img), "saturated"),  # burnt out: 70 % white
        (lambda img: cv2.resize(img, (40, 40)), "too small"),
        (lambda img: cv2.resize(img, (1200, 300)), "shape"),  # a strip
        (lambda img: np.clip(img * 0.25 + 0.86, 0, 1), "white"),
    ],
)
def test_images_outside_what_the_models_learnt_are_refused_with_a_reason(real_image, make, words):
    reason = input_problem(make(real_image))
    assert reason is not None and words in reason


def test_a_colour_photograph_is_told_from_a_grey_picture_saved_as_colour(real_image):
    grey = np.rint(real_image * 255).astype(np.uint8)
    assert colour_problem(np.dstack([grey] * 3)) is None
    photo = np.dstack([grey, np.clip(grey.astype(int) + 60, 0, 255).astype(np.uint8), grey // 2])
    assert "colour" in colour_problem(photo)


def test_pipeline_gives_no_probability_for_a_blank_image(tmp_path, real_image):
    clf, det = make_tiny_models(tmp_path, p_abnormal=0.9, detector_logit=1.0)
    pipe = Pipeline.from_files(clf, det)
    good = pipe.run(real_image)
    assert not good.not_analysable and good.abnormal and good.findings
    blank = pipe.run(np.full((300, 300), 0.4, np.float32))
    assert "blank" in blank.not_analysable
    assert np.isnan(blank.p_abnormal) and blank.findings == () and blank.abnormal is False
    d = blank.to_json()
    assert d["p_abnormal"] is None and d["abnormal"] is None and d["not_analysable"]
    json.dumps(d, allow_nan=False)  # valid JSON
    assert summary_text(blank).startswith("Not analysable: blank")


def _uids() -> dict:
    return dict(series_uid=generate_uid(), sop_uid=generate_uid(), series_number=9001, instance_number=1)


def test_sr_of_a_study_no_image_of_which_could_be_judged_says_so(tmp_path):
    src = make_cxr(tmp_path / "a.dcm")
    refused = Prediction.unanalysable("blank or nearly constant image", "soft", MODELS, (256, 256))
    sr = build_sr([(src, refused)], identity=IDENTITY, **_uids())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    text = dsrdump(tmp_path / "sr.dcm", "+Pl")
    assert '"Finding")=(82334004,SCT,"Indeterminate")' in text
    assert "No abnormality" not in text and "P(abnormal)" not in text
    assert "AI: no result, 1 of 1 image not analysable (blank or nearly constant image)" in text
    assert "AI: not analysable (blank" in text  # the whole-image group viewers draw on the image


def test_sr_of_a_study_with_one_unjudged_image_reports_the_other_and_names_the_first(tmp_path):
    study = generate_uid()
    a = make_cxr(tmp_path / "a.dcm", study_uid=study)
    b = make_cxr(tmp_path / "b.dcm", study_uid=study)
    judged = Prediction(0.1, 0.88, (), "soft", MODELS, (256, 256))
    refused = Prediction.unanalysable(
        "only 2 grey levels: a drawing or a mask, not a radiograph", "soft", MODELS, (256, 256)
    )
    finding, statement = study_statement([judged, refused])
    assert finding.meaning == "No abnormality"
    assert statement.startswith("AI: no abnormality detected, P(abnormal) = 0.12")
    assert statement.endswith(
        "; 1 of 2 images not analysable (only 2 grey levels: a drawing or a mask, not a radiograph)"
    )
    sr = build_sr([(a, judged), (b, refused)], identity=IDENTITY, **_uids())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    text = dsrdump(tmp_path / "sr.dcm", "+Pl")
    assert '(82334004,SCT,"Indeterminate")' in text and '(111286,DCM,"No abnormality")' in text


@pytest.mark.slow  # analyze loads the shipped models
def test_analyze_refuses_a_colour_photo_and_a_blank_image_with_their_reasons(tmp_path, real_image):
    grey = np.rint(real_image * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), np.dstack([grey // 2, grey, np.clip(grey.astype(int) + 80, 0, 255)]))
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((400, 400), 128, np.uint8))
    out = dicom_node(
        "analyze", str(tmp_path / "photo.png"), str(tmp_path / "blank.png"), "--output", str(tmp_path / "out")
    )
    assert "photo.png: ERROR photo.png: not analysable: a colour picture" in out.stdout, out.stdout + out.stderr
    assert "blank.png: not analysable: blank or nearly constant image" in out.stdout
    result = json.loads((tmp_path / "out" / "blank.json").read_text())
    assert result["p_abnormal"] is None and result["not_analysable"].startswith("blank")


# --- the detector says only what it can support --------------------------------------------------


def test_detector_reports_only_its_reportable_classes_above_their_floors(tmp_path, real_image):
    _, det_path = make_tiny_models(tmp_path, detector_logit=1.0)
    loaded = load_model_file(det_path, "detector")
    everything = Detector.load(det_path)
    x, geom = to_model_input(apply_clahe(real_image, everything.preprocess), everything.preprocess)
    all_boxes = everything.detect(x, geom, conf=0.01)
    assert len(set(all_boxes.class_ids.tolist())) > 2  # random heads: boxes of many classes
    loaded.metadata.extra.update(
        {"reportable_classes": ["Cardiomegaly", "Pleural effusion"], "class_floors": {"Cardiomegaly": 0.9}}
    )
    save_model_file(tmp_path / "tuned.pt", loaded.metadata, loaded.state_dict, loaded.model_yaml)
    tuned = Detector.load(tmp_path / "tuned.pt").detect(x, geom, conf=0.01)
    names = {FINDING_CLASSES[c] for c in tuned.class_ids}
    assert names <= {"Cardiomegaly", "Pleural effusion"}
    cardio = tuned.scores[tuned.class_ids == FINDING_CLASSES.index("Cardiomegaly")]
    assert (cardio >= 0.9).all()
    assert len(tuned) == int(
        (all_boxes.class_ids == FINDING_CLASSES.index("Pleural effusion")).sum()
        + ((all_boxes.class_ids == FINDING_CLASSES.index("Cardiomegaly")) & (all_boxes.scores >= 0.9)).sum()
    )


def test_a_detector_file_without_rules_reports_only_classes_it_was_trained_on(tmp_path):
    _, det_path = make_tiny_models(tmp_path)
    loaded = load_model_file(det_path, "detector")
    loaded.metadata.extra["train_set"] = {"boxes_per_class": {"Cardiomegaly": 12, "Nodule/Mass": 0}}
    save_model_file(tmp_path / "d.pt", loaded.metadata, loaded.state_dict, loaded.model_yaml)
    det = Detector.load(tmp_path / "d.pt")
    assert [FINDING_CLASSES[i] for i in np.flatnonzero(det.reportable)] == ["Cardiomegaly"]


@pytest.mark.slow  # fits the detector's per-class rules: the shipped detector over the NIH validation images
def test_tune_detector_on_real_validation_images_writes_the_rules_into_a_copy(tmp_path, datasets_dir):
    shipped = REPO / "models" / "detector.pt"
    out = dicom_node(
        *"tune-detector --layout nih --subset val --data".split(), datasets_dir,
        "--detector", shipped, "--out", tmp_path / "tuned.pt"
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    md = load_model_file(tmp_path / "tuned.pt", "detector").metadata
    per_class = md.extra["postprocess"]["per_class"]
    for name, v in per_class.items():
        assert v["reportable"] == (name in md.extra["reportable_classes"])
        if v["reportable"]:
            assert v["val_ap@0.4"] >= 0.1 and v["trained"] and name in md.extra["class_floors"]
        if not v["trained"]:
            assert not v["reportable"]  # no training boxes: never reported
    assert any(not v["reportable"] for v in per_class.values() if v["trained"])  # weak classes are cut
    assert (
        load_model_file(tmp_path / "tuned.pt", "detector").state_dict.keys()
        == load_model_file(shipped, "detector").state_dict.keys()
    )


# --- site calibration ----------------------------------------------------------------------------


def test_choose_calibration_reaches_the_target_in_every_view():
    rng = np.random.default_rng(0)
    n = 200
    views = np.where(rng.random(n) < 0.5, "PA", "AP")
    y = (rng.random(n) < 0.5).astype(int)
    shift = np.where(views == "AP", -0.3, 0.0)  # AP scores lower: one threshold for both would miss AP disease
    p = np.clip(0.5 + 0.25 * (y - 0.5) + shift + rng.normal(0, 0.15, n), 0.001, 0.999)
    cal = choose_calibration(y, p, views, 0.9)
    assert set(cal.per_view) == {"AP", "PA"} and cal.per_view["AP"] < cal.per_view["PA"]
    for view in ("AP", "PA"):
        m = (views == view) & (y == 1)
        assert (p[m] >= cal.threshold(view)).mean() >= 0.9
        assert cal.metrics[view]["sensitivity"] >= 0.9
        lo, hi = cal.metrics[view]["specificity_ci95"]
        assert lo <= cal.metrics[view]["specificity"] <= hi
    assert cal.threshold(None) == cal.default and cal.threshold("LL") == cal.default


def test_calibration_file_round_trips_and_refuses_other_files(tmp_path):
    cal = Calibration(0.4, {"AP": 0.3}, 0.9, "ab" * 32, "test")
    again = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert again.threshold("ap") == 0.3 and again.threshold("PA") == 0.4
    (tmp_path / "other.json").write_text('{"default": 0.5}')
    from inference.errors import ModelError

    with pytest.raises(ModelError, match="not a dicom-node calibration file"):
        Calibration.load(tmp_path / "other.json")
    with pytest.raises(ModelError, match="between 0 and 1"):
        Calibration(1.5)
    clf, _ = make_tiny_models(tmp_path / "m")
    from inference.classifier import Classifier

    with pytest.raises(ModelError, match="made for another classifier"):
        Classifier.load(clf).use_calibration(cal, "cal.json")  # chosen for the model with sha256 abab...


@pytest.mark.slow  # fits the operating points: the shipped classifier over a site folder of real images
def test_calibrate_on_a_local_labelled_folder_and_run_with_it(tmp_path, matched):
    """A site's folder of PNG/JPEG and DICOM files with labels.csv: calibrate, then the node decides at the
    operating point of each image's view."""
    images = tmp_path / "site"
    images.mkdir()
    rows = []
    picked = {}
    for s in matched:
        key = (s.view, s.label)
        if s.split == "val" and picked.get(key, 0) < 12:
            picked[key] = picked.get(key, 0) + 1
            (images / s.path.name).symlink_to(s.path)
            rows.append({"image": s.path.name, "label": s.label, "view": s.view})
    pixels = np.rint(load_image01(matched[1].path) * 4095).astype(np.uint16)
    make_cxr(images / "dicom_case.dcm", rows=512, cols=512, pixels=pixels, view="PA")
    rows.append({"image": "dicom_case.dcm", "label": 1, "view": "PA"})
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "view"])
        w.writeheader()
        w.writerows(rows)
    shipped = REPO / "models" / "classifier.pt"
    out = dicom_node(
        *"calibrate --layout folder --target-sensitivity 0.9 --csv".split(), tmp_path / "labels.csv",
        "--images", images, "--classifier", shipped, "--detector", REPO / "models" / "detector.pt",
        "--out", tmp_path / "cal.json"
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rows)} images used" in out.stdout
    assert "sensitivity" in out.stdout and "specificity" in out.stdout and "[" in out.stdout  # with CIs
    cal = Calibration.load(tmp_path / "cal.json")
    assert set(cal.per_view) == {"AP", "PA"}
    assert cal.metrics["AP"]["sensitivity"] >= 0.9 and cal.metrics["PA"]["sensitivity"] >= 0.9

    det = REPO / "models" / "detector.pt"
    plain = Pipeline.from_files(shipped, det)
    calibrated = Pipeline.from_files(shipped, det, calibration=tmp_path / "cal.json")
    decided = {"AP": [], "PA": []}
    for r in rows[:-1]:
        img = load_image01(images / r["image"])
        raw = float(plain.classifier.predict_raw(plain.classifier_input(img)[None])[0])
        p = calibrated.run(img, view=r["view"]).p_abnormal
        assert (p >= 0.5) == (raw >= cal.threshold(r["view"]) - 1e-9)
        if r["label"] == 1:
            decided[r["view"]].append(p >= 0.5)
    assert np.mean(decided["AP"]) >= 0.9 and np.mean(decided["PA"]) >= 0.9  # the target, in each view
    assert pydicom.dcmread(images / "dicom_case.dcm").ViewPosition == "PA"
