"""Training learns (a tiny classifier fits real NIH images, and the model file reproduces it through the
inference code path), resumes, and the detector/evaluate commands run end to end at a tiny size on CPU.
Whether a model generalises is measured by ``evaluate`` and reported in the model card, not here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.cli import training as commands
from inference.classifier import Classifier
from inference.detector import Detector
from inference.errors import ModelError
from inference.modelfile import read_metadata
from inference.preprocess import prepare
from inference.training.data.images import load_image01
from inference.training.data.nih import read_nih, read_nih_matched
from inference.training.data.split import split_by_patient, subsample
from inference.training.metrics import roc_auc
from inference.training.train_classifier import ClassifierTrainConfig, train_classifier
from inference.types import FINDING_CLASSES

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
pytestmark = [
    pytest.mark.slow,  # trains models
    pytest.mark.skipif(not (DATA / "nih-bbox").is_dir(), reason="../shared/datasets not present"),
]


@pytest.fixture(scope="module")
def parts():
    return split_by_patient(read_nih(DATA), seed=0)


@pytest.fixture(scope="module")
def matched():
    samples = read_nih_matched(DATA)
    return {k: [s for s in samples if s.split == k] for k in ("train", "val", "test")}


@pytest.fixture
def two_torch_threads():
    """Two intra-op threads while training; what the test process had before afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_tiny_classifier_learns_and_resumes(matched, tmp_path, two_torch_threads):
    train, val = subsample(matched["train"], 48, 0), subsample(matched["val"], 40, 0)
    cfg = ClassifierTrainConfig(
        arch="resnet10t", input_size=64, epochs=3, batch=16, seed=0, lr=3e-3, augment="none", select="auc"
    )
    first = train_classifier(train, val, tmp_path, cfg)
    cfg.epochs = 6
    res = train_classifier(train, val, tmp_path, cfg, resume=True)  # continues at epoch 4
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4, 5, 6]
    assert res["history"][:3] == first["history"]
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"] - 0.1, res["history"]

    md = read_metadata(res["model_path"])
    assert md.kind == "classifier" and md.architecture == "resnet10t" and md.input_size == 64
    assert md.preprocess.intensity == "rank"  # the input normalisation travels with the model
    thr = md.extra["abnormal_threshold"]
    assert 0 < thr < 1 and md.metrics["abnormal_threshold"] == thr
    assert "images" in md.training_data and set(md.extra["val_per_view"]) >= {"AP", "PA"}
    assert {"val_auc", "val_worst_view_auc"} <= set(md.extra["history"][0])

    # the written model file, through the inference code path, reproduces what it learnt on its training images
    clf = Classifier.load(res["model_path"])
    x = np.stack([prepare(load_image01(s.path), clf.preprocess)[0] for s in train])
    assert roc_auc([s.label for s in train], clf.predict(x)) > 0.8


def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_tiny_detector_and_evaluate_commands(tmp_path):
    data = ["--layout", "nih", "--data", str(DATA), "--seed", "0"]
    det_args = _args(
        commands.add_train_detector_arguments,
        data
        + [
            "--out",
            str(tmp_path / "det"),
            "--model",
            "yolov8n",
            "--epochs",
            "1",
            "--imgsz",
            "128",
            "--batch",
            "4",
            "--limit-train",
            "8",
            "--limit-val",
            "4",
            "--workers",
            "0",
            "--export-workers",
            "2",
        ],
    )
    assert commands.run_train_detector(det_args) == 0
    det_path = tmp_path / "det" / "detector.pt"
    det = Detector.load(det_path)
    assert det.loaded.metadata.classes == tuple(FINDING_CLASSES)
    assert det.loaded.metadata.architecture == "yolov8n" and det.preprocess.input_size == 128
    assert det.preprocess.intensity == "rank"  # the same input normalisation as the classifier
    splits = json.loads((tmp_path / "det" / "splits.json").read_text())
    assert len(splits["train"]) == 8 and not set(splits["train"]) & set(splits["test"])
    assert (
        commands.run_train_detector(
            _args(
                commands.add_train_detector_arguments,
                [  # finished: no-op resume
                    *data,
                    "--out",
                    str(tmp_path / "det"),
                    "--imgsz",
                    "128",
                    "--epochs",
                    "1",
                    "--limit-train",
                    "8",
                    "--limit-val",
                    "4",
                    "--resume",
                ],
            )
        )
        == 0
    )

    clf_args = _args(
        commands.add_train_classifier_arguments,
        data
        + [
            "--out",
            str(tmp_path / "clf"),
            "--arch",
            "resnet10t",
            "--input-size",
            "64",
            "--epochs",
            "1",
            "--limit-train",
            "16",
            "--limit-val",
            "8",
        ],
    )
    assert commands.run_train_classifier(clf_args) == 0

    ev_args = _args(
        commands.add_evaluate_arguments,
        data
        + [
            "--classifier",
            str(tmp_path / "clf" / "classifier.pt"),
            "--detector",
            str(det_path),
            "--limit",
            "6",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert commands.run_evaluate(ev_args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["modes"]) == {"gate", "soft"}
    assert report["recommended_fusion_mode"] in ("gate", "soft")
    assert report["classifier"]["n"] == 6 and report["classifier"]["confusion"]
    for name in ("roc.png", "confusion_matrix.png", "pr_curves_gate.png", "pr_curves_soft.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 1000
    assert "No finding" in report["modes"]["soft"]["ap40_per_class"]


def test_yolo_export_shows_the_detector_what_the_node_shows_it(parts, tmp_path):
    """Training images are what the node feeds the detector (working size, equalised, CLAHE'd) and their
    labels follow the boxes through the resize; the parallel export writes the same files as the serial one."""
    import dataclasses

    import cv2

    from inference.preprocess import PreprocessParams, apply_clahe, working_image
    from inference.training.yolo_dataset import export_yolo_dataset

    boxed = [s for s in parts["train"] if s.boxes][:3]
    normal = [s for s in parts["train"] if not s.abnormal][:1]
    # a 1024 px copy of a boxed film with its boxes scaled: the export must bring both back to 512
    big = boxed[0]
    raw = cv2.imread(str(big.path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "big.png"), cv2.resize(raw, (1024, 1024), interpolation=cv2.INTER_CUBIC))
    big2 = dataclasses.replace(
        big, image_id="big", path=tmp_path / "big.png", boxes=tuple(tuple(v * 2 for v in b) for b in big.boxes)
    )
    params = PreprocessParams.for_detector(512, intensity="rank")
    splits = {"train": [*boxed, big2, *normal]}
    serial = export_yolo_dataset(splits, tmp_path / "serial", params, max_size=512, workers=1).parent
    parallel = export_yolo_dataset(splits, tmp_path / "parallel", params, max_size=512, workers=2).parent
    for s in splits["train"]:
        for sub, ext in (("images", "png"), ("labels", "txt")):
            a = (serial / sub / "train" / f"{s.image_id}.{ext}").read_bytes()
            assert a == (parallel / sub / "train" / f"{s.image_id}.{ext}").read_bytes()

    first = boxed[0]
    expected = apply_clahe(working_image(load_image01(first.path), 512)[0], params)
    got = cv2.imread(str(serial / "images" / "train" / f"{first.image_id}.png"), cv2.IMREAD_GRAYSCALE)
    assert np.abs(got.astype(np.float32) / 255 - expected).max() <= 1 / 255 + 1e-6

    def labels(image_id):
        text = (serial / "labels" / "train" / f"{image_id}.txt").read_text().split("\n")
        return np.array([[float(v) for v in line.split()] for line in text if line])

    small, large = labels(first.image_id), labels("big")
    assert len(small) == len(first.boxes) and small.shape == large.shape
    assert np.abs(small - large).max() < 2 / 512  # the same boxes, within the resize's rounding
    x0, y0, w, h = first.boxes[0][0], first.boxes[0][1], *np.subtract(first.boxes[0][2:], first.boxes[0][:2])
    assert np.allclose(small[0][1:], [(x0 + w / 2) / 512, (y0 + h / 2) / 512, w / 512, h / 512], atol=1e-4)
    assert (serial / "labels" / "train" / f"{normal[0].image_id}.txt").read_text() == ""
    cv2_big = cv2.imread(str(serial / "images" / "train" / "big.png"), cv2.IMREAD_GRAYSCALE)
    assert cv2_big.shape == (512, 512)


def test_init_weights_start_a_3_channel_imagenet_style_classifier_from_a_local_checkpoint(
    matched, tmp_path, two_torch_threads
):
    """The research project's recipe offline: a timm network with 3 channels and ImageNet normalisation, started
    from a local ImageNet-style checkpoint (here a random 1000-class resnet10t saved as notebooks save it)."""
    import timm

    torch.manual_seed(5)
    imagenet = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet10t-imagenet.pth")
    train, val = subsample(matched["train"], 24, 0), subsample(matched["val"], 20, 0)
    cfg = ClassifierTrainConfig(
        arch="resnet10t", input_size=64, epochs=1, batch=8, seed=0, lr=1e-5, augment="none", select="auc",
        channels=3, normalize="imagenet", init_weights=str(tmp_path / "resnet10t-imagenet.pth"),
    )  # fmt: skip
    res = train_classifier(train, val, tmp_path / "run", cfg)
    clf = Classifier.load(res["model_path"])
    assert clf.preprocess.channels == 3 and clf.preprocess.mean == (0.485, 0.456, 0.406)
    stem = "conv1.0.weight"
    got, start = clf.model.state_dict()[stem].flatten(), imagenet.state_dict()[stem].flatten()
    assert torch.nn.functional.cosine_similarity(got, start, dim=0) > 0.99  # began from the checkpoint
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=1).state_dict()[stem].flatten()
    assert abs(torch.nn.functional.cosine_similarity(got, fresh, dim=0)) < 0.2
    x = np.stack([prepare(load_image01(s.path), clf.preprocess)[0] for s in val])
    assert x.shape[1] == 3 and np.isfinite(clf.predict(x)).all()

    # a file that fits nothing is refused with the reason
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pth")
    cfg.init_weights = str(tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match="no tensor fits"):
        train_classifier(train, val, tmp_path / "run2", cfg)


def test_init_weights_copy_a_detector_file_into_a_new_yolo_run(tmp_path):
    from ultralytics import YOLO

    from inference.modelfile import load_model_file
    from inference.training.train_detector import init_from
    from support.models import make_tiny_models

    _, det = make_tiny_models(tmp_path, p_abnormal=0.5, detector_logit=0.0)
    model = YOLO("yolov8n.yaml", task="detect")
    init_from(model, str(det))
    want = load_model_file(det, "detector").state_dict
    got = model.model.state_dict()
    same = [k for k, v in want.items() if k in got and got[k].shape == v.shape and torch.equal(got[k].float(), v)]
    # everything but the class branch of the head (80 COCO classes in a bare yaml; ultralytics rebuilds it for the
    # data set's classes when training starts and keeps what fits)
    assert same and all(".cv3." in k for k in set(want) - set(same)), sorted(set(want) - set(same))[:5]
