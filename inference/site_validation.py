"""Site validation statistics (``dicom-node validate`` and the console's Validation page): how the model pair did on
a site's own studies with ground truth, and the operating point per view that reaches a target sensitivity there.

No DICOM and no training code: cases come in as plain fields (:class:`Case`, e.g. ``storage.validation``'s
ValidationCase), the metrics are :mod:`inference.statistics`' (the ones ``evaluate`` prints, so the same films
give the same line), the operating point :func:`inference.calibration.choose_calibration` (``calibrate``'s).

The result (:func:`validate_cases`) is a JSON-safe dict:

- ``overall``: :func:`~inference.statistics.binary_metrics` of the study score (the highest calibrated
  P(abnormal) of the study's analysable images) at the node's operating point 0.5: AUC with its 95 % DeLong
  interval, sensitivity and specificity with 95 % Wilson intervals, the confusion matrix;
- ``per_view``, ``per_device``, ``per_month``, ``per_phase`` (retrospective / live): the same per group;
- ``calibration``: the proposed site calibration (:class:`~inference.calibration.Calibration` as a dict), chosen
  on the raw probabilities, or None with ``calibration_problem`` saying why;
- ``reference``: {device: [raw probability of each case], "*": [every case's]}: the distribution drift watching
  compares live traffic with;
- ``curve``: the points of the plots (label, score, raw probability per case).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inference.calibration import Calibration, choose_calibration
from inference.errors import InferenceError, ModelError
from inference.statistics import binary_metrics, classifier_line, format_ci, format_number

__all__ = [
    "Case",
    "NothingToValidate",
    "OPERATING_POINT",
    "SMALL_N",
    "model_file_facts",
    "model_card_figures",
    "validate_cases",
    "summary_lines",
    "validation_parameter",
]

OPERATING_POINT = 0.5  # the node's: P(abnormal) >= 0.5 is "abnormality suspected"
SMALL_N = 30  # groups with fewer studies (or fewer than 10 of a class) get a warning


class NothingToValidate(InferenceError):
    """No study with ground truth and a result of the model pair, or only one class among them."""


class Case(Protocol):
    """One study: its label (1 abnormal), score, raw probability, view, device, month, and how it came."""

    @property
    def label(self) -> int: ...
    @property
    def p_abnormal(self) -> float: ...
    @property
    def p_raw(self) -> float | None: ...
    @property
    def view(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def month(self) -> str: ...
    @property
    def retrospective(self) -> bool: ...


# ----------------------------------------------------------------------------- model files, without torch


class _MetadataOnly(pickle.Unpickler):
    """Reads the pickled part of a torch model file and builds nothing but plain containers: every other class
    (tensors, storages) becomes None, and no code of the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return dict
        return lambda *args, **kwargs: None

    def persistent_load(self, pid: Any) -> None:
        return None


def model_file_facts(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "sha256", "metadata"}`` of a model file, read without torch (the sha256 of the whole file, as
    :func:`inference.modelfile.sha256_of`; the metadata dict as stored). ModelError when it is unreadable."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ModelError(f"{path}: not a dicom-node model file (no data.pkl)")
            payload = _MetadataOnly(io.BytesIO(z.read(pkl))).load()
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: model file not found") from exc
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable model file ({type(exc).__name__})") from exc
    meta = payload.get("dicom_node_model") if isinstance(payload, dict) else None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: not a dicom-node model file (no metadata)")
    return {"path": str(path), "sha256": h.hexdigest(), "metadata": meta}


def model_card_figures(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What a classifier file says about its own held-out figures (its test split's when it has them, else its
    validation split's): ``{"split", "overall": {n, positives, roc_auc, sensitivity, specificity}, "per_view"}``;
    None when it says nothing."""
    metrics = metadata.get("metrics") or {}
    extra = metadata.get("extra") or {}
    for prefix, split in (("test_", "test split"), ("val_", "validation split")):
        if f"{prefix}roc_auc" not in metrics and f"{prefix}sensitivity" not in metrics:
            continue

        def pick(m: dict, pre: str = "") -> dict[str, Any]:
            return {k: m.get(pre + k) for k in ("n", "positives", "roc_auc", "sensitivity", "specificity")}

        per_view = {str(v): pick(m) for v, m in (extra.get(f"{prefix}per_view") or {}).items() if isinstance(m, dict)}
        return {
            "split": split,
            "training_data": metadata.get("training_data", ""),
            "overall": pick(metrics, prefix),
            "per_view": per_view,
        }
    return None


# ----------------------------------------------------------------------------- the statistics


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _groups(cases: Sequence[Case], key: Callable[[Case], str]) -> dict[str, dict]:
    out = {}
    for group in sorted({key(c) for c in cases}):
        members = [c for c in cases if key(c) == group]
        out[group] = binary_metrics([c.label for c in members], [c.p_abnormal for c in members], OPERATING_POINT)
    return out


def validate_cases(
    cases: Sequence[Case], target_sensitivity: float = 0.9, classifier_sha256: str = "", data: str = ""
) -> dict[str, Any]:
    """The site validation of ``cases`` (see the module docstring). NothingToValidate when there is no case, or only
    one class."""
    if not cases:
        raise NothingToValidate("no studies with ground truth and a result of these model files: nothing to validate")
    y = np.asarray([c.label for c in cases], dtype=int)
    if y.min() == y.max():
        only = "abnormal" if y[0] else "normal"
        raise NothingToValidate(
            f"all {len(cases)} studies with ground truth are {only}: a validation needs normal and abnormal studies"
        )
    scores = np.asarray([c.p_abnormal for c in cases], dtype=np.float64)
    result: dict[str, Any] = {
        "n": len(cases),
        "positives": int(y.sum()),
        "operating_point": OPERATING_POINT,
        "overall": binary_metrics(y, scores, OPERATING_POINT),
        "per_view": _groups(cases, lambda c: c.view or "unknown"),
        "per_device": _groups(cases, lambda c: c.device),
        "per_month": _groups(cases, lambda c: c.month),
        "per_phase": _groups(cases, lambda c: "retrospective" if c.retrospective else "live"),
    }
    raw = [c for c in cases if c.p_raw is not None]
    result["calibration"] = None
    result["calibration_problem"] = ""
    if len(raw) < len(cases):
        result["calibration_problem"] = (
            f"{len(cases) - len(raw)} studies have no raw probability (results made before it was kept); "
            "the operating point is chosen on the others"
        )
    try:
        cal = choose_calibration(
            [c.label for c in raw],
            [c.p_raw for c in raw],
            [c.view for c in raw],
            target_sensitivity,
            classifier_sha256,
            data,
        )
        result["calibration"] = asdict(cal)
    except ModelError as exc:
        result["calibration_problem"] = f"no operating point proposed: {exc}"
    reference: dict[str, list[float]] = {"*": []}
    for c in raw:
        reference.setdefault(c.device, []).append(float(c.p_raw))  # type: ignore[arg-type]
        reference["*"].append(float(c.p_raw))  # type: ignore[arg-type]
    result["reference"] = reference
    result["target_sensitivity"] = target_sensitivity
    result["curve"] = {
        "label": y.tolist(),
        "score": scores.tolist(),
        "raw": [c.p_raw for c in cases],
        "view": [c.view for c in cases],
    }
    return _clean(result)


def proposed_calibration(result: dict[str, Any]) -> Calibration | None:
    return Calibration(**result["calibration"]) if result.get("calibration") else None


def small_n_warnings(result: dict[str, Any]) -> list[str]:
    """Plain-language warnings about groups too small to say much."""
    out = []
    o = result["overall"]
    if o["n"] < SMALL_N or min(o["positives"], o["negatives"]) < 10:
        out.append(
            f"Only {o['n']} studies ({o['positives']} abnormal, {o['negatives']} normal): the intervals are wide; "
            "a few more or fewer correct answers would change the figures a lot. Aim for at least 100 of each."
        )
    for title, key in (("view", "per_view"), ("device", "per_device"), ("month", "per_month")):
        small = [g for g, m in result[key].items() if m["n"] < SMALL_N or min(m["positives"], m["negatives"]) < 10]
        if small and len(result[key]) > 1:
            out.append(
                f"Per {title}: {', '.join(small)} ha{'s' if len(small) == 1 else 've'} fewer than {SMALL_N} studies "
                "or fewer than 10 of a class; read those rows as indications only."
            )
    return out


def summary_lines(result: dict[str, Any], card: dict[str, Any] | None = None) -> list[str]:
    """What ``validate`` prints: the overall line in ``evaluate``'s form, per group, the model card's figures beside
    them, and the proposed operating point."""
    lines = [classifier_line(f"site validation (operating point {result['operating_point']})", result["overall"])]
    for title, key in (("view", "per_view"), ("device", "per_device"), ("month", "per_month"), ("", "per_phase")):
        for name, m in result[key].items():
            lines.append("  " + classifier_line(f"{title} {name}".strip(), m))
    if card:
        o = card["overall"]
        lines.append(
            f"model card ({card['split']}): n {o.get('n') or 'n/a'}, AUC {format_number(o.get('roc_auc'))}, "
            f"sensitivity {format_number(o.get('sensitivity'))}, specificity {format_number(o.get('specificity'))}"
        )
        for view, m in card["per_view"].items():
            lines.append(
                f"  model card view {view}: n {m.get('n') or 'n/a'}, AUC {format_number(m.get('roc_auc'))}, "
                f"sensitivity {format_number(m.get('sensitivity'))}, specificity {format_number(m.get('specificity'))}"
            )
    else:
        lines.append("model card: the classifier file states no held-out figures")
    cal = result.get("calibration")
    if cal:
        per_view = ", ".join(f"{v} {t:.4f}" for v, t in sorted(cal["per_view"].items()))
        lines.append(
            f"proposed operating point for sensitivity {cal['target_sensitivity']}: raw threshold {cal['default']:.4f}"
            + (f" (per view: {per_view})" if per_view else " (all views)")
        )
        m = cal["metrics"]["overall"]
        lines.append(
            f"  on these studies it gives sensitivity {format_number(m['sensitivity'])} "
            f"{format_ci(m['sensitivity_ci95'])}, specificity {format_number(m['specificity'])} "
            f"{format_ci(m['specificity_ci95'])}"
        )
    if result.get("calibration_problem"):
        lines.append(result["calibration_problem"])
    return lines


def validation_parameter(created_on: str | None, n: int | None) -> str:
    """The SR's Algorithm Parameter: ``site-validated 2026-12-01, n=412`` or ``no site validation``."""
    return f"site-validated {created_on}, n={n}" if created_on else "no site validation"
