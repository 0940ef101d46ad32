"""The parser and dispatch of the training commands (``train classifier|detector``, ``evaluate``,
``tune-detector``, ``calibrate``, ``audit``, ``import-model``, ``export-onnx``).

:func:`dicom_node.cli.main` hands these commands over before it builds the node's parser, so neither the node
(``serve``, ``worker``) nor ``status`` ever imports this module or the training code it loads. Each command is
an ``add_*_arguments(parser)`` + ``run_*(args) -> exit code`` pair of :mod:`~dicom_node.cli.training`,
:mod:`~dicom_node.cli.tuning`, :mod:`~dicom_node.cli.models` or :mod:`~dicom_node.cli.onnx_export`.
"""

from __future__ import annotations

import argparse

from dicom_node.cli import models, onnx_export, training, tuning
from dicom_node.cli.command_table import TRAINING_COMMANDS
from dicom_node.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="Training and evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", description=TRAINING_COMMANDS["train"])
    train_sub = train.add_subparsers(dest="model_kind", required=True)
    for kind, add, run in (
        ("classifier", training.add_train_classifier_arguments, training.run_train_classifier),
        ("detector", training.add_train_detector_arguments, training.run_train_detector),
    ):
        tp = train_sub.add_parser(kind, help=f"train the {kind}")
        add(tp)
        tp.set_defaults(func=run)
    for name, add, run in (
        ("evaluate", training.add_evaluate_arguments, training.run_evaluate),
        ("tune-detector", tuning.add_tune_detector_arguments, tuning.run_tune_detector),
        ("audit", tuning.add_audit_arguments, tuning.run_audit),
        ("calibrate", tuning.add_calibrate_arguments, tuning.run_calibrate),
        ("import-model", models.add_import_arguments, models.run_import_model),
        ("export-onnx", onnx_export.add_export_arguments, onnx_export.run_export_onnx),
    ):
        cp = sub.add_parser(name, description=TRAINING_COMMANDS[name])
        add(cp)
        cp.set_defaults(func=run)
    return p


def main(argv: list[str]) -> int:
    """Run one training command; its failures propagate to :func:`dicom_node.cli.main` (exit codes)."""
    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    return int(args.func(args))
