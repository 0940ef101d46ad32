"""inference.pipeline / fusion / classifier / detector and dicom_node.work.offline on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.classifier import Classifier
from inference.detector import Detector
from inference.errors import ModelError
from inference.fusion import FusionParams, fuse
from inference.pipeline import Pipeline
from inference.preprocess import prepare, working_image
from inference.types import FINDING_CLASSES, Prediction
from support.models import make_tiny_classifier, make_tiny_detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NIH_IMAGES = SHARED / "datasets" / "nih-bbox" / "images"
SAMPLES = SHARED / "samples"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, whichever module ran before in this process: a batch and the single images then
    sum in the same order (the tiny detector's boxes tie, so the order of the sums decides which boxes survive)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)  # the next module's tests in this test process get what they had


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "clf_high": make_tiny_classifier(d / "clf_high.pt", p_abnormal=0.9),
        "clf_low": make_tiny_classifier(d / "clf_low.pt", p_abnormal=0.1),
        "clf_random": make_tiny_classifier(d / "clf_random.pt"),
        "det_boxes": make_tiny_detector(d / "det_boxes.pt", detector_logit=1.0),  # scores ~0.73
        "det_random": make_tiny_detector(d / "det_random.pt"),
    }


@pytest.fixture(scope="module")
def nih_image():
    files = sorted(NIH_IMAGES.glob("*.[jp][pn]g"))
    if not files:
        pytest.skip(f"no NIH images under {NIH_IMAGES}")
    img = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE)
    return files[0], img.astype(np.float32) / 255.0


_LOADED: dict = {}


def _pipe(models, clf="clf_high", det="det_boxes", **fusion):
    """A pipeline over cached loaded models (loading a detector costs ~0.5 s on a busy CPU)."""
    for name, cls in ((clf, Classifier), (det, Detector)):
        if (models[name], name) not in _LOADED:
            _LOADED[(models[name], name)] = cls.load(models[name])
    return Pipeline(_LOADED[(models[clf], clf)], _LOADED[(models[det], det)], FusionParams(**fusion))


def _assert_boxes_inside(pred: Prediction):
    rows, cols = pred.image_size
    for f in pred.findings:
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows, f.box
        assert f.label == FINDING_CLASSES[f.class_id] and 0 <= f.score <= 1


def test_pipeline_on_nih_png(models, nih_image):
    _, img = nih_image
    pipe = Pipeline.from_files(models["clf_random"], models["det_boxes"], {"mode": "soft"})
    pred = pipe.run(img)
    assert isinstance(pred, Prediction)
    assert pred.image_size == img.shape
    assert 0 <= pred.p_abnormal <= 1 and 0 <= pred.p_no_finding <= 1
    assert set(pred.timings_s) >= {"clahe", "classifier", "detector", "fusion", "total"}
    assert [m.name for m in pred.models] == ["classifier", "detector"]
    assert all(len(m.sha256) == 64 for m in pred.models)
    _assert_boxes_inside(pred)
    json.dumps(pred.to_json())


def test_boxes_in_source_pixels_on_non_square_image(models, nih_image):
    _, img = nih_image
    crop = np.ascontiguousarray(img[40:460, 100:330])  # tall, 420 x 230
    # every raw box, same-class suppression off: this test is about geometry
    pipe = _pipe(
        models, max_findings=300, min_score=0.0, detector_conf=0.01, same_class_iou=1.0, same_class_containment=1.0
    )
    pred = pipe.run(crop)
    assert pred.findings
    _assert_boxes_inside(pred)
    # the pipeline's boxes are exactly the detector's input-pixel boxes mapped through the letterbox and back
    # from the working size (CLAHE runs at the models' input size) to the source pixels
    work, (fx, fy) = working_image(
        crop, max(pipe.classifier.preprocess.input_size, pipe.detector.preprocess.input_size)
    )
    assert max(work.shape) < max(crop.shape) and fy > 1
    x, geom = prepare(work, pipe.detector.preprocess)
    raw = pipe.detector.predict(x, conf=0.01, max_det=300)[0]
    expected = geom.to_source(raw[:, :4]) * np.array([fx, fy, fx, fy])
    got = np.array(sorted(f.box for f in pred.findings))
    np.testing.assert_allclose(got, np.array(sorted(map(tuple, expected)))[: len(got)], atol=1e-3)


def test_gate_mode_no_findings_below_threshold(models, nih_image):
    _, img = nih_image
    pred = _pipe(models, clf="clf_low", mode="gate", abnormal_threshold=0.5).run(img)
    assert pred.p_abnormal == pytest.approx(0.1, abs=1e-4)
    assert pred.findings == () and pred.fusion_mode == "gate"
    assert pred.p_no_finding == pytest.approx(0.9, abs=1e-4)
    assert pred.timings_s["detector"] == 0.0 and not pred.abnormal
    above = _pipe(models, clf="clf_high", mode="gate", abnormal_threshold=0.5).run(img)
    assert above.findings and above.timings_s["detector"] > 0
    assert all(f.score == f.detector_score for f in above.findings)  # gate keeps detector scores
    assert above.p_no_finding == pytest.approx(1 - max(above.p_abnormal, above.findings[0].score), abs=1e-6)


def test_soft_mode_always_reports_p_no_finding(models, nih_image):
    _, img = nih_image
    for clf, det in [("clf_low", "det_boxes"), ("clf_high", "det_boxes"), ("clf_low", "det_random")]:
        pred = _pipe(models, clf=clf, det=det, mode="soft").run(img)
        assert pred.fusion_mode == "soft" and 0 <= pred.p_no_finding <= 1
        assert pred.timings_s["detector"] > 0  # detector always runs
        top = max((f.score for f in pred.findings), default=0.0)
        assert pred.p_no_finding == pytest.approx(1 - max(pred.p_abnormal, top), abs=1e-6)
        for f in pred.findings:
            assert f.score == pytest.approx(np.sqrt(f.detector_score * pred.p_abnormal), abs=1e-6)
            assert f.score >= 0.25
        assert len(pred.findings) <= 20
    # random detector weights (bias-initialised) find nothing: "no finding" = 1 - p_abnormal
    assert pred.findings == () and pred.p_no_finding == pytest.approx(0.9, abs=1e-4)


def test_fusion_rules_directly():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2], [0, 0, 3, 3]], float)
    scores = np.array([0.81, 0.2, 0.04, 0.9])
    cls = np.array([3, 10, 0, 99])  # 99: not a finding class, dropped
    f, pnf = fuse(0.25, boxes, scores, cls, FusionParams(mode="soft", min_score=0.3, detector_conf=0.05))
    assert [x.class_id for x in f] == [3] and f[0].score == pytest.approx(0.45)
    assert pnf == pytest.approx(0.55)
    f, pnf = fuse(0.95, boxes, scores, cls, FusionParams(mode="soft", min_score=0.0, max_findings=1))
    assert len(f) == 1 and f[0].class_id == 3 and pnf == pytest.approx(0.05)
    f, pnf = fuse(0.4, boxes, scores, cls, FusionParams(mode="gate", abnormal_threshold=0.5))
    assert f == () and pnf == pytest.approx(0.6)
    f, _ = fuse(0.6, boxes, scores, cls, FusionParams(mode="gate", abnormal_threshold=0.5, min_score=0.5))
    assert [x.score for x in f] == [0.81]
    with pytest.raises(ValueError, match="fusion mode"):
        FusionParams(mode="average")


def test_one_finding_is_one_box():
    """Stacked boxes of one class on one structure become one finding; other classes, and the same class on
    the other side of the chest, stay."""
    boxes = np.array(
        [
            [100, 200, 300, 400],  # cardiomegaly, strongest
            [110, 210, 310, 390],  # cardiomegaly again, IoU ~0.85
            [150, 250, 250, 350],  # cardiomegaly nested inside the first (IoU 0.25): still the same finding
            [100, 200, 300, 400],  # aortic enlargement on the same spot: another finding
            [20, 50, 90, 300],  # pleural effusion, right
            [410, 50, 480, 300],  # pleural effusion, left: a second finding of that class
        ],
        float,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.85, 0.75])
    cls = np.array([3, 3, 3, 0, 10, 10])
    f, _ = fuse(0.9, boxes, scores, cls, FusionParams(min_score=0.0))
    assert sorted((x.class_id, x.box[0]) for x in f) == [(0, 100.0), (3, 100.0), (10, 20.0), (10, 410.0)]
    # off (1.0): the stacked boxes come back
    f, _ = fuse(0.9, boxes, scores, cls, FusionParams(min_score=0.0, same_class_iou=1.0, same_class_containment=1.0))
    assert len(f) == 6


def test_fusion_params_from_node_config():
    from dicom_node.config import FusionConfig

    p = FusionParams.from_obj(FusionConfig(mode="gate", abnormal_threshold=0.3, max_findings=5))
    assert (p.mode, p.abnormal_threshold, p.max_findings, p.min_score) == ("gate", 0.3, 5, 0.25)
    assert FusionParams.from_obj({"mode": "soft", "min_score": 0.1}).min_score == 0.1


def test_refuses_non_2d_input(models):
    pipe = _pipe(models)
    with pytest.raises(ValueError, match="2-D greyscale"):
        pipe.run(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="2-D greyscale"):
        pipe.run(np.zeros((2, 64, 64), np.float32))


def test_swapped_model_paths_are_refused(models):
    with pytest.raises(ModelError, match="are the classifier and detector paths swapped"):
        Pipeline.from_files(models["det_boxes"], models["clf_high"])


def test_classifier_and_detector_apis(models):
    clf = Classifier.load(models["clf_high"])
    p = clf.predict(np.zeros((2, 1, 64, 64), np.float32))
    assert p.shape == (2,) and np.allclose(p, 0.9, atol=1e-4)
    with pytest.raises(ValueError, match="N x 1"):
        clf.predict(np.zeros((1, 3, 64, 64), np.float32))
    det = Detector.load(models["det_boxes"])
    out = det.predict(np.zeros((1, 3, 128, 128), np.float32), conf=0.5, max_det=7)
    assert len(out) == 1 and out[0].shape == (7, 6)


def test_analyze_files_png_and_bad_input(models, nih_image, tmp_path):
    from dicom_node.work.offline import DISCLAIMER, analyze_files

    src, img = nih_image
    bogus = tmp_path / "broken.png"
    bogus.write_bytes(b"not an image")
    pipe = _pipe(models)
    res = analyze_files(pipe, [src, bogus], tmp_path / "out")
    assert len(res) == 2
    ok, bad = res
    data = json.loads(Path(ok["json"]).read_text())
    assert data["p_abnormal"] == pytest.approx(0.9, abs=1e-3) and data["abnormal"] is True
    assert data["findings"] and data["disclaimer"] == DISCLAIMER
    for f in data["findings"]:
        assert set(f) >= {"label", "code", "score", "box"}
        assert set(f["code"]) == {"scheme", "value", "meaning"} and f["code"]["value"]
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]
    assert {m["name"] for m in data["models"]} == {"classifier", "detector"}
    overlay = cv2.imread(ok["overlay"])
    assert overlay.shape[1:] == (img.shape[1], 3) and overlay.shape[0] > img.shape[0]  # image + banner rows
    assert overlay[2:12, :].max() > 0 and (overlay[:, :, 0] != overlay[:, :, 2]).any()  # banner, colour boxes
    assert "error" in bad and json.loads(Path(bad["json"]).read_text())["error"]


def test_analyze_real_dicom_samples(models, tmp_path):
    pytest.importorskip("dicom_node.imaging.pixels")
    from dicom_node.work.offline import analyze_files

    files = sorted(SAMPLES.glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM samples under {SAMPLES}")
    import pydicom

    res = analyze_files(_pipe(models), files, tmp_path)
    for f, r in zip(files, res):
        assert "error" not in r, r
        hdr = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        assert r["image_size"] == [hdr.Rows, hdr.Columns]  # source pixels, also for the JPEG 2000 sample
        assert r["findings"] and all(
            0 <= x["box"][0] < x["box"][2] <= hdr.Columns and 0 <= x["box"][1] < x["box"][3] <= hdr.Rows
            for x in r["findings"]
        )
        assert Path(r["overlay"]).exists()


def test_ultralytics_runs_offline_with_a_local_font():
    import os

    from ultralytics.utils.checks import check_font

    import inference.ultralytics_env  # noqa: F401

    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ.get("MPLCONFIGDIR")
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    assert font.stat().st_size > 100_000
    assert Path(check_font("Arial.ttf")) == font  # found locally: no download attempted


def test_ultralytics_env_respects_existing_settings(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "MPLCONFIGDIR"))}
    env.update(DICOM_NODE_YOLO_DIR=str(tmp_path / "base"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    code = (
        "import os, inference.ultralytics_env as e; "
        "print(os.environ['YOLO_CONFIG_DIR']); print(os.environ['MPLCONFIGDIR'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(tmp_path / "base"), str(tmp_path / "mpl")]
    assert (tmp_path / "base" / "Ultralytics" / "Arial.ttf").is_file()


def test_prediction_rescaled_to_the_source_size_scales_boxes_and_size():
    """A JPEG 2000 image decoded at half size: its boxes are mapped back onto the source's pixels."""
    from inference.types import Finding, Prediction

    f = Finding(class_id=3, label="Cardiomegaly", score=0.9, box=(10.0, 20.0, 30.0, 40.5), detector_score=0.8)
    pred = Prediction(
        p_abnormal=0.9, p_no_finding=0.1, findings=(f,), fusion_mode="soft", models=(), image_size=(978, 921)
    )
    src = pred.rescaled((1955, 1841))
    assert src.image_size == (1955, 1841)
    (g,) = src.findings
    assert g.box == pytest.approx((10 * 1841 / 921, 20 * 1955 / 978, 30 * 1841 / 921, 40.5 * 1955 / 978))
    assert (g.label, g.score, g.class_id) == (f.label, f.score, f.class_id)
    assert pred.rescaled((978, 921)) is pred


def test_a_batch_of_images_gives_what_each_image_gives_alone(models, nih_image):
    """The worker runs a study's images through each network together (inference.models.batch_images); the result
    per image is the one-at-a-time result. Real images of different sizes and views, one not analysable."""
    pipe = _pipe(models, mode="gate", abnormal_threshold=0.5)
    img = nih_image[1]
    h, w = img.shape
    images = [img, img[: h * 3 // 4], cv2.resize(img, (w // 2, h // 2)), np.zeros_like(img)]
    views = ["PA", "AP", None, "PA"]
    alone = [pipe.run(img, view=v) for img, v in zip(images, views)]
    for size in (1, 2, 8):
        together = pipe.run_batch(images, views, batch_size=size)
        assert len(together) == len(images)
        for a, b in zip(alone, together):
            assert a.not_analysable == b.not_analysable
            if a.not_analysable:
                continue
            assert abs(a.p_abnormal - b.p_abnormal) < 1e-5 and len(a.findings) == len(b.findings) > 0
            for fa, fb in zip(a.findings, b.findings):
                assert fa.label == fb.label and np.allclose(fa.box, fb.box, atol=0.05)
