"""Normal/abnormal classifier: a timm backbone with one input channel and one output logit.

``build_classifier(arch)`` builds the architecture offline (``pretrained=False``, random weights);
``Classifier.load(path, device)`` builds it from a dicom-node model file (kind "classifier", classes
``("abnormal",)``) and ``Classifier.predict(batch)`` returns P(abnormal) = sigmoid(logit) per image.
The batch is what :func:`inference.preprocess.to_model_input` produces (N x 1 x S x S, normalised
with the mean/std stored in the model file).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from inference.errors import ModelError
from inference.modelfile import LoadedModel, LoadedNetwork, load_model_file

__all__ = ["build_classifier", "Classifier"]


def build_classifier(arch: str, in_chans: int = 1) -> nn.Module:
    """A timm model by name (e.g. densenet121, efficientnet_b0, davit_tiny, mobilenetv2_100)."""
    import timm  # imported here: importing timm is slow and only model code needs it

    try:
        return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=1)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ModelError(f"unknown classifier architecture {arch!r} ({exc})") from exc


class Classifier(LoadedNetwork):
    """A loaded classifier in eval mode on one device."""

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: str | torch.device = "cpu") -> "Classifier":
        meta = loaded.metadata
        if meta.preprocess.channels != 1:
            raise ModelError(
                f"{loaded.path}: classifier preprocess must have 1 channel, has {meta.preprocess.channels}"
            )
        model = build_classifier(meta.architecture, in_chans=1)
        try:
            model.load_state_dict(loaded.state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:2]
            raise ModelError(
                f"{loaded.path}: weights do not fit architecture {meta.architecture!r}: {' '.join(first)}"
            ) from exc
        return cls(model, loaded, device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Classifier":
        return cls.from_loaded(load_model_file(path, "classifier"), device)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """N x 1 x S x S prepared batch (or a single 1 x S x S) -> float array of N P(abnormal)."""
        x = torch.as_tensor(batch, dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"classifier input must be N x 1 x S x S, got {tuple(x.shape)}")
        logits = self.model(x.to(self.device)).float().reshape(x.shape[0], -1)[:, 0]
        return torch.sigmoid(logits - self.logit_shift).cpu().numpy()

    @property
    def operating_threshold(self) -> float | None:
        """The decision threshold chosen on validation data at training time (``extra.abnormal_threshold``)."""
        t = self.loaded.metadata.extra.get("abnormal_threshold")
        return float(t) if t is not None else None

    @property
    def logit_shift(self) -> float:
        """Calibrate to the trained operating point: the validation-chosen threshold maps to P = 0.5.

        A classifier trained on an imbalanced set (here 2 abnormal : 1 normal) puts its best threshold far
        from 0.5 (e.g. 0.97). Shifting the logit by logit(threshold) keeps the ranking (ROC AUC unchanged)
        and makes 0.5 mean "at the operating point", so the gate threshold, the soft fusion and
        P(no finding) all work on one scale. Files without a stored threshold are used as they are."""
        t = self.operating_threshold
        if t is None or not 0.0 < t < 1.0:
            return 0.0
        return math.log(t / (1.0 - t))
