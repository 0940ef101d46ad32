"""YOLOv8 finding detector: an ultralytics ``DetectionModel`` driven with our own letterbox.

``build_detector("yolov8n", nc=14)`` builds the architecture offline from ultralytics' bundled
yaml (random weights) and returns ``(model, model_yaml)``; the yaml dict is stored in the model file
so that the exact architecture (scale, nc) is rebuilt on load. ``Detector.load(path)`` rebuilds,
loads the weights, fuses Conv+BN for inference. ``Detector.detect(x, letterbox, conf)`` runs the
network on one prepared 3 x S x S input, applies ultralytics' NMS and maps the boxes back to
source pixels with the :class:`~inference.preprocess.Letterbox`.

Which classes are reported, and from what confidence, is part of the model file (``extra``):
``reportable_classes`` (class names; a class the validation set cannot support, AP@0.4 below 0.1, or that had
no training boxes, is never reported) and ``class_floors`` (class name -> detector confidence floor, chosen on
validation). ``dicom-node tune-detector`` writes both. A file without them reports the classes it had training
boxes for (``extra.train_set.boxes_per_class``), or all classes when that is unknown, with no floors.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inference import ultralytics_env  # noqa: F401  (must run before ultralytics is imported)
from inference.errors import ModelError
from inference.modelfile import LoadedModel, LoadedNetwork, load_model_file
from inference.preprocess import Letterbox

__all__ = ["build_detector", "Detector", "Detections"]


def _nms():
    try:
        from ultralytics.utils.nms import non_max_suppression  # ultralytics >= 8.3.17x
    except ImportError:  # older 8.x
        from ultralytics.utils.ops import non_max_suppression
    return non_max_suppression


def build_detector(arch: str | dict = "yolov8n", nc: int = 14) -> tuple[nn.Module, dict]:
    """(DetectionModel with random weights, its model yaml dict). ``arch``: "yolov8n", a yaml path
    ("yolov8s.yaml") or a yaml dict."""
    from ultralytics.nn.tasks import DetectionModel

    cfg: str | dict
    if isinstance(arch, dict):
        cfg = copy.deepcopy(arch)
    else:
        cfg = arch if str(arch).endswith((".yaml", ".yml")) else f"{arch}.yaml"
    try:
        model = DetectionModel(cfg=cfg, ch=3, nc=nc, verbose=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ModelError(
            f"cannot build detector architecture {arch if isinstance(arch, str) else '(yaml dict)'}: {exc}"
        ) from exc
    return model, copy.deepcopy(model.yaml)


@dataclass(frozen=True)
class Detections:
    """Detections of one image: boxes (N x 4, xyxy), scores (N,), class_ids (N,)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def reporting_rules(classes: tuple[str, ...], extra: dict) -> tuple[np.ndarray, np.ndarray]:
    """(reportable mask, confidence floor per class) from a detector file's ``extra`` (see the module docs)."""
    names = list(classes)
    if "reportable_classes" in extra:
        wanted = set(extra["reportable_classes"])
    else:
        trained = (extra.get("train_set") or {}).get("boxes_per_class")
        wanted = {c for c, n in trained.items() if n} if trained else set(names)
    unknown = wanted - set(names)
    if unknown:
        raise ModelError(f"reportable classes {sorted(unknown)} are not classes of this detector")
    reportable = np.asarray([c in wanted for c in names], dtype=bool)
    given = extra.get("class_floors") or {}
    floors = np.asarray([float(given.get(c, 0.0)) for c in names], dtype=np.float64)
    return reportable, floors


def output_classes(classes: tuple[str, ...], extra: dict) -> np.ndarray:
    """Per network output class, the finding id it reports as (-1: dropped); identity for the node's own files."""
    given = extra.get("output_classes")
    if given is None:
        return np.arange(len(classes), dtype=np.int64)
    out = np.asarray(given, dtype=np.int64)
    if out.ndim != 1 or not len(out) or out.max() >= len(classes) or out.min() < -1:
        raise ModelError(f"extra.output_classes must map each network class to a finding id or -1, got {given}")
    return out


class Detector(LoadedNetwork):
    """A loaded detector in eval mode (Conv+BN fused) on one device."""

    def __init__(self, model: nn.Module, loaded: LoadedModel, device: str | torch.device = "cpu", iou: float = 0.7):
        super().__init__(model, loaded, device)
        self.iou = iou
        self.output_classes = output_classes(loaded.metadata.classes, loaded.metadata.extra)
        self.nc = len(self.output_classes)  # the network's own classes
        self._nms = _nms()
        self.reportable, self.floors = reporting_rules(loaded.metadata.classes, loaded.metadata.extra)

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, device: str | torch.device = "cpu", iou: float = 0.7, backend: str = "torch"
    ) -> "Detector":
        meta = loaded.metadata
        if meta.preprocess.channels != 3:
            raise ModelError(f"{loaded.path}: detector preprocess must have 3 channels, has {meta.preprocess.channels}")
        if meta.input_size % 32:
            raise ModelError(f"{loaded.path}: detector input_size {meta.input_size} is not a multiple of 32")
        network = cls.onnx_network(loaded, device, backend)
        if network is not None:
            return cls(network, loaded, device, iou)
        if loaded.model_yaml is None:  # load_model_file(path, "detector") has checked it is there
            raise ModelError(f"{loaded.path}: detector model file without its model yaml")
        model, _ = build_detector(loaded.model_yaml, nc=len(output_classes(meta.classes, meta.extra)))
        try:
            model.load_state_dict(loaded.state_dict, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"{loaded.path}: weights do not fit the detector architecture "
                f"{meta.architecture!r}: {str(exc).splitlines()[0]}"
            ) from exc
        model.names = dict(enumerate(meta.extra.get("output_names") or meta.classes))
        model.eval()
        model.fuse(verbose=False)
        return cls(model, loaded, device, iou)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", iou: float = 0.7, backend: str = "torch"
    ) -> "Detector":
        return cls.from_loaded(load_model_file(path, "detector"), device, iou, backend)

    @torch.inference_mode()
    def forward(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw network output for an N x 3 x S x S batch: (N, 4 + nc, anchors), xywh in input pixels."""
        out = self.model(self.as_input(batch, "detector"))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()

    @torch.inference_mode()
    def postprocess(self, raw: torch.Tensor, conf: float = 0.05, max_det: int = 300) -> list[np.ndarray]:
        """ultralytics NMS -> per image a (K, 6) array x1, y1, x2, y2, score, finding id in INPUT pixels (network
        classes mapped to findings; dropped ones removed)."""
        dets = self._nms(raw, conf_thres=float(conf), iou_thres=float(self.iou), max_det=int(max_det), nc=self.nc)
        out = []
        for d in dets:
            d = d[:, :6].float().cpu().numpy()
            if len(d):
                d[:, 5] = self.output_classes[d[:, 5].astype(np.int64)]
                d = d[d[:, 5] >= 0]
            out.append(d)
        return out

    def predict(self, batch: np.ndarray | torch.Tensor, conf: float = 0.05, max_det: int = 300) -> list[np.ndarray]:
        """N x 3 x S x S batch -> per image an (K, 6) array x1, y1, x2, y2, score, class in INPUT pixels."""
        return self.postprocess(self.forward(batch), conf=conf, max_det=max_det)

    def detect(
        self, x: np.ndarray, geom: Letterbox, conf: float = 0.05, max_det: int = 300, all_classes: bool = False
    ) -> Detections:
        """One prepared 3 x S x S input -> detections with boxes in SOURCE pixels (clipped): reportable classes
        at or above their floors (``all_classes=True``: every class, no floors; for tuning them)."""
        return self.detect_batch([x], [geom], conf, max_det, all_classes)[0]

    def detect_batch(
        self,
        xs: list[np.ndarray],
        geoms: list[Letterbox],
        conf: float = 0.05,
        max_det: int = 300,
        all_classes: bool = False,
    ) -> list[Detections]:
        """:meth:`detect` for several prepared inputs, in one forward pass."""
        out = []
        for d, geom in zip(self.predict(np.stack(xs), conf=conf, max_det=max_det), geoms):
            boxes = geom.to_source(d[:, :4]) if len(d) else np.zeros((0, 4))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # drop boxes wholly in padding
            if not all_classes and len(d):
                cls = d[:, 5].astype(np.int64)
                keep &= self.reportable[cls] & (d[:, 4] >= self.floors[cls])
            out.append(
                Detections(
                    boxes=boxes[keep].astype(np.float64),
                    scores=d[keep, 4].astype(np.float64),
                    class_ids=d[keep, 5].astype(np.int64),
                )
            )
        return out
