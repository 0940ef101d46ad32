"""inference.modelfile: metadata round trip, fp16 storage, readable refusals."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from inference.errors import ModelError
from inference.modelfile import (
    CLASSIFIER_CLASSES,
    FORMAT_VERSION,
    METADATA_KEY,
    ModelMetadata,
    load_model_file,
    read_metadata,
    save_model_file,
)
from inference.preprocess import PreprocessParams
from inference.types import FINDING_CLASSES


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))


def _save_classifier(path, **kw):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    md = ModelMetadata(
        kind="classifier",
        architecture="tiny-test",
        preprocess=PreprocessParams.for_classifier(64),
        version="1.2.3",
        training_data="synthetic",
        metrics={"auroc": np.float64(0.75), "n": np.int64(10)},
        **kw,
    )
    save_model_file(path, md, net.state_dict())
    return net


def test_round_trip_metadata_weights_and_hash(tmp_path):
    p = tmp_path / "clf.pt"
    net = _save_classifier(p, extra={"epochs": 3, "args": {"lr": 1e-3}})
    raw = torch.load(p, weights_only=True)  # plain weights_only load works
    assert raw[METADATA_KEY]["format_version"] == FORMAT_VERSION
    assert raw["state_dict"]["0.weight"].dtype == torch.float16
    assert raw["state_dict"]["1.num_batches_tracked"].dtype == torch.int64

    m = load_model_file(p, "classifier")
    md = m.metadata
    assert (md.kind, md.architecture, md.version, md.name) == ("classifier", "tiny-test", "1.2.3", "classifier")
    assert md.classes == CLASSIFIER_CLASSES and md.input_size == 64
    assert md.preprocess == PreprocessParams.for_classifier(64)
    assert md.metrics == {"auroc": 0.75, "n": 10} and md.extra["args"]["lr"] == 1e-3
    assert md.created and md.training_data == "synthetic"
    w = m.state_dict["0.weight"]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, net.state_dict()["0.weight"], atol=1e-3, rtol=1e-3)
    assert m.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    info = m.model_info()
    assert (info.name, info.architecture, info.version, info.sha256) == ("classifier", "tiny-test", "1.2.3", m.sha256)
    assert read_metadata(p).version == "1.2.3"


def test_large_values_stay_float32(tmp_path):
    p = tmp_path / "big.pt"
    md = ModelMetadata(kind="classifier", architecture="x", preprocess=PreprocessParams())
    save_model_file(p, md, {"w": torch.tensor([1e6, 1.0])})
    assert torch.load(p, weights_only=True)["state_dict"]["w"].dtype == torch.float32
    assert load_model_file(p, "classifier").state_dict["w"][0] == 1e6


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model_file(tmp_path / "nope.pt", "classifier")


def test_wrong_kind_is_named(tmp_path):
    p = tmp_path / "clf.pt"
    _save_classifier(p)
    with pytest.raises(ModelError, match=r"is a classifier model file, but a detector is expected"):
        load_model_file(p, "detector")


def test_class_list_mismatch(tmp_path):
    p = tmp_path / "det.pt"
    md = ModelMetadata(
        kind="detector",
        architecture="yolov8n",
        preprocess=PreprocessParams.for_detector(),
        classes=FINDING_CLASSES[:10],
    )
    save_model_file(p, md, {"w": torch.zeros(2)}, model_yaml={"nc": 10})
    with pytest.raises(ModelError, match="class list mismatch: the file has 10 classes"):
        load_model_file(p, "detector")
    assert (
        load_model_file(p, "detector", expected_classes=FINDING_CLASSES[:10]).metadata.classes == FINDING_CLASSES[:10]
    )


def test_detector_needs_yaml(tmp_path):
    md = ModelMetadata(kind="detector", architecture="yolov8n", preprocess=PreprocessParams.for_detector())
    with pytest.raises(ModelError, match="model yaml"):
        save_model_file(tmp_path / "d.pt", md, {"w": torch.zeros(1)})


@pytest.mark.parametrize(
    "writer,match",
    [
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not a torch file"), "not a dicom-node model file"),
        (lambda p: p.write_text(""), "not a dicom-node model file"),
        (lambda p: torch.save({"state_dict": {"w": torch.zeros(1)}}, p), "no 'dicom_node_model' metadata"),
        (lambda p: torch.save(_net(), p), "pickled Python objects"),
        (lambda p: torch.save([1, 2, 3], p), "no 'dicom_node_model' metadata"),
    ],
)
def test_non_model_files_are_refused(tmp_path, writer, match):
    p = tmp_path / "weird.pt"
    writer(p)
    with pytest.raises(ModelError, match=match) as ei:
        load_model_file(p, "classifier")
    assert str(p) in str(ei.value)


def test_unsupported_format_version(tmp_path):
    p = tmp_path / "future.pt"
    _save_classifier(p)
    payload = torch.load(p, weights_only=True)
    payload[METADATA_KEY]["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, p)
    with pytest.raises(ModelError, match="unsupported model file format version"):
        load_model_file(p, "classifier")


def test_malformed_metadata(tmp_path):
    p = tmp_path / "bad.pt"
    torch.save({METADATA_KEY: {"format_version": 1, "kind": "classifier"}, "state_dict": {}}, p)
    with pytest.raises(ModelError, match="malformed"):
        load_model_file(p, "classifier")
    with pytest.raises(ModelError, match="kind must be one of"):
        ModelMetadata(kind="segmenter", architecture="x", preprocess=PreprocessParams())
