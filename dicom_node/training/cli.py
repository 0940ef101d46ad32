"""``dicom-node train classifier|detector ...`` and ``dicom-node evaluate ...``.

The main command line hands these two commands over before it builds its own parser, so neither the node
(``serve``, ``worker``) nor ``status`` ever imports the training code. DICOM exports of VinBigData folders
happen here, on the DICOM side; the training itself lives in :mod:`inference.training.commands`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from dicom_node.cli import TRAINING_COMMANDS
from dicom_node.errors import DicomNodeError
from dicom_node.logs import setup_logging
from dicom_node.training.vinbigdata_export import prepare_args
from dicom_node.work.offline import read_image
from inference.errors import DatasetError
from inference.training import commands

log = logging.getLogger(__name__)
MIN_CALIBRATION = 8  # radiographs an int8 export needs at least


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
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantise the convolutions to int8 (about 2x faster on CPU; outputs change slightly: check with "
        "dicom-node evaluate --backend onnxruntime before use)",
    )
    p.add_argument(
        "--calibration-images",
        nargs="+",
        metavar="PATH",
        help="with --int8: real radiographs (DICOM/PNG/JPEG files or folders) to measure activation ranges on, normal "
        "and abnormal, from your own devices (give it after the model file: it takes several paths)",
    )
    p.add_argument("--calibration-count", type=int, default=64, help="with --int8: at most this many images")
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="with --int8: 7-bit weights, for x86 CPUs without VNNI (AVX2 only), where 8-bit ones can saturate",
    )


def _working_size(meta) -> int:
    """The size the pipeline shrinks a film to before CLAHE: the larger input of the two configured models (the
    model being exported counts for its kind). Calibration films must be prepared at that size, as the node does."""
    from dicom_node.config import load_config
    from inference.modelfile import read_metadata

    size = meta.input_size
    try:
        models = load_config(None).inference.models
        other = models.detector if meta.kind == "classifier" else models.classifier
        size = max(size, read_metadata(other).input_size)
    except (DicomNodeError, OSError, ValueError) as exc:
        log.warning("working size: %s; preparing calibration films at the model's own %d px", exc, size)
    return size


def _calibration_batches(net, files: list, working_size: int) -> tuple[list[np.ndarray], list[str]]:
    """The network's prepared input (1 x C x S x S) for each calibration film, as the pipeline makes it (shrink to
    the working size, CLAHE, letterbox or stretch, normalise); files that are not analysable radiographs are
    left out, and their names returned."""
    from inference.preprocess import prepare
    from inference.quality import input_problem

    batches, left_out = [], []
    for f in files:
        try:
            img, _ = _load_image(f)
        except DatasetError as exc:
            left_out.append(f"{f}: {exc}")
            continue
        problem = input_problem(img)
        if problem:
            left_out.append(f"{f}: {problem}")
            continue
        x, _ = prepare(img, net.preprocess, working_size)
        batches.append(x[None])
    return batches, left_out


def _pick_calibration_files(args: argparse.Namespace) -> list:
    from dicom_node.work.offline import expand_inputs

    if not args.calibration_images:
        raise DicomNodeError("--int8 needs --calibration-images: a folder of real radiographs (DICOM, PNG or JPEG)")
    if args.calibration_count < MIN_CALIBRATION:
        raise DicomNodeError(f"--calibration-count must be at least {MIN_CALIBRATION}")
    files = expand_inputs(args.calibration_images)
    if len(files) > args.calibration_count:  # evenly spread over the sorted list, not the first few
        step = len(files) / args.calibration_count
        files = [files[int(i * step)] for i in range(args.calibration_count)]
    return files


def run_export_onnx(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from inference.classifier import Classifier
    from inference.detector import Detector
    from inference.modelfile import read_metadata
    from inference.onnx_backend import export_onnx, export_path, quantize_int8

    meta = read_metadata(args.model)
    net = Classifier.load(args.model) if meta.kind == "classifier" else Detector.load(args.model)
    if net.onnx:
        raise DicomNodeError(f"{args.model}: imported from ONNX; it carries its graph already")
    if (args.calibration_images or args.reduce_range) and not args.int8:
        raise DicomNodeError("--calibration-images and --reduce-range are for --int8 exports")
    files = _pick_calibration_files(args) if args.int8 else []
    out = export_path(args.model)
    channels, size_in = meta.preprocess.channels, meta.input_size
    if not args.int8:
        export_onnx(net.model, channels, size_in, out, net.info.sha256)
        batches = [torch.rand(2, channels, size_in, size_in).numpy()]
    else:
        size = _working_size(meta)
        batches, left_out = _calibration_batches(net, files, size)
        for line in left_out:
            log.warning("calibration film left out: %s", line)
        if len(batches) < MIN_CALIBRATION:
            raise DicomNodeError(
                f"--calibration-images: {len(batches)} analysable radiograph(s) of {len(files)} file(s) tried; int8 "
                f"ranges need at least {MIN_CALIBRATION}"
            )
        with tempfile.TemporaryDirectory(prefix="export-onnx-") as tmp:
            fp32 = export_onnx(net.model, channels, size_in, Path(tmp) / "float32.onnx", net.info.sha256)
            # what the ranges were measured on, without file names (they can carry patient identifiers)
            digest = hashlib.sha256("\n".join(sorted(str(f) for f in files)).encode()).hexdigest()[:12]
            source = f"{len(batches)} radiographs prepared at {size} px (file list sha256 {digest})"
            quantize_int8(fp32, out, batches, source, meta.kind == "detector", args.reduce_range)
        print(f"calibrated on {len(batches)} radiographs, prepared at the working size {size} px as the node does")
    on = "random input" if not args.int8 else "the calibration films (optimistic: measure others with evaluate)"
    print(f"wrote {out} ({'int8' if args.int8 else 'float32'}, ONNX opset 17, batch size dynamic)")
    print(f"compared with torch on {on}: {_export_differences(args.model, net, batches)}")
    if args.int8:
        print(
            f"the node reports this model as version {meta.version}+int8. int8 changes results slightly: measure it "
            "on labelled films with the backend you will run (dicom-node evaluate --backend onnxruntime ...) before "
            "use, and calibrate with it (dicom-node calibrate --backend onnxruntime ...)"
        )
    print("use it: inference.models.backend: onnxruntime")
    return 0


def _export_differences(model_file: str, net: Any, batches: list[np.ndarray]) -> str:
    """How far the export beside ``model_file`` is from the torch network on ``batches``, in what the node reports:
    P(abnormal) for a classifier; for a detector, the class scores of the 20 strongest candidate boxes (before
    NMS) of each image."""
    import torch

    from inference.classifier import Classifier
    from inference.detector import Detector

    if isinstance(net, Classifier):
        clf = Classifier.load(model_file, backend="onnxruntime")
        changes = np.concatenate([clf.predict(b) - net.predict(b) for b in batches])
        worst = float(np.abs(changes).max())
        note = " (a film that close to the operating point may change decision)" if worst > 1e-3 else ""
        return f"P(abnormal) changes by {np.mean(changes):+.2g} on average, by at most {worst:.2g}{note}"
    det = Detector.load(model_file, backend="onnxruntime")
    diffs: list[float] = []
    with torch.inference_mode():
        for b in batches:
            ref, got = net.forward(b).numpy()[:, 4:].max(1), det.forward(b).numpy()[:, 4:].max(1)
            for r, g in zip(ref, got):  # rows 4: of the raw output are the class scores
                top = np.argsort(-r)[:20]
                diffs.append(float(np.abs(g[top] - r[top]).max()))
    median, worst = np.median(diffs), max(diffs)
    return f"the 20 strongest candidate boxes' scores (before NMS) change by {median:.2g} (median), at most {worst:.2g}"


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
