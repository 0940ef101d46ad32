"""``dicom-node import-model``: turn an ultralytics, timm or ONNX model into a dicom-node model file. Its options,
read once from the parsed command line into :class:`ImportModelOptions`, and the import
(:mod:`inference.importing` does the work)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.cli.data_options import from_namespace
from dicom_node.cli.exit_codes import UsageError


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="best.pt / last.pt of ultralytics, a timm state_dict or checkpoint, or a .onnx file")
    p.add_argument("--output", "-o", required=True, help="the dicom-node model file to write (e.g. models/mine.pt)")
    p.add_argument(
        "--format",
        choices=("auto", "ultralytics", "timm", "onnx"),
        default="auto",
        help="auto: .onnx is ONNX; a checkpoint with an ultralytics model is ultralytics; else timm",
    )
    p.add_argument("--kind", choices=("classifier", "detector"), help="for an ONNX model: what it is")
    g = p.add_argument_group("detector")
    g.add_argument("--class-map", help="YAML/JSON 'their class name: VinDr-CXR finding name' (null drops a class)")
    g.add_argument("--drop-unmapped", action="store_true", help="drop classes that map to no finding")
    g.add_argument("--names", help="ONNX detector: its class names, comma-separated (else read from the export)")
    g = p.add_argument_group("classifier")
    g.add_argument("--arch", help="timm architecture, e.g. davit_tiny, densenet121")
    g.add_argument(
        "--input-size",
        type=int,
        help="input side in pixels (classifier default 224; detector: from the checkpoint's imgsz)",
    )
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="input channels (default 3)")
    g.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet")
    g.add_argument(
        "--resize",
        choices=("stretch", "letterbox"),
        default="stretch",
        help="stretch: straight to S x S (torchvision Resize((S, S))); letterbox: aspect kept, padded",
    )
    g.add_argument("--abnormal-index", type=int, help="softmax models: which output is 'abnormal'")
    g = p.add_argument_group("preprocessing and model card")
    g.add_argument(
        "--clahe-clip", type=float, default=2.0, help="CLAHE clip limit the model was trained with (0: none)"
    )
    g.add_argument("--clahe-tiles", type=int, default=8, help="CLAHE tiles per side")
    g.add_argument("--card", help="YAML with version, name, training_data, metrics, extra")
    g.add_argument("--version", help="model version (overrides the card)")
    g.add_argument("--name", help="model name shown in the outputs (overrides the card)")
    g.add_argument("--training-data", help="what it was trained on (overrides the card)")


@dataclass(frozen=True)
class ImportModelOptions:
    source: Path
    output: str
    format: str  # auto, ultralytics, timm, onnx
    kind: str | None  # ONNX: classifier or detector
    class_map: str | None  # file of 'their class name: VinDr-CXR finding name'
    drop_unmapped: bool
    names: list[str] | None  # ONNX detector: its class names
    arch: str | None  # timm architecture
    input_size: int | None
    channels: int | None
    normalize: str
    resize: str
    abnormal_index: int | None
    clahe_clip: float
    clahe_tiles: int
    card: str | None
    version: str | None
    name: str | None
    training_data: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ImportModelOptions:
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        return from_namespace(cls, args, source=Path(args.source), names=names)


def _source_format(o: ImportModelOptions) -> str:
    """The format of ``o.source``: as given, or (``auto``) ``.onnx`` is ONNX, a checkpoint holding an ultralytics
    model is ultralytics, anything else timm. Warns before unpickling a checkpoint."""
    from inference.importing import PICKLE_WARNING, load_pickled

    if o.format in ("ultralytics", "timm"):
        print(f"warning: {PICKLE_WARNING}")
    if o.format != "auto":
        return o.format
    if o.source.suffix.lower() == ".onnx":
        return "onnx"
    print(f"warning: {PICKLE_WARNING}")
    ckpt = load_pickled(o.source)
    held = [ckpt.get(k) for k in ("ema", "model")] if isinstance(ckpt, dict) else []
    return "ultralytics" if any(hasattr(m, "yaml") and hasattr(m, "names") for m in held) else "timm"


def run_import_model(args: argparse.Namespace) -> int:
    from inference.importing import card_metadata, import_onnx, import_timm, import_ultralytics, read_class_map
    from inference.modelfile import read_metadata, sha256_of

    o = ImportModelOptions.from_args(args)
    card = card_metadata(o.card, version=o.version, name=o.name, training_data=o.training_data)
    class_map = read_class_map(o.class_map) if o.class_map else None
    fmt = _source_format(o)
    clahe: dict[str, Any] = {"clahe_clip_limit": o.clahe_clip, "clahe_tile_grid": o.clahe_tiles}
    if fmt == "ultralytics":
        out = import_ultralytics(
            o.source,
            o.output,
            class_map=class_map,
            drop_unmapped=o.drop_unmapped,
            input_size=o.input_size,
            card=card,
            **clahe,
        )
    elif fmt == "timm":
        if not o.arch:
            raise UsageError("a timm classifier needs --arch (e.g. davit_tiny)")
        out = import_timm(
            o.source,
            o.output,
            arch=o.arch,
            input_size=o.input_size or 224,
            channels=o.channels or 3,
            normalize=o.normalize,
            resize=o.resize,
            abnormal_index=o.abnormal_index,
            card=card,
            **clahe,
        )
    else:
        if not o.kind:
            raise UsageError("an ONNX model needs --kind classifier or --kind detector")
        out = import_onnx(
            o.source,
            o.output,
            kind=o.kind,
            input_size=o.input_size,
            names=o.names,
            class_map=class_map,
            drop_unmapped=o.drop_unmapped,
            channels=o.channels,
            normalize=o.normalize,
            resize=o.resize,
            abnormal_index=o.abnormal_index,
            card=card,
            **clahe,
        )
    meta = read_metadata(out)
    print(
        f"wrote {out}: {meta.kind} {meta.architecture} {meta.version}, {meta.input_size} px, "
        f"{meta.preprocess.channels} channel(s), sha256 {sha256_of(out)[:12]}"
    )
    if meta.kind == "detector":
        print(f"reports: {', '.join(meta.extra.get('reportable_classes', []))}")
    print(f"use it: inference.models.{meta.kind}: {out}   (then dicom-node check-config)")
    return 0
