"""Normal/abnormal classifier: a timm backbone; P(abnormal) per image.

``build_classifier(arch)`` builds the architecture offline (``pretrained=False``, random weights);
``Classifier.load(path, device, backend)`` builds it from a dicom-node model file (kind "classifier", classes
``("abnormal",)``) and ``Classifier.predict(batch)`` returns P(abnormal) per image. The network has one input
channel (the node's own models) or three (grey repeated; models trained the ImageNet way, imported with
``dicom-node import-model``), and one output, the logit of "abnormal", or several (``extra.outputs``), a softmax
of which output ``extra.abnormal_index`` is "abnormal". The batch is what
:func:`inference.preprocess.to_model_input` produces (N x C x S x S, normalised as the model file says).
With ``backend="onnxruntime"`` the network runs in ONNX Runtime (:mod:`inference.onnx_backend`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from inference.calibration import Calibration
from inference.errors import ModelError
from inference.modelfile import LoadedModel, LoadedNetwork, load_model_file

__all__ = ["build_classifier", "Classifier"]


def build_classifier(arch: str, in_chans: int = 1, drop_rate: float = 0.0, num_classes: int = 1) -> nn.Module:
    """A timm model by name (e.g. densenet121, efficientnet_b0, davit_tiny, mobilenetv2_100); ``drop_rate`` is
    the dropout before the head (training only: it has no weights, so the model file does not need it)."""
    import timm  # imported here: importing timm is slow and only model code needs it

    try:
        return timm.create_model(
            arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, drop_rate=drop_rate
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ModelError(f"unknown classifier architecture {arch!r} ({exc})") from exc


class Classifier(LoadedNetwork):
    """A loaded classifier in eval mode on one device."""

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, device: str | torch.device = "cpu", backend: str = "torch"
    ) -> "Classifier":
        meta = loaded.metadata
        channels = meta.preprocess.channels
        outputs = int(meta.extra.get("outputs", 1))
        if outputs > 1 and not 0 <= int(meta.extra.get("abnormal_index", -1)) < outputs:
            raise ModelError(f"{loaded.path}: a classifier with {outputs} outputs needs extra.abnormal_index")
        network = cls.onnx_network(loaded, device, backend)
        if network is None:
            network = build_classifier(meta.architecture, in_chans=channels, num_classes=outputs)
            try:
                network.load_state_dict(loaded.state_dict, strict=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0:2]
                raise ModelError(
                    f"{loaded.path}: weights do not fit architecture {meta.architecture!r}: {' '.join(first)}"
                ) from exc
        return cls(network, loaded, device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "torch") -> "Classifier":
        return cls.from_loaded(load_model_file(path, "classifier"), device, backend)

    calibration: Calibration | None = None  # a site's own operating points (inference.calibration)

    def use_calibration(self, calibration: Calibration, source: object = "calibration") -> None:
        """Decide at a site's own operating points; refuses a calibration made for another model file (its
        thresholds are on that model's scale)."""
        if calibration.model_sha256 and calibration.model_sha256 != self.info.sha256:
            raise ModelError(
                f"{source} was made for another classifier (sha256 {calibration.model_sha256[:12]}..., this one is "
                f"{self.info.sha256[:12]}..., version {self.info.version}): run dicom-node calibrate again for this "
                "model, with --backend onnxruntime for an ONNX export (an int8 export is a network of its own)"
            )
        self.calibration = calibration

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """N x C x S x S prepared batch (or a single C x S x S) -> the N raw logits of "abnormal" (with a softmax
        head: log(p / (1 - p)) of the abnormal output's probability)."""
        x = self.as_input(batch, "classifier")
        out = self.model(x).float().reshape(x.shape[0], -1)
        extra = self.loaded.metadata.extra
        if out.shape[1] == 1:
            return out[:, 0].cpu().numpy()
        k = int(extra["abnormal_index"])
        others = torch.cat([out[:, :k], out[:, k + 1 :]], dim=1)
        return (out[:, k] - torch.logsumexp(others, dim=1)).cpu().numpy()

    def predict(self, batch: np.ndarray | torch.Tensor, view: str | None | Sequence[str | None] = None) -> np.ndarray:
        """N x C x S x S prepared batch -> N P(abnormal), calibrated so that 0.5 is the operating point for
        ``view`` (the image's ViewPosition, e.g. "PA"/"AP"; see :attr:`logit_shift`), one for the whole batch or
        one per image."""
        z = self.logits(batch)
        views = [view] * len(z) if view is None or isinstance(view, str) else list(view)
        z = z - np.asarray([self.logit_shift(v) for v in views])
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float64)

    def predict_raw(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """The model's own probabilities, without any operating point (for choosing one)."""
        return (1.0 / (1.0 + np.exp(-self.logits(batch)))).astype(np.float64)

    @property
    def operating_threshold(self) -> float | None:
        """The decision threshold chosen on validation data at training time (``extra.abnormal_threshold``)."""
        t = self.loaded.metadata.extra.get("abnormal_threshold")
        return float(t) if t is not None else None

    def threshold(self, view: str | None = None) -> float | None:
        """The raw-probability operating point for ``view``: the site calibration's, else the model file's."""
        if self.calibration is not None:
            return self.calibration.threshold(view)
        return self.operating_threshold

    def logit_shift(self, view: str | None = None) -> float:
        """Calibrate to the operating point: the chosen threshold maps to P = 0.5.

        A classifier's best threshold can lie far from 0.5 (e.g. 0.97 for one trained on 2 abnormal : 1
        normal). Shifting the logit by logit(threshold) keeps the ranking (ROC AUC unchanged) and makes 0.5
        mean "at the operating point", so the gate threshold, the soft fusion and P(no finding) all work on one
        scale. The threshold is the site calibration's for the view when one is loaded, else the one chosen
        on validation data at training time; files without a stored threshold are used as they are."""
        t = self.threshold(view)
        if t is None or not 0.0 < t < 1.0:
            return 0.0
        return math.log(t / (1.0 - t))
