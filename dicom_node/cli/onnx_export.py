"""``dicom-node export-onnx``: write the ONNX export of a model file beside it (float32, or int8 calibrated on
real radiographs prepared as the node prepares them), and say how far its outputs are from torch's. Its options
are read once from the parsed command line into :class:`ExportOnnxOptions`; options that do not go together are
a :class:`~dicom_node.cli.exit_codes.UsageError`."""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.cli.data_options import from_namespace, read_radiograph
from dicom_node.cli.exit_codes import UsageError
from dicom_node.errors import DicomNodeError
from inference.errors import DatasetError

log = logging.getLogger(__name__)
MIN_CALIBRATION = 8  # radiographs an int8 export needs at least


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


@dataclass(frozen=True)
class ExportOnnxOptions:
    model: str  # the dicom-node model file
    int8: bool
    calibration_images: tuple[str, ...]  # with int8: files or folders of real radiographs
    calibration_count: int  # with int8: at most this many images
    reduce_range: bool  # with int8: 7-bit weights

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOnnxOptions:
        if (args.calibration_images or args.reduce_range) and not args.int8:
            raise UsageError("--calibration-images and --reduce-range are for --int8 exports")
        if args.int8 and not args.calibration_images:
            raise UsageError("--int8 needs --calibration-images: a folder of real radiographs (DICOM, PNG or JPEG)")
        if args.int8 and args.calibration_count < MIN_CALIBRATION:
            raise UsageError(f"--calibration-count must be at least {MIN_CALIBRATION}")
        return from_namespace(cls, args, calibration_images=tuple(args.calibration_images or ()))


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
            img, _ = read_radiograph(f)
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


def _pick_calibration_files(o: ExportOnnxOptions) -> list[Path]:
    from dicom_node.work.offline import expand_inputs

    files = expand_inputs(o.calibration_images)
    if len(files) > o.calibration_count:  # evenly spread over the sorted list, not the first few
        step = len(files) / o.calibration_count
        files = [files[int(i * step)] for i in range(o.calibration_count)]
    return files


def run_export_onnx(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from inference.classifier import Classifier
    from inference.detector import Detector
    from inference.modelfile import read_metadata
    from inference.onnx_backend import export_onnx, export_path, quantize_int8

    o = ExportOnnxOptions.from_args(args)
    meta = read_metadata(o.model)
    net = Classifier.load(o.model) if meta.kind == "classifier" else Detector.load(o.model)
    if net.onnx:
        raise DicomNodeError(f"{o.model}: imported from ONNX; it carries its graph already")
    files = _pick_calibration_files(o) if o.int8 else []
    out = export_path(o.model)
    channels, size_in = meta.preprocess.channels, meta.input_size
    if not o.int8:
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
            quantize_int8(fp32, out, batches, source, meta.kind == "detector", o.reduce_range)
        print(f"calibrated on {len(batches)} radiographs, prepared at the working size {size} px as the node does")
    on = "random input" if not o.int8 else "the calibration films (optimistic: measure others with evaluate)"
    print(f"wrote {out} ({'int8' if o.int8 else 'float32'}, ONNX opset 17, batch size dynamic)")
    print(f"compared with torch on {on}: {_export_differences(o.model, net, batches)}")
    if o.int8:
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
