"""Go-live commands: ``dicom-node ground-truth import FILE.csv`` and ``dicom-node validate``.

    ground-truth import   a site's labels (accession number or Study UID -> normal/abnormal, optional findings)
    validate              AUC, sensitivity and specificity with 95 % intervals of the configured model pair on the
                          stored results with ground truth, per view / device / month, beside the model card; the
                          proposed site calibration; the validation recorded; an HTML report

No training code and no torch here (the node's own commands; :mod:`dicom_node.cli.node` registers them).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from datetime import date
from pathlib import Path

from dicom_node.cli.exit_codes import UsageError
from dicom_node.config import load_config

__all__ = ["add_commands", "read_ground_truth"]

LABELS = {"normal": False, "0": False, "abnormal": True, "1": True}
MAX_SHOWN_ERRORS = 5

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def read_ground_truth(path: Path) -> list:
    """The rows of a ground-truth CSV as ``storage.validation.TruthRow``; UsageError naming the bad lines."""
    from inference.types import FINDING_CLASSES
    from storage.validation import TruthRow

    known = {f.lower(): f for f in FINDING_CLASSES}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from exc
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    key = next((c for c in ("accession_number", "study_uid") if c in columns), None)
    if key is None or "label" not in columns:
        raise UsageError(
            f"{path} line 1: the header needs accession_number or study_uid, and label (optional: findings, note); "
            f"found {', '.join(columns) or 'nothing'}"
        )
    rows, errors = [], []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        ident = row.get(key, "")
        label = row.get("label", "").lower()
        names = [f.strip() for f in row.get("findings", "").replace(",", ";").split(";") if f.strip()]
        bad = [f for f in names if f.lower() not in known]
        if not ident:
            errors.append(f"line {n}: no {key}")
        elif label not in LABELS:
            errors.append(f"line {n}: label {label!r} is not normal, abnormal, 0 or 1")
        elif bad:
            errors.append(f"line {n}: unknown finding {bad[0]!r} (known: {', '.join(FINDING_CLASSES)})")
        elif names and not LABELS[label]:
            errors.append(f"line {n}: a normal study with findings ({'; '.join(names)})")
        else:
            rows.append(
                TruthRow(
                    abnormal=LABELS[label],
                    study_uid=ident if key == "study_uid" else None,
                    accession_number=ident if key == "accession_number" else None,
                    findings=tuple(known[f.lower()] for f in names),
                    note=row.get("note", "")[:1000],
                )
            )
    if errors:
        more = f" (and {len(errors) - 1} more bad line(s))" if len(errors) > 1 else ""
        raise UsageError(f"{path} {errors[0]}{more}; nothing imported")
    if not rows:
        raise UsageError(f"{path}: no rows; nothing imported")
    return rows


def cmd_ground_truth_import(args: argparse.Namespace) -> int:
    from dicom_node.factories import open_store

    path = Path(args.file)
    rows = read_ground_truth(path)
    store = open_store(load_config(args.config))
    try:
        added, matched = store.import_ground_truth(rows, f"csv:{path.name}")
    finally:
        store.close()
    print(f"imported {added} ground-truth row(s) from {path.name}; {matched} of them match studies this node holds")
    if matched < added:
        print(
            f"  {added - matched} row(s) name studies not received (yet): they count once the studies arrive "
            "(a backfill pulls them)"
        )
    return 0


def _date(text: str) -> date:
    t = text.strip()
    try:
        return date.fromisoformat(t if "-" in t else f"{t[:4]}-{t[4:6]}-{t[6:]}")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _sensitivity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{v} must lie between 0 and 1 (e.g. 0.9)")
    return v


def cmd_validate(args: argparse.Namespace) -> int:
    from dicom_node.factories import open_store
    from dicom_node.work.site_validation import run_validation
    from inference.site_validation import NothingToValidate

    if args.since and args.until and args.since > args.until:
        raise UsageError(f"--since {args.since} is after --until {args.until}")
    cfg = load_config(args.config)
    store = open_store(cfg)
    try:
        outcome = run_validation(
            cfg,
            store,
            since=args.since,
            until=args.until,
            target_sensitivity=args.target_sensitivity,
            report_dir=Path(args.report) if args.report else None,
            calibration_path=Path(args.write_calibration) if args.write_calibration else None,
            by="cli",
        )
    except NothingToValidate as exc:
        raise UsageError(f"{exc} (import ground truth with dicom-node ground-truth import)") from exc
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "validation_id": outcome.validation_id,
                    "report": str(outcome.report_path or ""),
                    "calibration_file": str(outcome.calibration_path or ""),
                    "model_card": outcome.card,
                    **{k: v for k, v in outcome.result.items() if k != "curve"},
                },
                indent=2,
            )
        )
        return 0
    for line in outcome.lines:
        print(line)
    if outcome.calibration_path:
        print(
            f"site calibration written to {outcome.calibration_path}: to use it, set "
            f"inference.models.calibration: {outcome.calibration_path} in config.yaml and restart the node"
        )
    print(f"validation {outcome.validation_id} recorded; report: {outcome.report_path}")
    return 0


def add_commands(command: Command) -> None:
    """Register the commands with the main parser's ``command(name, func, help)``."""
    sp = command("ground-truth", cmd_ground_truth_import, "import a site's ground truth (CSV) for validation")
    sub = sp.add_subparsers(dest="ground_truth_command", required=True)
    imp = sub.add_parser(
        "import",
        help="CSV: accession_number or study_uid, label (normal/abnormal/0/1), optional findings ('A; B'), note",
    )
    imp.add_argument("file", help="the CSV file")
    imp.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file (default: ./config.yaml)")
    imp.set_defaults(func=cmd_ground_truth_import)

    sp = command("validate", cmd_validate, "validate the configured models on this site's studies with ground truth")
    sp.add_argument("--since", type=_date, default=None, help="first study date (YYYY-MM-DD)")
    sp.add_argument("--until", type=_date, default=None, help="last study date (YYYY-MM-DD)")
    sp.add_argument(
        "--target-sensitivity",
        type=_sensitivity,
        default=0.9,
        help="sensitivity the proposed operating point reaches on these studies (default 0.9)",
    )
    sp.add_argument("--report", default=None, help="folder of the HTML report (default: <storage.root>/reports)")
    sp.add_argument(
        "--write-calibration",
        default=None,
        metavar="PATH",
        help="where to write the proposed site calibration (default: <storage.root>/site-calibration.json)",
    )
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
