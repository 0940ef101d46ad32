"""``dicom-node train classifier|detector ...`` and ``dicom-node evaluate ...``.

The main command line hands these two commands over before it builds its own parser, so neither the node
(``serve``, ``worker``) nor ``status`` ever imports the training code. DICOM exports of VinBigData folders
happen here, on the DICOM side; the training itself lives in :mod:`inference.training.commands`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from dicom_node.cli import TRAINING_COMMANDS
from dicom_node.errors import DicomNodeError
from dicom_node.logs import setup_logging
from dicom_node.training.vinbigdata_export import prepare_args
from dicom_node.work.offline import read_image
from inference.errors import DatasetError
from inference.training import commands


def _run(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def go(args: argparse.Namespace) -> int:
        setup_logging("INFO")
        prepare_args(args)
        args.load_image = _load_image  # DICOM as well as PNG/JPEG, for evaluate and calibrate
        return run(args)

    return go


def _load_image(path) -> tuple[np.ndarray, str | None]:
    """An image file (DICOM, PNG or JPEG) -> (float32 image in [0, 1], its ViewPosition when the header says);
    a file that cannot be read as a greyscale radiograph raises DatasetError with the reason."""
    try:
        img, _, view = read_image(path)
    except (DicomNodeError, ValueError, OSError) as exc:
        raise DatasetError(str(exc)) from exc
    return img, view


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


def run_import_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inference.importing import (
        PICKLE_WARNING,
        card_metadata,
        import_onnx,
        import_timm,
        import_ultralytics,
        load_pickled,
        read_class_map,
    )
    from inference.modelfile import read_metadata, sha256_of

    source = Path(args.source)
    card = card_metadata(args.card, version=args.version, name=args.name, training_data=args.training_data)
    class_map = read_class_map(args.class_map) if args.class_map else None
    fmt = args.format
    if fmt == "auto":
        if source.suffix.lower() == ".onnx":
            fmt = "onnx"
        else:
            print(f"warning: {PICKLE_WARNING}")
            ckpt = load_pickled(source)
            held = [ckpt.get(k) for k in ("ema", "model")] if isinstance(ckpt, dict) else []
            fmt = "ultralytics" if any(hasattr(m, "yaml") and hasattr(m, "names") for m in held) else "timm"
    elif fmt in ("ultralytics", "timm"):
        print(f"warning: {PICKLE_WARNING}")
    clahe = {"clahe_clip_limit": args.clahe_clip, "clahe_tile_grid": args.clahe_tiles}
    if fmt == "ultralytics":
        out = import_ultralytics(
            source,
            args.output,
            class_map=class_map,
            drop_unmapped=args.drop_unmapped,
            input_size=args.input_size,
            card=card,
            **clahe,
        )
    elif fmt == "timm":
        if not args.arch:
            raise DicomNodeError("a timm classifier needs --arch (e.g. davit_tiny)")
        out = import_timm(
            source,
            args.output,
            arch=args.arch,
            input_size=args.input_size or 224,
            channels=args.channels or 3,
            normalize=args.normalize,
            resize=args.resize,
            abnormal_index=args.abnormal_index,
            card=card,
            **clahe,
        )
    else:
        if not args.kind:
            raise DicomNodeError("an ONNX model needs --kind classifier or --kind detector")
        out = import_onnx(
            source,
            args.output,
            kind=args.kind,
            input_size=args.input_size,
            names=[n.strip() for n in args.names.split(",")] if args.names else None,
            class_map=class_map,
            drop_unmapped=args.drop_unmapped,
            channels=args.channels,
            normalize=args.normalize,
            resize=args.resize,
            abnormal_index=args.abnormal_index,
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


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a dicom-node model file (classifier or detector)")


def run_export_onnx(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from inference.classifier import Classifier
    from inference.detector import Detector
    from inference.modelfile import read_metadata
    from inference.onnx_backend import OnnxModule, export_onnx, export_path

    meta = read_metadata(args.model)
    net = Classifier.load(args.model) if meta.kind == "classifier" else Detector.load(args.model)
    if net.onnx:
        raise DicomNodeError(f"{args.model}: imported from ONNX; it carries its graph already")
    out = export_onnx(net.model, meta.preprocess.channels, meta.input_size, export_path(args.model), net.info.sha256)
    x = torch.rand(2, meta.preprocess.channels, meta.input_size, meta.input_size)
    with torch.inference_mode():
        ref = net.model(x)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().numpy()
    got = OnnxModule(out)(x).numpy()
    diff = float(np.abs(ref - got).max())
    print(f"wrote {out} (ONNX opset 17, batch size dynamic); largest difference to torch on random input: {diff:.2e}")
    print("use it: inference.models.backend: onnxruntime")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="Training and evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", description=TRAINING_COMMANDS["train"])
    train_sub = train.add_subparsers(dest="model_kind", required=True)
    for kind, add, run in (
        ("classifier", commands.add_train_classifier_arguments, commands.run_train_classifier),
        ("detector", commands.add_train_detector_arguments, commands.run_train_detector),
    ):
        tp = train_sub.add_parser(kind, help=f"train the {kind}")
        add(tp)
        tp.set_defaults(func=_run(run))
    for name, add, run in (
        ("evaluate", commands.add_evaluate_arguments, commands.run_evaluate),
        ("tune-detector", commands.add_tune_detector_arguments, commands.run_tune_detector),
        ("audit", commands.add_audit_arguments, commands.run_audit),
        ("calibrate", commands.add_calibrate_arguments, commands.run_calibrate),
        ("import-model", add_import_arguments, run_import_model),
        ("export-onnx", add_export_arguments, run_export_onnx),
    ):
        cp = sub.add_parser(name, description=TRAINING_COMMANDS[name])
        add(cp)
        cp.set_defaults(func=_run(run))
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
