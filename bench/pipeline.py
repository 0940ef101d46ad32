"""Per-stage timings of the inference pipeline on the real DICOM samples.

    .venv/bin/python bench/pipeline.py [--reps 5] [--threads 1] [--classifier PATH --detector PATH]
                                       [--backend torch|onnxruntime|both]

Stages per image (median over ``--reps`` after one warm-up): decode (dicom_node.imaging.pixels.decode_image as the
worker calls it: a JPEG 2000 image at the coarsest resolution level that still covers the working size),
CLAHE, classifier input (letterbox/normalise), classifier forward, detector input, detector
forward, NMS (+ mapping boxes to source pixels), fusion; then the whole path as the node runs it
(decode + ``Pipeline.run``) and the overhead ratio

    overhead = whole / (classifier forward + detector forward)

i.e. how much the non-network work costs on top of the two networks (1.0 = none).

``--backend both`` then compares the backends in the same process: the model files are copied to a temporary
folder, exported to ONNX there (as ``dicom-node export-onnx`` does: float32, then int8 calibrated on 64 images
of ``--calibration-images`` as ``export-onnx --int8`` does), and per image the median time of the two network
forwards and of the whole ``Pipeline.run`` is printed for torch, ONNX Runtime float32, ONNX Runtime with the
detector int8 (classifier float32: the recommended fast setting) and with both int8 (runs interleaved), with
the ratio to torch (issue 12's target: <= 0.6 for the default models on 2 cores), and the largest difference in
P(abnormal) and in box coordinates to torch.

Models: the files named in ``config.yaml`` (``models/classifier.pt``, ``models/detector.pt``) when
they exist, else tiny random-weight models (printed), which time the plumbing, not real networks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dicom_node.imaging.pixels import decode_image  # noqa: E402
from inference.fusion import FusionParams, fuse  # noqa: E402
from inference.pipeline import Pipeline  # noqa: E402
from inference.preprocess import apply_clahe, to_model_input, working_image  # noqa: E402


def _default_models() -> tuple[Path, Path, FusionParams, str]:
    from dicom_node.config import load_config

    cfg_file = REPO / "config.yaml"
    cfg = load_config(cfg_file) if cfg_file.exists() else load_config(None)
    m = cfg.inference.models
    return m.classifier, m.detector, FusionParams.from_obj(cfg.inference.fusion), m.device


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def bench_file(pipe: Pipeline, path: Path, reps: int) -> dict[str, float]:
    clf, det, fusion = pipe.classifier, pipe.detector, pipe.fusion
    runs: dict[str, list[float]] = {}
    for i in range(reps + 1):
        t: dict[str, float] = {}
        (img, _), t["decode"] = _timed(decode_image, path, at_least=pipe.working_size)
        (work, _), t["resize to working size"] = _timed(
            working_image, img, max(clf.preprocess.input_size, det.preprocess.input_size)
        )
        clahe, t["clahe"] = _timed(apply_clahe, work, clf.preprocess)
        (xc, _), t["classifier input"] = _timed(to_model_input, clahe, clf.preprocess)
        p, t["classifier forward"] = _timed(clf.predict, xc[None])
        (xd, geom), t["detector input"] = _timed(to_model_input, clahe, det.preprocess)
        raw, t["detector forward"] = _timed(det.forward, xd[None])

        def nms(raw=raw, geom=geom):
            d = det.postprocess(raw, conf=fusion.detector_conf, max_det=300)[0]
            return d, geom.to_source(d[:, :4])

        (d, boxes), t["nms + mapping"] = _timed(nms)
        _, t["fusion"] = _timed(fuse, float(p[0]), boxes, d[:, 4], d[:, 5], fusion)
        t0 = time.perf_counter()
        pipe.run(decode_image(path, at_least=pipe.working_size)[0])
        t["whole (decode + Pipeline.run)"] = time.perf_counter() - t0
        if i:  # first round is warm-up
            for k, v in t.items():
                runs.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in runs.items()}


def calibration_inputs(net, folder: Path, working_size: int, count: int = 64) -> list:
    """Prepared inputs of ``count`` real radiographs spread over ``folder`` (for the int8 export), or []. A folder
    with a labels.csv that has a ``split`` column (nih-matched) gives its training films only."""
    import csv

    from dicom_node.work.offline import expand_inputs, read_image
    from inference.preprocess import prepare

    labels = folder / "labels.csv"
    if labels.is_file() and "split" in labels.read_text().splitlines()[0].split(","):
        with labels.open() as fh:
            files = [folder / row["path"] for row in csv.DictReader(fh) if row["split"] == "train"]
    else:
        files = expand_inputs([folder]) if folder.is_dir() else []
    files = [files[int(i * len(files) / count)] for i in range(min(count, len(files)))]
    inputs = []
    for f in files:
        inputs.append(prepare(read_image(f)[0], net.preprocess, working_size)[0][None])
    return inputs


def box_differences(ours, theirs) -> tuple[float, float, int]:
    """For each finding of ``ours``, the finding of the same class in ``theirs`` that overlaps it most (order may
    differ: scores do): the largest coordinate difference (px), the lowest IoU, and how many have no such
    finding."""
    worst, lowest, unmatched = 0.0, 1.0, 0
    for f in ours:
        overlaps = [(_iou(f.box, g.box), g) for g in theirs if g.class_id == f.class_id]
        iou, g = max(overlaps, key=lambda o: o[0], default=(0.0, None))
        if g is None or iou == 0:
            unmatched += 1
            continue
        worst, lowest = max(worst, max(abs(x - y) for x, y in zip(f.box, g.box))), min(lowest, iou)
    return worst, lowest, unmatched


def _iou(a, b) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare_backends(
    clf_path: Path, det_path: Path, fusion: FusionParams, files: list[Path], reps: int, calibration: Path
) -> None:
    import shutil

    from inference.onnx_backend import export_onnx, export_path, quantize_int8

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:

        def copies(name: str) -> tuple[Path, Path]:  # an export lives beside its model file: one folder each
            folder = Path(tmp) / name
            folder.mkdir()
            c, d = folder / "classifier.pt", folder / "detector.pt"
            shutil.copy(clf_path, c)
            shutil.copy(det_path, d)
            return c, d

        pipes = {}
        torch_pipe = pipes["torch"] = Pipeline.from_files(*copies("torch"), fusion)
        fp32 = copies("float32")
        for net, path in zip((torch_pipe.classifier, torch_pipe.detector), fp32):
            pre = net.preprocess
            export_onnx(net.model, pre.channels, pre.input_size, export_path(path), net.info.sha256)
        pipes["onnx float32"] = Pipeline.from_files(*fp32, fusion, backend="onnxruntime")
        nets = (torch_pipe.classifier, torch_pipe.detector)
        inputs = [calibration_inputs(net, calibration, torch_pipe.working_size) for net in nets]
        if inputs[0]:
            int8_det, int8_both = copies("int8-detector"), copies("int8-both")
            clf_fp32, det_fp32 = map(export_path, fp32)
            quantize_int8(det_fp32, export_path(int8_det[1]), inputs[1], str(calibration), detector=True)
            shutil.copy(export_path(int8_det[1]), export_path(int8_both[1]))
            shutil.copy(clf_fp32, export_path(int8_det[0]))  # 'det int8': the classifier stays float32
            quantize_int8(clf_fp32, export_path(int8_both[0]), inputs[0], str(calibration))
            pipes["onnx det int8"] = Pipeline.from_files(*int8_det, fusion, backend="onnxruntime")
            pipes["onnx int8"] = Pipeline.from_files(*int8_both, fusion, backend="onnxruntime")
            print(
                f"int8 exports calibrated on {len(inputs[0])} training films of {calibration}; 'det int8': the "
                "detector int8, the classifier float32; 'int8': both int8"
            )
        else:
            print(f"no images under {calibration}: no int8 export (pass --calibration-images)")
        print(f"{'image':<28s}{'backend':<15s}{'networks ms':>12s}{'whole ms':>10s}{'x torch':>9s}")
        ratios: dict[str, list[float]] = {name: [] for name in pipes if name != "torch"}
        for f in files:
            img = decode_image(f, at_least=torch_pipe.working_size)[0]
            times: dict[str, tuple[float, float]] = {}
            preds = {}
            for _ in range(reps + 1):  # interleaved, so that a busy spell of the machine hits every backend
                for name, pipe in pipes.items():
                    t0 = time.perf_counter()
                    pred = pipe.run(img)
                    elapsed = time.perf_counter() - t0
                    if name in preds:  # the first round is the warm-up
                        n, w = times.get(name, ([], []))
                        times[name] = (n + [pred.timings_s["classifier"] + pred.timings_s["detector"]], w + [elapsed])
                    preds[name] = pred
            med = {name: (statistics.median(n), statistics.median(w)) for name, (n, w) in times.items()}
            for name, (n, w) in med.items():
                r = ""
                if name != "torch":
                    ratios[name].append(w / med["torch"][1])
                    r = f"{ratios[name][-1]:9.2f}"
                print(f"{f.name[:27]:<28s}{name:<15s}{n * 1000:12.1f}{w * 1000:10.1f}{r}")
            a = preds["torch"]
            for name, b in preds.items():
                if name == "torch":
                    continue
                dp = abs(a.p_abnormal - b.p_abnormal)
                db, iou, unmatched = box_differences(a.findings, b.findings)
                print(
                    f"{'':28s}{name}: P(abnormal) differs from torch by {dp:.1e}, boxes by {db:.2f} px (IoU >= "
                    f"{iou:.2f}), findings {len(a.findings)}/{len(b.findings)}"
                    + (f" ({unmatched} of torch's unmatched)" if unmatched else "")
                )
        print()
        for name, rs in ratios.items():
            print(f"whole pipeline, {name} / torch: median ratio {statistics.median(rs):.2f} over {len(files)} images")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--classifier", type=Path)
    ap.add_argument("--detector", type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--samples", type=Path, default=SHARED / "samples")
    ap.add_argument("--backend", choices=("torch", "onnxruntime", "both"), default="torch")
    ap.add_argument(
        "--calibration-images",
        type=Path,
        default=SHARED / "datasets" / "nih-matched",
        help="--backend both: real radiographs for the int8 export (64 spread over the folder; of nih-matched, its "
        "training split)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    clf_path, det_path, fusion, device = _default_models()
    clf_path, det_path = args.classifier or clf_path, args.detector or det_path
    device = args.device or device
    tmp = None
    if clf_path.exists() and det_path.exists():
        print(f"models: {clf_path} and {det_path}")
    else:
        from support.models import make_tiny_models

        tmp = tempfile.TemporaryDirectory(prefix="bench-models-")
        clf_path, det_path = make_tiny_models(tmp.name, p_abnormal=0.9, detector_logit=1.0)
        print(
            f"models: {REPO / 'models'} has no classifier.pt/detector.pt -> TINY RANDOM models "
            "(mobilenetv2_050 @64, yolov8n @128): plumbing timings only, not real networks"
        )
    if args.backend == "both":
        compare_backends(
            clf_path, det_path, fusion, sorted(args.samples.glob("*.dcm")), args.reps, args.calibration_images
        )
        return 0
    pipe = Pipeline.from_files(clf_path, det_path, fusion, device=device, backend=args.backend)
    for m, kind in zip(pipe.models, ("classifier", "detector")):
        size = (pipe.classifier if kind == "classifier" else pipe.detector).preprocess.input_size
        print(f"  {kind}: {m.architecture} v{m.version} input {size} sha256 {m.sha256[:12]}")
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, fusion {fusion.mode}, "
        f"median of {args.reps} runs after 1 warm-up\n"
    )

    files = sorted(args.samples.glob("*.dcm"))
    if not files:
        print(f"no *.dcm under {args.samples}", file=sys.stderr)
        return 1
    for f in files:
        med = bench_file(pipe, f, args.reps)
        from pydicom import dcmread

        hdr = dcmread(f, stop_before_pixels=True, force=True)
        shape = decode_image(f, at_least=pipe.working_size)[0].shape
        print(f"{f.name}  ({hdr.Rows} x {hdr.Columns}, decoded at {shape[0]} x {shape[1]})")
        for k, v in med.items():
            print(f"  {k:32s} {v * 1000:9.1f} ms")
        nets = med["classifier forward"] + med["detector forward"]
        print(
            f"  {'overhead ratio':32s} {med['whole (decode + Pipeline.run)'] / nets:9.2f}  "
            "(whole / (classifier forward + detector forward))\n"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
