"""Model files that carry their own metadata.

One ``torch.save`` file per model, loadable with ``torch.load(weights_only=True)`` (no pickled
code, so a model file cannot run anything on load)::

    {
      "dicom_node_model": {                 # ModelMetadata.to_dict()
        "format_version": 1,
        "kind": "classifier" | "detector",
        "name": "classifier",               # shown in ModelInfo / DICOM outputs
        "architecture": "efficientnet_b0",  # timm model name, or ultralytics yaml stem ("yolov8n")
        "input_size": 384,                  # = preprocess["input_size"]
        "preprocess": {...},                # PreprocessParams.to_dict()
        "classes": ["abnormal"],            # classifier: the single sigmoid output;
                                            # detector: the 14 FINDING_CLASSES in id order
        "version": "0.1.0",
        "training_data": "free text: datasets, splits, licences",
        "created": "2025-01-31T12:00:00+00:00",
        "metrics": {"auroc": 0.91, ...},    # str -> number
        "weights_dtype": "float16",
        "extra": {...}                      # anything else JSON-like (training args, ...)
      },
      "state_dict": {name: tensor},         # floating tensors stored as float16
      "model_yaml": {...}                   # detector only: the ultralytics model dict
      "onnx": uint8 tensor                  # only in files imported from ONNX: the graph (then state_dict is {})
    }

A detector's network may have other classes than the 14 findings (an imported ultralytics model):
``extra.output_classes`` then lists, per network output class, the finding id it reports as (-1: dropped).
A classifier's network may have several outputs (a softmax): ``extra.outputs`` and ``extra.abnormal_index``.

Weights are stored as float16 (half the size) and cast back to float32 on load; a tensor whose
values do not fit float16 is kept in float32.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from inference.errors import ModelError
from inference.onnx_backend import OnnxModule, session_for
from inference.preprocess import PreprocessParams
from inference.types import FINDING_CLASSES, ModelInfo

FORMAT_VERSION = 1
METADATA_KEY = "dicom_node_model"
CLASSIFIER_CLASSES: tuple[str, ...] = ("abnormal",)
KINDS = ("classifier", "detector")
ModelKind = Literal["classifier", "detector"]
_FP16_MAX = 65000.0

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "CLASSIFIER_CLASSES",
    "ModelMetadata",
    "LoadedModel",
    "save_model_file",
    "load_model_file",
    "read_metadata",
    "sha256_of",
    "default_classes",
]


def default_classes(kind: str) -> tuple[str, ...]:
    return CLASSIFIER_CLASSES if kind == "classifier" else tuple(FINDING_CLASSES)


@dataclass
class ModelMetadata:
    kind: str
    architecture: str
    preprocess: PreprocessParams
    classes: tuple[str, ...] = ()
    version: str = "0.0.0"
    name: str = ""
    training_data: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    weights_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        if not self.classes:
            self.classes = default_classes(self.kind)
        self.classes = tuple(self.classes)
        self.name = self.name or self.kind

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["classes"] = list(self.classes)
        d["input_size"] = self.input_size
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "model file") -> "ModelMetadata":
        try:
            d = dict(d)
            d.pop("input_size", None)
            pre = PreprocessParams.from_dict(d.pop("preprocess"))
            return cls(preprocess=pre, **d)
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: malformed dicom-node model metadata ({exc})") from exc


@dataclass
class LoadedModel:
    path: Path
    metadata: ModelMetadata
    state_dict: dict[str, torch.Tensor]  # float32
    model_yaml: dict | None
    sha256: str
    onnx: bytes | None = None  # the ONNX graph of a model imported from ONNX (no torch weights then)

    def model_info(self) -> ModelInfo:
        m = self.metadata
        return ModelInfo(name=m.name, architecture=m.architecture, version=m.version, sha256=self.sha256)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_storage(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in sd.items():
        t = t.detach().cpu()
        if dtype == "float16" and t.is_floating_point():
            if t.numel() == 0 or float(t.abs().max()) <= _FP16_MAX:
                t = t.half()
            else:
                t = t.float()
        out[k] = t.clone().contiguous()
    return out


def save_model_file(
    path: str | os.PathLike,
    metadata: ModelMetadata,
    state_dict: dict[str, torch.Tensor],
    model_yaml: dict | None = None,
    onnx: bytes | None = None,
) -> Path:
    """Write a model file atomically (temp file + rename). Detectors must pass ``model_yaml``, unless the file
    carries an ``onnx`` graph instead of torch weights."""
    path = Path(path)
    if metadata.kind == "detector" and not model_yaml and onnx is None:
        raise ModelError("a detector model file needs the ultralytics model yaml dict (model_yaml)")
    payload: dict[str, Any] = {
        METADATA_KEY: _plain(metadata.to_dict()),
        "state_dict": _to_storage(state_dict, metadata.weights_dtype),
    }
    if model_yaml is not None:
        payload["model_yaml"] = _plain(model_yaml)
    if onnx is not None:
        payload["onnx"] = torch.frombuffer(bytearray(onnx), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _plain(obj: Any) -> Any:
    """Reduce to what ``weights_only`` loading accepts (dict/list/str/int/float/bool/None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return _plain(obj.item())
    return str(obj)


def _read(path: Path) -> dict:
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path}: not a dicom-node model file (it holds pickled Python objects, e.g. a "
            "raw ultralytics/timm checkpoint; convert it with the project's training "
            "commands)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{path}: not a dicom-node model file (not a readable torch file: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or METADATA_KEY not in payload:
        raise ModelError(f"{path}: not a dicom-node model file (no '{METADATA_KEY}' metadata)")
    return payload


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Metadata of a model file without checking its kind (for `inspect`-style commands)."""
    path = Path(path)
    return _metadata(_read(path), path)


def _metadata(payload: dict, path: Path) -> ModelMetadata:
    meta = payload[METADATA_KEY]
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: malformed dicom-node model metadata")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelError(
            f"{path}: unsupported model file format version {version!r} "
            f"(this dicom-node reads versions 1..{FORMAT_VERSION})"
        )
    return ModelMetadata.from_dict(meta, str(path))


def load_model_file(
    path: str | os.PathLike, expected_kind: ModelKind, expected_classes: tuple[str, ...] | None = None
) -> LoadedModel:
    """Load and check a model file; raise :class:`ModelError` naming the file and the problem."""
    path = Path(path)
    if expected_kind not in KINDS:
        raise ValueError(f"expected_kind must be one of {KINDS}")
    payload = _read(path)
    meta = _metadata(payload, path)
    if meta.kind != expected_kind:
        raise ModelError(
            f"{path}: is a {meta.kind} model file, but a {expected_kind} is expected here "
            "(are the classifier and detector paths swapped in the config?)"
        )
    want = tuple(expected_classes) if expected_classes is not None else default_classes(expected_kind)
    if meta.classes != want:
        raise ModelError(
            f"{path}: class list mismatch: the file has {len(meta.classes)} classes "
            f"{list(meta.classes)[:5]}..., expected {len(want)} {list(want)[:5]}..."
        )
    graph = payload.get("onnx")
    onnx = bytes(graph.numpy().tobytes()) if isinstance(graph, torch.Tensor) else None
    sd = payload.get("state_dict")
    if onnx is None and (
        not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values())
    ):
        raise ModelError(f"{path}: the model file holds no usable state_dict")
    model_yaml = payload.get("model_yaml")
    if expected_kind == "detector" and onnx is None and not isinstance(model_yaml, dict):
        raise ModelError(f"{path}: detector model file without its model yaml")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in (sd or {}).items()}
    return LoadedModel(
        path=path, metadata=meta, state_dict=sd, model_yaml=model_yaml, sha256=sha256_of(path), onnx=onnx
    )


BACKENDS = ("torch", "onnxruntime")


class LoadedNetwork:
    """A network in eval mode on one device, with the model file it came from (base of Classifier, Detector).

    On a CUDA device a torch network runs in half precision (its inputs are cast to match; outputs come back as
    float32 where the callers read them)."""

    def __init__(self, model: torch.nn.Module, loaded: LoadedModel, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.loaded = loaded
        self.onnx = isinstance(model, OnnxModule)
        self.dtype = torch.float16 if self.device.type == "cuda" and not self.onnx else torch.float32
        if self.dtype == torch.float16:
            self.model.half()

    @staticmethod
    def onnx_network(loaded: LoadedModel, device: str | torch.device, backend: str) -> torch.nn.Module | None:
        """The ONNX Runtime network for this model file when it should run there: a file imported from ONNX
        always, any other with ``backend="onnxruntime"`` (its export beside it); None: build the torch network."""
        if backend not in BACKENDS:
            raise ModelError(f"inference.models.backend must be one of {BACKENDS}, not {backend!r}")
        if loaded.onnx is not None:
            return OnnxModule(loaded.onnx, device)
        if backend == "onnxruntime":
            return session_for(loaded.path, loaded.sha256, device)
        return None

    def as_input(self, batch: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        """A prepared N x C x S x S batch (or one C x S x S) on the network's device and dtype, checked."""
        x = torch.as_tensor(batch, dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        c = self.preprocess.channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"{what} input must be N x {c} x S x S, got {tuple(x.shape)}")
        return x.to(self.device, self.dtype)

    @property
    def preprocess(self) -> PreprocessParams:
        return self.loaded.metadata.preprocess

    @cached_property  # read for every prediction
    def info(self) -> ModelInfo:
        """The model file's provenance. An int8 export (``export-onnx --int8``) is a slightly different network,
        and its results say so wherever they name their model (SR, console, logs): the version reads
        "1.2.0+int8" and the sha256 is the export's, so it gets its own Device UID, and a site calibration made
        for the float32 network (or another int8 export) is refused for it."""
        info = self.loaded.model_info()
        if isinstance(self.model, OnnxModule) and self.model.precision == "int8":
            info = replace(info, version=f"{info.version}+int8", sha256=self.model.sha256)
        return info
