"""Bring your own model: turn the files that the ordinary tools write into the node's own model files.

- an **ultralytics detection checkpoint** (``best.pt``/``last.pt`` of ``yolo detect train``, any YOLOv8/YOLO11
  size): architecture (the model yaml), weights, input size (``train_args.imgsz``) and class names are read from
  it; the names are mapped to the 14 VinDr-CXR findings by name (the VinBigData ``class_name`` spellings, case,
  spacing, ``_``, ``-`` and ``/`` tolerant) or with an explicit class map; a class that maps to nothing is
  refused, naming it, unless it is dropped on purpose;
- a **timm classifier** saved the ways notebooks save one: ``torch.save(model.state_dict())`` or a checkpoint
  dict holding it (``state_dict``, ``model``, ``model_state_dict``, ``state_dict_ema``; ``module.`` prefixes of
  DataParallel are removed), with its architecture, input size, channels, normalisation and output (one logit,
  or a softmax over classes of which one is "abnormal") given by the operator;
- an **ONNX model** of either kind, with its preprocessing given the same way (see :mod:`inference.onnx`).

The result is an ordinary model file (:mod:`inference.modelfile`) that loads with ``weights_only=True``: the
node itself never unpickles anything. Reading a pickled checkpoint *can run code*; that happens here only,
as an explicit operator action (``dicom-node import-model``), and the command says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from inference.errors import ModelError
from inference.modelfile import ModelMetadata, save_model_file, sha256_of
from inference.preprocess import PAD_VALUE, PreprocessParams
from inference.types import FINDING_CLASSES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLE_WARNING = (
    "reading a pickled checkpoint can run code that is stored in it: import only files you trust "
    "(the model file written here holds no code and loads with weights_only=True)"
)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "net", "weights")


def spelling(name: str) -> str:
    """The comparable form of a class name: lower case, runs of space, ``_``, ``-`` and ``/`` as one space."""
    return re.sub(r"[\s_\-/]+", " ", str(name)).strip().lower()


FINDING_BY_SPELLING = {spelling(n): i for i, n in enumerate(FINDING_CLASSES)}


def read_class_map(path: str | Path) -> dict[str, str | None]:
    """A YAML/JSON mapping ``their class name: VinDr-CXR finding name`` (or ``null`` to drop the class)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read the class map ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: a class map is a mapping 'their name: finding name'")
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}


def map_classes(
    names: list[str], class_map: Mapping[str, str | None] | None = None, drop_unmapped: bool = False
) -> list[int]:
    """For each of the model's class names, the VinDr-CXR finding id it reports as, or -1 (dropped).

    An explicit ``class_map`` entry wins (``None``: drop); else the name itself is matched by spelling. A name
    that maps to nothing is a ModelError naming every such class, unless ``drop_unmapped``. Two outputs may not
    report as the same finding."""
    given = {spelling(k): v for k, v in (class_map or {}).items()}
    out: list[int] = []
    unmapped: list[str] = []
    for name in names:
        key = spelling(name)
        if key in given:
            target = given[key]
            if target is None:
                out.append(-1)
                continue
            if spelling(target) not in FINDING_BY_SPELLING:
                raise ModelError(
                    f"class map: {name!r} -> {target!r}, which is not a VinDr-CXR finding "
                    f"(one of: {', '.join(FINDING_CLASSES)})"
                )
            out.append(FINDING_BY_SPELLING[spelling(target)])
        elif key in FINDING_BY_SPELLING:
            out.append(FINDING_BY_SPELLING[key])
        else:
            out.append(-1)
            unmapped.append(name)
    if unmapped and not drop_unmapped:
        raise ModelError(
            f"classes that map to no VinDr-CXR finding: {', '.join(repr(n) for n in unmapped)}; map them with "
            f"--class-map FILE ('their name: finding name', null to drop) or drop them with --drop-unmapped "
            f"(the findings are: {', '.join(FINDING_CLASSES)})"
        )
    taken = [i for i in out if i >= 0]
    twice = sorted({FINDING_CLASSES[i] for i in taken if taken.count(i) > 1})
    if twice:
        raise ModelError(f"several classes would report as the same finding: {', '.join(twice)}")
    if not taken:
        raise ModelError("no class of this model maps to a VinDr-CXR finding")
    return out


def load_pickled(path: str | Path) -> Any:
    """``torch.load`` with pickling allowed: an operator action on a file they trust (see PICKLE_WARNING)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    from inference import ultralytics_env  # noqa: F401  (ultralytics checkpoints unpickle ultralytics classes)

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc


def card_metadata(card: str | Path | None, **overrides: Any) -> dict[str, Any]:
    """Model card fields (``version``, ``name``, ``training_data``, ``metrics``, ``extra``) from a small YAML file,
    with command-line values winning."""
    data: dict[str, Any] = {}
    if card is not None:
        try:
            loaded = yaml.safe_load(Path(card).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ModelError(f"{card}: cannot read the model card ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ModelError(f"{card}: a model card is a mapping (version, name, training_data, metrics, extra)")
        unknown = set(loaded) - {"version", "name", "training_data", "metrics", "extra"}
        if unknown:
            raise ModelError(f"{card}: unknown model card keys {sorted(unknown)}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ModelError("model card: metrics must map names to numbers")
    return data


def card_fields(card: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """The ModelMetadata fields a model card gives (see :func:`card_metadata`), with defaults."""
    card = card or {}
    return {
        "version": str(card.get("version", "0.0.0")),
        "name": str(card.get("name", kind)),
        "training_data": str(card.get("training_data", "")),
        "metrics": dict(card.get("metrics") or {}),
    }


def detector_metadata(
    arch: str,
    size: int,
    names: list[str],
    output_classes: list[int],
    card: dict[str, Any] | None,
    provenance: dict[str, Any],
    clahe_clip_limit: float,
    clahe_tile_grid: int,
) -> ModelMetadata:
    """An imported detector's metadata: its own classes, which finding each reports as, and what it reports."""
    return ModelMetadata(
        kind="detector",
        architecture=arch,
        preprocess=PreprocessParams.for_detector(
            input_size=size, clahe_clip_limit=clahe_clip_limit, clahe_tile_grid=clahe_tile_grid
        ),
        **card_fields(card, "detector"),
        extra={
            **dict((card or {}).get("extra") or {}),
            "output_classes": output_classes,
            "output_names": names,
            "reportable_classes": sorted({FINDING_CLASSES[i] for i in output_classes if i >= 0}),
            **provenance,
        },
    )


def check_abnormal_index(outputs: int, abnormal_index: int | None, source: Path) -> None:
    """A classifier with several outputs (a softmax) must say which one is "abnormal"."""
    if outputs > 1 and abnormal_index is None:
        raise ModelError(
            f"{source}: the model has {outputs} outputs (a softmax); say which is abnormal: --abnormal-index"
        )
    if outputs > 1 and not 0 <= int(abnormal_index or 0) < outputs:
        raise ModelError(f"--abnormal-index {abnormal_index} is not one of the model's {outputs} outputs")


def classifier_metadata(
    arch: str,
    preprocess: PreprocessParams,
    outputs: int,
    abnormal_index: int | None,
    card: dict[str, Any] | None,
    provenance: dict[str, Any],
) -> ModelMetadata:
    """An imported classifier's metadata: its outputs (one logit, or a softmax and which output is abnormal)."""
    extra: dict[str, Any] = {**dict((card or {}).get("extra") or {}), "outputs": outputs, **provenance}
    if outputs > 1:
        extra["abnormal_index"] = int(abnormal_index or 0)
    return ModelMetadata(
        kind="classifier", architecture=arch, preprocess=preprocess, **card_fields(card, "classifier"), extra=extra
    )


def _provenance(path: Path, fmt: str, **more: Any) -> dict[str, Any]:
    return {"imported_from": {"file": path.name, "sha256": sha256_of(path), "format": fmt, **more}}


# ---- ultralytics ----------------------------------------------------------------------------------------
def import_ultralytics(
    source: str | Path,
    output: str | Path,
    *,
    class_map: Mapping[str, str | None] | None = None,
    drop_unmapped: bool = False,
    input_size: int | None = None,
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
    card: dict[str, Any] | None = None,
) -> Path:
    """An ultralytics detection checkpoint -> a node detector file (see the module docstring)."""
    source = Path(source)
    ckpt = load_pickled(source)
    if not isinstance(ckpt, dict) or not any(k in ckpt for k in ("ema", "model")):
        raise ModelError(f"{source}: not an ultralytics checkpoint (no 'model' or 'ema' in it)")
    model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if model is None or not hasattr(model, "yaml") or not hasattr(model, "names"):
        raise ModelError(f"{source}: the checkpoint holds no ultralytics model")
    task = getattr(model, "task", None) or (ckpt.get("train_args") or {}).get("task", "detect")
    if task != "detect":
        raise ModelError(f"{source}: an ultralytics {task} model; only detection models can be imported")
    names_obj = model.names
    names = [str(names_obj[i]) for i in range(len(names_obj))] if isinstance(names_obj, dict) else list(names_obj)
    output_classes = map_classes(names, class_map, drop_unmapped)
    for name, target in zip(names, output_classes):
        log.info("class %-22r -> %s", name, FINDING_CLASSES[target] if target >= 0 else "(dropped)")
    size = int(input_size or (ckpt.get("train_args") or {}).get("imgsz") or 640)
    if size % 32:
        raise ModelError(f"detector input size {size} is not a multiple of 32")
    yaml_dict = dict(model.yaml)
    arch = Path(str(yaml_dict.get("yaml_file") or "yolo")).stem
    state_dict = {k: v.float() for k, v in model.float().state_dict().items()}
    provenance = _provenance(source, "ultralytics", ultralytics_version=str(ckpt.get("version", "")), nc=len(names))
    meta = detector_metadata(arch, size, names, output_classes, card, provenance, clahe_clip_limit, clahe_tile_grid)
    return save_model_file(output, meta, state_dict, model_yaml=yaml_dict)


# ---- timm -----------------------------------------------------------------------------------------------
def find_state_dict(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    """The weights in what a notebook saved: a state_dict, or a dict that holds one under a usual key; a whole
    pickled module also works. ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes go."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        else:
            raise ModelError(
                f"{source}: no state_dict found (a dict of tensors, or one under {', '.join(STATE_DICT_KEYS)})"
            )
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{source}: no state_dict found")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v.float() if v.is_floating_point() else v
    return out


def classifier_preprocess(
    input_size: int,
    channels: int,
    normalize: str,
    resize: str = "stretch",
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
) -> PreprocessParams:
    """The preprocessing of a classifier trained with the ordinary tools: ``normalize`` ``imagenet`` (the
    torchvision/timm mean and std, per channel) or ``none`` ([0, 1] as it is)."""
    if normalize == "imagenet":
        mean: float | tuple[float, ...] = IMAGENET_MEAN if channels == 3 else float(sum(IMAGENET_MEAN) / 3)
        std: float | tuple[float, ...] = IMAGENET_STD if channels == 3 else float(sum(IMAGENET_STD) / 3)
    elif normalize == "none":
        mean, std = 0.0, 1.0
    else:
        raise ModelError(f"--normalize must be imagenet or none, not {normalize!r}")
    return PreprocessParams(
        input_size=input_size,
        channels=channels,
        mean=mean,
        std=std,
        resize=resize,
        pad_value=PAD_VALUE if resize == "letterbox" else 0.0,
        clahe_clip_limit=clahe_clip_limit,
        clahe_tile_grid=clahe_tile_grid,
    )


def import_timm(
    source: str | Path,
    output: str | Path,
    *,
    arch: str,
    input_size: int = 224,
    channels: int = 3,
    normalize: str = "imagenet",
    resize: str = "stretch",
    abnormal_index: int | None = None,
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
    card: dict[str, Any] | None = None,
) -> Path:
    """A timm classifier's weights -> a node classifier file. One output: a logit of "abnormal"; two or more:
    a softmax, and ``abnormal_index`` says which output is "abnormal" (needed then)."""
    from inference.classifier import build_classifier

    source = Path(source)
    state_dict = find_state_dict(load_pickled(source), source)
    outputs = _num_outputs(arch, channels, state_dict, source)
    check_abnormal_index(outputs, abnormal_index, source)
    model = build_classifier(arch, in_chans=channels, num_classes=outputs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{source}: the weights do not fit timm {arch!r} with {channels} channel(s) and {outputs} output(s): "
            f"{' '.join(str(exc).splitlines()[:2])}"
        ) from exc
    preprocess = classifier_preprocess(input_size, channels, normalize, resize, clahe_clip_limit, clahe_tile_grid)
    meta = classifier_metadata(arch, preprocess, outputs, abnormal_index, card, _provenance(source, "timm"))
    meta.weights_dtype = "float32"  # as trained: the same probabilities as the original, not a rounded copy
    return save_model_file(output, meta, model.state_dict())


def _num_outputs(arch: str, channels: int, state_dict: dict[str, torch.Tensor], source: Path) -> int:
    """How many outputs the saved head has: the first dimension of the classifier's last weight."""
    from inference.classifier import build_classifier

    probe = build_classifier(arch, in_chans=channels, num_classes=1)
    head = probe.get_classifier() if hasattr(probe, "get_classifier") else None
    names = [n for n, p in probe.named_parameters() if head is not None and any(p is q for q in head.parameters())]
    weight = next((n for n in names if n.endswith("weight")), None)
    if weight is None or weight not in state_dict:
        raise ModelError(f"{source}: no classifier head {weight or ''} in the weights: is --arch {arch} right?")
    return int(state_dict[weight].shape[0])


# ---- ONNX -----------------------------------------------------------------------------------------------
def _onnx_names(meta: dict[str, str]) -> list[str] | None:
    """Class names an ultralytics ONNX export records in its metadata (``names``: "{0: 'a', 1: 'b'}")."""
    import ast

    text = meta.get("names")
    if not text:
        return None
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def import_onnx(
    source: str | Path,
    output: str | Path,
    *,
    kind: str,
    input_size: int | None = None,
    names: list[str] | None = None,
    class_map: Mapping[str, str | None] | None = None,
    drop_unmapped: bool = False,
    channels: int | None = None,
    normalize: str = "imagenet",
    resize: str = "stretch",
    abnormal_index: int | None = None,
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
    card: dict[str, Any] | None = None,
) -> Path:
    """An ONNX classifier or detector -> a node model file that carries the graph (it runs in ONNX Runtime).
    The input must be N x C x S x S; S (and C) come from the graph when it fixes them, else from the options.
    A detector's output must be ultralytics' (N, 4 + classes, anchors); its class names come from ``names`` or
    the export's own metadata."""
    from inference.onnx_backend import OnnxModule

    source = Path(source)
    graph = source.read_bytes()
    module = OnnxModule(graph)
    shape = module.input_shape
    if len(shape) != 4:
        raise ModelError(f"{source}: the graph's input must be N x C x S x S, it is {shape}")
    fixed_c = shape[1] if isinstance(shape[1], int) else None
    fixed_s = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
    size = int(input_size or fixed_s or 0)
    if not size:
        raise ModelError(f"{source}: the graph does not fix its input size; give --input-size")
    if fixed_s and size != fixed_s:
        raise ModelError(f"{source}: the graph takes {fixed_s} px, not --input-size {size}")
    c = int(channels or fixed_c or 3)
    if fixed_c and c != fixed_c:
        raise ModelError(f"{source}: the graph takes {fixed_c} channel(s), not --channels {c}")
    probe = module(torch.zeros(1, c, size, size))
    card = card or {}
    if kind == "detector":
        if size % 32:
            raise ModelError(f"detector input size {size} is not a multiple of 32")
        names = names or _onnx_names(module.metadata)
        if not names:
            raise ModelError(f"{source}: the graph does not name its classes; give --names 'a,b,...'")
        if probe.ndim != 3 or probe.shape[1] != 4 + len(names):
            raise ModelError(
                f"{source}: expected an output of shape (N, 4 + {len(names)} classes, anchors), "
                f"got {tuple(probe.shape)}"
            )
        classes = map_classes(names, class_map, drop_unmapped)
        meta = detector_metadata(
            f"onnx:{source.stem}", size, names, classes, card, _provenance(source, "onnx"), clahe_clip_limit,
            clahe_tile_grid,
        )  # fmt: skip
    elif kind == "classifier":
        outputs = int(probe.reshape(1, -1).shape[1])
        check_abnormal_index(outputs, abnormal_index, source)
        preprocess = classifier_preprocess(size, c, normalize, resize, clahe_clip_limit, clahe_tile_grid)
        meta = classifier_metadata(
            f"onnx:{source.stem}", preprocess, outputs, abnormal_index, card, _provenance(source, "onnx")
        )
    else:
        raise ModelError(f"--kind must be classifier or detector for an ONNX model, not {kind!r}")
    return save_model_file(output, meta, {}, onnx=graph)
