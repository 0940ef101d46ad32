"""The training and evaluation commands, for ``dicom-node train classifier|detector`` and
``dicom-node evaluate``. One ``add_*_arguments(parser)`` + ``run_*(args) -> exit code`` pair each;
this module builds no parser itself (the CLI owns argparse)::

    p = sub.add_parser("classifier"); commands.add_train_classifier_arguments(p)
    args = parser.parse_args(); commands.run_train_classifier(args)

Data selection (all three commands): ``--layout nih --data ../shared/datasets`` or
``--layout vinbigdata --csv train.csv --images DIR --annotations R9|wbf``. The split is by
patient, seeded (``--seed``, ``--split 0.7,0.15,0.15``): training uses train/val, ``evaluate`` the
held-out test split of the same seed. A VinBigData DICOM folder must be exported to PNG first by
the DICOM side (``dicom_node.training.vinbigdata_export.prepare_args(args)`` does it and rewrites
``args.csv`` / ``args.images``; it reads ``--export-dir``, ``--export-max-size``, ``--export-raw``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from inference.errors import DatasetError
from inference.training.data.sample import Sample, describe
from inference.training.data.split import split_by_patient, subsample

log = logging.getLogger(__name__)
DEFAULT_DATA = "../shared/datasets"


# ----------------------------------------------------------------------------- data


def add_data_arguments(p, *, export_raw_default: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--layout", choices=("nih", "nih-matched", "vinbigdata", "folder"), default="nih")
    g.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="nih: folder holding nih-bbox/ and nih-normal/; nih-matched: folder holding nih-matched/",
    )
    g.add_argument("--csv", help="vinbigdata: train.csv; folder: labels.csv with image,label[,view,batch]")
    g.add_argument(
        "--images", help="vinbigdata: folder of <image_id>.png|.jpg (or .dicom/.dcm to export); folder: the images"
    )
    g.add_argument("--annotations", default="R9", help="vinbigdata: a reader id (R9) or 'wbf' (all readers fused)")
    g.add_argument("--min-votes", type=int, default=1, help="vinbigdata wbf: readers that must agree on a box")
    g.add_argument("--seed", type=int, default=0, help="split and training seed")
    g.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (by patient)")
    g.add_argument("--export-dir", help="vinbigdata DICOM export folder (default: next to --csv)")
    g.add_argument("--export-max-size", type=int, default=1024, help="vinbigdata export: longer side limit")
    g.add_argument(
        "--export-raw",
        action="store_true",
        default=export_raw_default,
        help="vinbigdata export without CLAHE (training applies it; needed for evaluate)",
    )


def load_samples(args) -> tuple[list[Sample], str]:
    """(samples, description of the source) for ``--layout``."""
    if args.layout == "nih":
        from inference.training.data.nih import DESCRIPTION, read_nih

        return read_nih(args.data), DESCRIPTION
    if args.layout == "nih-matched":
        from inference.training.data.nih import MATCHED_DESCRIPTION, read_nih_matched

        return read_nih_matched(args.data), MATCHED_DESCRIPTION
    if not args.csv or not args.images:
        raise DatasetError(f"--layout {args.layout} needs --csv and --images")
    if args.layout == "folder":
        from inference.training.data.folder import read_folder

        return read_folder(args.csv, args.images), f"local labelled set {args.csv}"
    from inference.training.data.vinbigdata import describe_source, read_vinbigdata

    return (
        read_vinbigdata(args.csv, args.images, args.annotations, min_votes=args.min_votes),
        describe_source(args.csv, args.annotations),
    )


def make_splits(args) -> tuple[dict[str, list[Sample]], str]:
    samples, source = load_samples(args)
    try:
        fractions = tuple(float(x) for x in str(args.split).split(","))
    except ValueError as exc:
        raise DatasetError(f"--split must be three comma-separated fractions, got {args.split!r}") from exc
    if samples and all(s.split for s in samples):  # the data set's own patient-level split
        parts = {k: [s for s in samples if s.split == k] for k in ("train", "val", "test")}
        how = "the data set's own patient-level split"
    else:
        parts = split_by_patient(samples, fractions, seed=args.seed)
        how = f"patient-level split seed {args.seed} fractions {args.split}"
    desc = f"{source}; {how}: " + "; ".join(
        f"{k} {describe(v)['images']} images / {describe(v)['patients']} patients" for k, v in parts.items()
    )
    return parts, desc


def _write_splits(out: Path, parts: dict[str, list[Sample]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps({k: [s.image_id for s in v] for k, v in parts.items()}))


def _common_training(p, epochs: int, batch: int) -> None:
    p.add_argument("--out", help="run folder (checkpoints, logs); default runs/<command>")
    p.add_argument("--model-out", help="model file to write (default: <out>/<kind>.pt)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--limit-train", type=int, help="at most this many training images (quick runs)")
    p.add_argument("--limit-val", type=int, help="at most this many validation images")
    p.add_argument("--version", default="0.1.0", help="model version stored in the model file")
    p.add_argument("--clahe-clip-limit", type=float, default=2.0)
    p.add_argument("--clahe-tile-grid", type=int, default=8)


# ----------------------------------------------------------------------------- classifier


def add_train_classifier_arguments(p) -> None:
    add_data_arguments(p, export_raw_default=True)  # intensity normalisation comes before CLAHE
    _common_training(p, epochs=20, batch=32)
    p.add_argument("--arch", default="efficientnet_b0", help="timm architecture (e.g. resnet10t, davit_tiny)")
    p.add_argument("--input-size", type=int, default=384)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--pos-weight", type=float, help="BCE weight of the abnormal class")
    p.add_argument("--rotation", type=float, default=10.0, help="rotation augmentation, +- degrees")
    p.add_argument(
        "--threshold-method",
        choices=("youden", "sensitivity", "sensitivity_per_view"),
        default="youden",
        help="operating point on validation: Youden's J, a target sensitivity overall, or reached in every view",
    )
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.add_argument(
        "--augment",
        choices=("site", "geometry", "none"),
        default="site",
        help="site: site/archive differences + geometry (inference.training.augment); geometry: rotation, scale, "
        "shift only",
    )
    p.add_argument(
        "--intensity",
        choices=("rank", "none"),
        default="rank",
        help="input intensity normalisation before CLAHE (rank = histogram equalisation)",
    )
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier head")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="3: grey repeated (ImageNet networks)")
    p.add_argument(
        "--normalize", choices=("node", "imagenet"), default="node", help="input normalisation (imagenet: per channel)"
    )
    p.add_argument(
        "--init-weights",
        help="start from these weights: an ImageNet state_dict or .safetensors of --arch, or a previous model file",
    )
    p.add_argument(
        "--no-balance-views",
        dest="balance_views",
        action="store_false",
        help="sample images uniformly (default: every view x label cell equally)",
    )
    p.add_argument(
        "--select",
        choices=("worst_view", "auc"),
        default="worst_view",
        help="best epoch by the worst view's validation AUC (default) or the overall AUC",
    )


def run_train_classifier(args) -> int:
    from inference.training.train_classifier import ClassifierTrainConfig, train_classifier

    parts, desc = make_splits(args)
    train = subsample(parts["train"], args.limit_train, args.seed)
    val = subsample(parts["val"], args.limit_val, args.seed)
    out = Path(args.out or "runs/classifier")
    _write_splits(out, {"train": train, "val": val, "test": parts["test"]})
    cfg = ClassifierTrainConfig(
        arch=args.arch,
        input_size=args.input_size,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        pos_weight=args.pos_weight,
        rotation_deg=args.rotation,
        augment=args.augment,
        intensity=args.intensity,
        drop_rate=args.drop_rate,
        balance_views=args.balance_views,
        select=args.select,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        workers=args.workers,
        threshold_method=args.threshold_method,
        target_sensitivity=args.target_sensitivity,
        version=args.version,
        clahe_clip_limit=args.clahe_clip_limit,
        clahe_tile_grid=args.clahe_tile_grid,
        channels=args.channels,
        normalize=args.normalize,
        init_weights=args.init_weights,
    )
    train_classifier(train, val, out, cfg, resume=args.resume, model_path=args.model_out, training_data=desc)
    return 0


# ----------------------------------------------------------------------------- detector


def add_train_detector_arguments(p) -> None:
    add_data_arguments(p)
    _common_training(p, epochs=100, batch=16)
    p.add_argument("--model", default="yolov8n", help="ultralytics architecture: yolov8n|s|m|l|x")
    p.add_argument(
        "--init-weights", help="start from an ultralytics checkpoint (e.g. yolov8x.pt) or a dicom-node detector file"
    )
    p.add_argument("--imgsz", type=int, default=512)
    p.add_argument("--lr0", type=float, default=3e-4)
    p.add_argument("--optimizer", default="Adam")
    p.add_argument("--degrees", type=float, default=10.0, help="rotation augmentation, +- degrees")
    p.add_argument("--hsv-v", type=float, default=0.4, help="brightness augmentation")
    p.add_argument("--fliplr", type=float, default=0.5)
    p.add_argument("--mosaic", type=float, default=1.0)
    p.add_argument("--close-mosaic", type=int, default=10)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--cache", action="store_true", help="cache training images in RAM")
    p.add_argument(
        "--intensity",
        choices=("rank", "none"),
        default="rank",
        help="input intensity normalisation before CLAHE (rank = histogram equalisation, as the classifier)",
    )
    p.add_argument(
        "--time-hours", type=float, default=0.0, help="train for this long (ultralytics fits the epochs to it)"
    )
    p.add_argument("--export-workers", type=int, default=1, help="processes that export the training images")
    p.add_argument(
        "--no-normals",
        dest="normals",
        action="store_false",
        help="leave normal images out (default: they train as backgrounds)",
    )


def run_train_detector(args) -> int:
    from inference.preprocess import PreprocessParams
    from inference.training.train_detector import DetectorTrainConfig, convert_checkpoint, train_detector
    from inference.training.yolo_dataset import export_yolo_dataset

    parts, desc = make_splits(args)
    train = subsample(parts["train"], args.limit_train, args.seed)
    val = subsample(parts["val"], args.limit_val, args.seed)
    out = Path(args.out or "runs/detector")
    _write_splits(out, {"train": train, "val": val, "test": parts["test"]})
    cfg = DetectorTrainConfig(
        model=args.model,
        init_weights=args.init_weights,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        lr0=args.lr0,
        optimizer=args.optimizer,
        degrees=args.degrees,
        hsv_v=args.hsv_v,
        fliplr=args.fliplr,
        mosaic=args.mosaic,
        close_mosaic=args.close_mosaic,
        patience=args.patience,
        cache=args.cache,
        amp=args.amp,
        version=args.version,
        clahe_clip_limit=args.clahe_clip_limit,
        clahe_tile_grid=args.clahe_tile_grid,
        intensity=args.intensity,
        time_hours=args.time_hours,
    )
    params = PreprocessParams.for_detector(
        args.imgsz,
        clahe_clip_limit=args.clahe_clip_limit,
        clahe_tile_grid=args.clahe_tile_grid,
        intensity=args.intensity,
    )
    data_yaml = export_yolo_dataset(
        {"train": train, "val": val},
        out / "yolo",
        params,
        max_size=args.imgsz,
        include_normals=args.normals,
        workers=args.export_workers,
    )
    best = train_detector(data_yaml, out, cfg, resume=args.resume)
    model_path = Path(args.model_out) if args.model_out else out / "detector.pt"
    convert_checkpoint(
        best, model_path, cfg, training_data=desc, extra={"train_set": describe(train), "val_set": describe(val)}
    )
    print(f"detector written to {model_path}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def image_loader(args):
    """How to read an image file, ``path -> (image01, view from its header or None)``: the DICOM side's reader
    when the CLI set one (``args.load_image``), else PNG/JPEG only. Unreadable files raise DatasetError."""
    from inference.training.data.images import load_image01

    return getattr(args, "load_image", None) or (lambda path: (load_image01(path), None))


def add_backend_argument(p) -> None:
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="as inference.models.backend; onnxruntime: each model's ONNX export beside it (dicom-node export-onnx, "
        "e.g. an int8 one: measure it with the backend the node will run)",
    )


def add_evaluate_arguments(p) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--classifier", required=True, help="classifier model file")
    p.add_argument("--calibration", help="site calibration file (dicom-node calibrate) to evaluate with")
    p.add_argument("--detector", required=True, help="detector model file")
    p.add_argument("--modes", default="gate,soft", help="fusion modes to evaluate")
    p.add_argument("--subset", choices=("test", "val", "train"), default="test", help="which split")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--device", default="cpu")
    add_backend_argument(p)
    p.add_argument(
        "--abnormal-threshold",
        type=float,
        help="gate threshold on the calibrated P(abnormal) (default 0.5 = the classifier file's "
        "validation-chosen operating point)",
    )
    p.add_argument("--min-score", type=float, default=0.0, help="fused-score floor (low: AP needs the tail)")
    p.add_argument("--detector-conf", type=float, default=0.01)
    p.add_argument("--max-findings", type=int, default=100)
    p.add_argument("--out", help="report folder (default runs/evaluate)")


def run_evaluate(args) -> int:
    from inference.classifier import Classifier
    from inference.detector import Detector
    from inference.fusion import FusionParams
    from inference.pipeline import Pipeline
    from inference.training.evaluate import evaluate, summary_lines

    parts, desc = make_splits(args)
    samples = subsample(parts[args.subset], args.limit, args.seed)
    # The classifier reports P(abnormal) calibrated to its stored operating point (that point maps to 0.5).
    thr = 0.5 if args.abnormal_threshold is None else args.abnormal_threshold
    clf = Classifier.load(args.classifier, args.device, args.backend)
    if args.calibration:
        from inference.calibration import Calibration

        clf.use_calibration(Calibration.load(args.calibration), args.calibration)
    det = Detector.load(args.detector, args.device, backend=args.backend)
    models = ", ".join(f"{m.architecture} {m.version}" for m in (clf.info, det.info))
    print(f"models: {models} ({args.backend})")
    predictors = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        fp = FusionParams(
            mode=mode,
            abnormal_threshold=thr,
            min_score=args.min_score,
            detector_conf=args.detector_conf,
            max_findings=args.max_findings,
        )
        predictors[mode] = Pipeline(clf, det, fp).run
    report = evaluate(
        predictors,
        samples,
        Path(args.out or "runs/evaluate"),
        classifier_threshold=thr,
        description=f"{args.subset} split of {desc}",
        load=image_loader(args),
    )
    for line in summary_lines(report):
        print(line)
    return 0


# ----------------------------------------------------------------------------- tune-detector


def add_tune_detector_arguments(p) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--detector", required=True, help="detector model file to tune")
    p.add_argument("--out", required=True, help="model file to write (may be the same as --detector)")
    p.add_argument("--subset", choices=("val", "train"), default="val", help="split to tune on (never test)")
    p.add_argument("--min-ap", type=float, default=0.1, help="validation AP@0.4 a class needs to be reported")
    p.add_argument("--device", default="cpu")


def run_tune_detector(args) -> int:
    from inference.detector import Detector
    from inference.training.tune_detector import tune, write_tuned

    parts, desc = make_splits(args)
    det = Detector.load(args.detector, args.device)
    result = tune(det, parts[args.subset], min_ap=args.min_ap)
    for name, v in result["per_class"].items():
        if v["val_boxes"] or v["trained"]:
            print(
                f"{name:20s} AP@0.4 {v['val_ap@0.4']:.3f} ({v['val_boxes']} boxes)  floor {v['floor']:.3f}  "
                f"{'reported' if v['reportable'] else 'NOT reported'}"
            )
    path = write_tuned(args.detector, args.out, result, f"{args.subset} split of {desc}")
    print(f"{path}: reports {', '.join(result['reportable_classes']) or 'NO CLASS AT ALL (no class is supported)'}")
    return 0


# ----------------------------------------------------------------------------- calibrate


def add_calibrate_arguments(p) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--classifier", required=True, help="classifier model file (left unchanged)")
    p.add_argument("--detector", required=True, help="the detector the node runs with it (sets the working image size)")
    p.add_argument("--out", required=True, help="calibration file to write (JSON); name it in config.yaml")
    p.add_argument("--target-sensitivity", type=float, default=0.9, help="sensitivity to reach in every view")
    p.add_argument(
        "--subset", choices=("test", "val", "train"), default="test", help="split (a --layout folder set is all test)"
    )
    p.add_argument("--device", default="cpu")
    add_backend_argument(p)


def run_calibrate(args) -> int:
    from inference.pipeline import Pipeline
    from inference.quality import input_problem
    from inference.training.calibrate import choose_calibration

    parts, desc = make_splits(args)
    samples = parts[args.subset]
    # the node's own input path (input check, working size, CLAHE); the detector only sets the working size
    pipe = Pipeline.from_files(args.classifier, args.detector, device=args.device, backend=args.backend)
    load = image_loader(args)
    labels, probs, views, refused = [], [], [], 0
    clf = pipe.classifier
    for s in samples:
        try:
            img, header_view = load(s.path)
        except DatasetError as exc:
            log.warning("left out: %s", exc)
            refused += 1
            continue
        if input_problem(img):
            refused += 1
            continue
        labels.append(s.label)
        probs.append(float(clf.predict_raw(pipe.classifier_input(img)[None])[0]))
        views.append(s.view or header_view)
    cal = choose_calibration(
        labels, probs, views, args.target_sensitivity, clf.info.sha256, f"{args.subset} split of {desc}"
    )
    cal.save(args.out)
    print(f"{len(labels)} images used" + (f", {refused} not analysable and left out" if refused else ""))
    for name, m in cal.metrics.items():
        thr = (
            f"threshold {m['threshold']:.4f}{'' if m.get('own_threshold', True) else ' (overall)'}  "
            if "threshold" in m and name != "overall"
            else ""
        )
        print(
            f"{name:8s} {thr}n {m['n']}: sensitivity {m['sensitivity']:.3f} "
            f"[{m['sensitivity_ci95'][0]:.3f}-{m['sensitivity_ci95'][1]:.3f}], specificity {m['specificity']:.3f} "
            f"[{m['specificity_ci95'][0]:.3f}-{m['specificity_ci95'][1]:.3f}]"
        )
    print(f"calibration written to {args.out}; set inference.models.calibration to it in config.yaml")
    return 0


# ----------------------------------------------------------------------------- audit


def add_audit_arguments(p) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--subset", choices=("train", "val", "test"), default="train", help="split to audit")
    p.add_argument("--classifier", help="audit with this model file's preprocessing (default: training defaults)")
    p.add_argument("--tool", default=f"{DEFAULT_DATA}/tools/confound_audit.py", help="the confound audit script")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap replicates for the CIs")


def run_audit(args) -> int:
    from inference.modelfile import read_metadata
    from inference.preprocess import PreprocessParams
    from inference.training.audit import run_audit as audit

    parts, desc = make_splits(args)
    if args.classifier:
        params = read_metadata(args.classifier).preprocess
    else:
        params = PreprocessParams.for_classifier(256, intensity="rank")
    print(
        f"{args.subset} split of {desc}\npreprocessing: intensity {params.intensity}, CLAHE {params.clahe_clip_limit}"
    )
    print(audit(parts[args.subset], params, Path(args.tool), args.boot))
    return 0
