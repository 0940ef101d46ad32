"""``dicom-node train classifier|detector`` and ``dicom-node evaluate``: their options, read once from the parsed
command line into a :class:`~dicom_node.cli.data_options.DataCommandOptions` of :class:`Training`,
:class:`DetectorTraining` or ``EvaluationSettings``, and the call into
:mod:`inference.training.commands` that does the work (given the DICOM side's image reader)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from dicom_node.cli.data_options import (
    DataCommandOptions,
    add_backend_argument,
    add_data_arguments,
    data_selection,
    from_namespace,
    read_radiograph,
)
from inference.training.commands import (
    EvaluationSettings,
    TrainingRun,
    evaluate_on,
    train_classifier_on,
    train_detector_on,
)

if TYPE_CHECKING:  # their modules import torch: loaded when a command runs, not for --help
    from inference.training.train_classifier import ClassifierTrainConfig
    from inference.training.train_detector import DetectorTrainConfig  # noqa: F401 - quoted in a base class


def _add_run_arguments(p: argparse.ArgumentParser, epochs: int, batch: int) -> None:
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


Config = TypeVar("Config")


@dataclass(frozen=True)
class Training(Generic[Config]):
    """A train command's own settings: the run and the trainer's configuration."""

    run: TrainingRun
    config: Config


def _training_run(args: argparse.Namespace, kind: str) -> TrainingRun:
    return from_namespace(TrainingRun, args, out=Path(args.out or f"runs/{kind}"))


# ----------------------------------------------------------------------------- classifier


def add_train_classifier_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, export_raw_default=True)  # intensity normalisation comes before CLAHE
    _add_run_arguments(p, epochs=20, batch=32)
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


def _classifier_training(args: argparse.Namespace) -> Training[ClassifierTrainConfig]:
    from inference.training.train_classifier import ClassifierTrainConfig

    config = from_namespace(ClassifierTrainConfig, args, rotation_deg=args.rotation)
    return Training(_training_run(args, "classifier"), config)


def run_train_classifier(args: argparse.Namespace) -> int:
    o = DataCommandOptions(*data_selection(args), _classifier_training(args))  # usage errors before torch loads
    train_classifier_on(o.exported_data(), o.settings.run, o.settings.config)
    return 0


# ----------------------------------------------------------------------------- detector


def add_train_detector_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    _add_run_arguments(p, epochs=100, batch=16)
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


@dataclass(frozen=True)
class DetectorTraining(Training["DetectorTrainConfig"]):
    """``train detector``'s own settings: those of every train command, and which images train how."""

    normals: bool = True  # normal images train as backgrounds
    export_workers: int = 1  # processes that export the training images for ultralytics


def _detector_training(args: argparse.Namespace) -> DetectorTraining:
    from inference.training.train_detector import DetectorTrainConfig

    config = from_namespace(DetectorTrainConfig, args)
    return DetectorTraining(_training_run(args, "detector"), config, args.normals, args.export_workers)


def run_train_detector(args: argparse.Namespace) -> int:
    o = DataCommandOptions(*data_selection(args), _detector_training(args))  # usage errors before torch loads
    t = o.settings
    model_path = train_detector_on(
        o.exported_data(), t.run, t.config, normals=t.normals, export_workers=t.export_workers
    )
    print(f"detector written to {model_path}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
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


def run_evaluate(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    settings = from_namespace(EvaluationSettings, args, out=Path(args.out or "runs/evaluate"), modes=modes)
    o = DataCommandOptions.from_args(args, settings)
    evaluate_on(o.exported_data(), o.settings, load_image=read_radiograph)
    return 0
