"""``dicom-node tune-detector`` and ``calibrate`` (what a trained model reports, and from what confidence or
probability, chosen on validation or a site's own data) and ``audit`` (whether nuisance alone tells a training
set's classes apart): their options, read once from the parsed command line into a frozen
:class:`~dicom_node.cli.data_options.DataCommandOptions` holding the command's settings (``TuningSettings``,
``CalibrationSettings``, ``AuditSettings``), and the call into :mod:`inference.training.commands` that does the
work."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.data_options import (
    DataCommandOptions,
    add_backend_argument,
    add_data_arguments,
    from_namespace,
    read_radiograph,
)
from inference.training.commands import (
    DEFAULT_DATA,
    AuditSettings,
    CalibrationSettings,
    TuningSettings,
    audit_on,
    calibrate_on,
    tune_detector_on,
)

# ----------------------------------------------------------------------------- tune-detector


def add_tune_detector_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--detector", required=True, help="detector model file to tune")
    p.add_argument("--out", required=True, help="model file to write (may be the same as --detector)")
    p.add_argument("--subset", choices=("val", "train"), default="val", help="split to tune on (never test)")
    p.add_argument("--min-ap", type=float, default=0.1, help="validation AP@0.4 a class needs to be reported")
    p.add_argument("--device", default="cpu")


def run_tune_detector(args: argparse.Namespace) -> int:
    o = DataCommandOptions.from_args(args, from_namespace(TuningSettings, args))
    tune_detector_on(o.exported_data(), o.settings)
    return 0


# ----------------------------------------------------------------------------- calibrate


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
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


def run_calibrate(args: argparse.Namespace) -> int:
    o = DataCommandOptions.from_args(args, from_namespace(CalibrationSettings, args))
    calibrate_on(o.exported_data(), o.settings, load_image=read_radiograph)
    return 0


# ----------------------------------------------------------------------------- audit


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, export_raw_default=True)
    p.add_argument("--subset", choices=("train", "val", "test"), default="train", help="split to audit")
    p.add_argument("--classifier", help="audit with this model file's preprocessing (default: training defaults)")
    p.add_argument("--tool", default=f"{DEFAULT_DATA}/tools/confound_audit.py", help="the confound audit script")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap replicates for the CIs")


def run_audit(args: argparse.Namespace) -> int:
    o = DataCommandOptions.from_args(args, from_namespace(AuditSettings, args, tool=Path(args.tool)))
    audit_on(o.exported_data(), o.settings)
    return 0
