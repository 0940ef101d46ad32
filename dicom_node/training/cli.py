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
    ):
        cp = sub.add_parser(name, description=TRAINING_COMMANDS[name])
        add(cp)
        cp.set_defaults(func=_run(run))
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
