"""Tiny random-weight model files for plumbing tests (no downloads, a second or two to build).

    from support.models import make_tiny_models
    clf_path, det_path = make_tiny_models(tmp_path)                     # random outputs
    clf_path, det_path = make_tiny_models(tmp_path, p_abnormal=0.9,      # classifier says exactly 0.9,
                                          detector_logit=1.0)            # detector emits many boxes

The classifier is timm ``mobilenetv2_050`` at 64 px, the detector ultralytics ``yolov8n`` at 128 px
(nc = 14), both written with :func:`inference.modelfile.save_model_file`, so they load through the
same code path as real models.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from inference.classifier import build_classifier
from inference.detector import build_detector
from inference.modelfile import ModelMetadata, save_model_file
from inference.preprocess import PreprocessParams

__all__ = ["make_tiny_models", "make_tiny_classifier", "make_tiny_detector"]


def make_tiny_classifier(
    path: str | Path,
    *,
    arch: str = "mobilenetv2_050",
    input_size: int = 64,
    p_abnormal: float | None = None,
    seed: int = 0,
    **meta,
) -> Path:
    """``p_abnormal`` set: zero the head so every image gets exactly that probability."""
    torch.manual_seed(seed)
    model = build_classifier(arch)
    if p_abnormal is not None:
        head = model.get_classifier()
        p = min(max(p_abnormal, 1e-6), 1 - 1e-6)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(math.log(p / (1 - p)))
    md = ModelMetadata(
        kind="classifier",
        architecture=arch,
        version=meta.pop("version", "0.0.0-test"),
        preprocess=PreprocessParams.for_classifier(input_size),
        training_data=meta.pop("training_data", "none: random weights for tests"),
        **meta,
    )
    return save_model_file(path, md, model.state_dict())


def make_tiny_detector(
    path: str | Path,
    *,
    arch: str = "yolov8n",
    input_size: int = 128,
    detector_logit: float | None = None,
    detector_gain: float = 1.0,
    seed: int = 0,
    **meta,
) -> Path:
    """``detector_logit`` set: class-head biases = that logit, so random boxes score ~sigmoid(logit).
    ``detector_gain`` scales the class-head weights: random features are tiny, so with the default gain every
    box scores the same; a gain of ~1e6 spreads the scores (distinct, reproducible rankings for comparisons)."""
    torch.manual_seed(seed)
    model, yaml = build_detector(arch, nc=14)
    if detector_logit is not None or detector_gain != 1.0:
        head = model.model[-1]
        with torch.no_grad():
            for seq in head.cv3:
                seq[-1].weight.mul_(detector_gain)
                if detector_logit is not None:
                    seq[-1].bias.fill_(detector_logit)
    md = ModelMetadata(
        kind="detector",
        architecture=arch,
        version=meta.pop("version", "0.0.0-test"),
        preprocess=PreprocessParams.for_detector(input_size),
        training_data=meta.pop("training_data", "none: random weights for tests"),
        **meta,
    )
    return save_model_file(path, md, model.state_dict(), model_yaml=yaml)


def make_tiny_models(
    directory: str | Path,
    *,
    p_abnormal: float | None = None,
    detector_logit: float | None = None,
    detector_gain: float = 1.0,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``classifier.pt`` and ``detector.pt`` into ``directory``; return their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return (
        make_tiny_classifier(d / "classifier.pt", p_abnormal=p_abnormal, seed=seed),
        make_tiny_detector(d / "detector.pt", detector_logit=detector_logit, detector_gain=detector_gain, seed=seed),
    )
