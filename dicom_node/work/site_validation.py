"""A site validation run, as ``dicom-node validate`` and the console's "Validate now" make it: the cases of the
configured model pair from storage, the statistics (:mod:`inference.site_validation`), the proposed site
calibration file, the validation recorded in the database, and the HTML report.

No torch: the model files' sha256 and metadata are read with :func:`inference.site_validation.model_file_facts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from inference.errors import ModelError
from inference.site_validation import (
    model_card_figures,
    model_file_facts,
    proposed_calibration,
    summary_lines,
    validate_cases,
    validation_parameter,
)
from storage import Store
from storage.db import Validation

__all__ = ["Outcome", "PairFacts", "configured_pair", "run_validation", "sr_parameter", "default_calibration_path"]


@dataclass
class Outcome:
    validation_id: int
    result: dict[str, Any]
    lines: list[str]
    report_path: Path | None
    calibration_path: Path | None
    card: dict[str, Any] | None


def configured_pair(config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configured classifier's and detector's :func:`model_file_facts` (ModelError when one is unreadable)."""
    m = config.inference.models
    return model_file_facts(m.classifier), model_file_facts(m.detector)


class PairFacts:
    """The configured model files' :func:`model_file_facts`, read once per file version (path, size, mtime): what
    the console's pages compare validations with, without torch."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], dict[str, Any]] = {}

    def of(self, path: Path) -> dict[str, Any]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = model_file_facts(path)
        return self._cache[key]

    def latest_validation(self, config: Config, store: Store) -> tuple[Validation | None, str]:
        """The configured pair's latest validation, or (None, why none can be looked up) when a file is unreadable."""
        m = config.inference.models
        try:
            clf, det = self.of(m.classifier), self.of(m.detector)
        except (OSError, ModelError) as exc:
            return None, str(exc)
        return store.latest_validation(clf["sha256"], det["sha256"]), ""


def default_calibration_path(config: Config) -> Path:
    return config.storage.root / "site-calibration.json"


def sr_parameter(validation: Validation | None) -> str:
    """The SR's Algorithm Parameter for a model pair's latest validation (or none)."""
    if validation is None:
        return validation_parameter(None, None)
    return validation_parameter(validation.created_at.date().isoformat(), validation.n)


def _in_force(config: Config) -> str:
    path = config.inference.models.calibration
    if not path:
        return ""
    import hashlib

    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        digest = "unreadable"
    return f"{path} ({digest})"


def _model_row(role: str, facts: dict[str, Any]) -> dict[str, Any]:
    meta = facts["metadata"]
    return {
        "role": role,
        "name": meta.get("name", role),
        "architecture": meta.get("architecture", ""),
        "version": meta.get("version", ""),
        "sha256": facts["sha256"],
    }


def run_validation(
    config: Config,
    store: Store,
    *,
    since: date | None = None,
    until: date | None = None,
    target_sensitivity: float = 0.9,
    report_dir: Path | None = None,
    calibration_path: Path | None = None,
    write_calibration: bool = True,
    by: str = "cli",
) -> Outcome:
    """Validate the configured model pair on the stored results with ground truth; record it, write the proposed
    calibration and the report. ModelError when there is nothing to validate (no case, one class)."""
    clf, det = configured_pair(config)
    cases = store.validation_cases(clf["sha256"], det["sha256"], since, until)
    span = (
        f"studies dated {since.isoformat() if since else 'any time'} to {until.isoformat() if until else 'today'}"
        if since or until
        else ""
    )
    result = validate_cases(cases, target_sensitivity, clf["sha256"], f"site validation, {len(cases)} studies")
    first, last = min(c.study_date for c in cases), max(c.study_date for c in cases)
    period = span or f"studies dated {first.isoformat()} to {last.isoformat()}"
    card = model_card_figures(clf["metadata"])
    cal_path = None
    cal = proposed_calibration(result)
    if cal is not None and write_calibration:
        cal_path = Path(calibration_path or default_calibration_path(config))
        cal.save(cal_path)
    o = result["overall"]
    retro = sum(1 for c in cases if c.retrospective)
    details = {
        **{k: result[k] for k in ("per_view", "per_device", "per_month", "per_phase", "reference")},
        "overall": o,
        "calibration": result["calibration"],
        "calibration_problem": result["calibration_problem"],
        "calibration_path": str(cal_path) if cal_path else "",
        "target_sensitivity": target_sensitivity,
        "model_card": card,
        "models": [_model_row("classifier", clf), _model_row("detector", det)],
        "period": period,
        "study_dates": [first.isoformat(), last.isoformat()],
        "retrospective": retro,
        "live": len(cases) - retro,
    }
    validation_id = store.record_validation(
        classifier_sha256=clf["sha256"],
        detector_sha256=det["sha256"],
        calibration=_in_force(config),
        period_start=min(c.received_at for c in cases),
        period_end=max(c.received_at for c in cases),
        n=result["n"],
        positives=result["positives"],
        auc=o["roc_auc"],
        auc_low=(o["roc_auc_ci95"] or [None, None])[0],
        auc_high=(o["roc_auc_ci95"] or [None, None])[1],
        sensitivity=o["sensitivity"],
        sensitivity_low=o["sensitivity_ci95"][0],
        sensitivity_high=o["sensitivity_ci95"][1],
        specificity=o["specificity"],
        specificity_low=o["specificity_ci95"][0],
        specificity_high=o["specificity_ci95"][1],
        by=by[:200],
        details=json.dumps(details),
    )
    from inference.validation_report import render_report  # matplotlib, only now

    report_path = Path(report_dir or config.storage.root / "reports") / f"validation-{validation_id}.html"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(
        render_report(
            result,
            validation_id=validation_id,
            created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            models=details["models"],
            card=card,
            period=period,
            calibration_path=str(cal_path or ""),
            in_force=_in_force(config),
        ),
        encoding="utf-8",
    )
    store.set_validation_report(validation_id, str(report_path))
    return Outcome(validation_id, result, summary_lines(result, card), report_path, cal_path, card)
