"""Drift of live traffic against a site validation: per device, how far the distribution of P(abnormal) and the
rate of flagged studies have moved since the validation period.

Plain numbers in, plain numbers out (no DICOM, no database): the node's ``/metrics`` and console feed it what
the store read, and ``drift_status`` gives the verdict per device (its docstring states the rule).

- **P** is the classifier's raw probability (``p_raw``), which no site calibration changes: the same film gets
  the same P before and after a recalibration, so a shift in P is a shift in the films (a new device, a software
  update, a new processing) or in the patients, not in the node's settings.
- **PSI** (population stability index) of the current P values against the reference's:
  ``sum over bins (c - r) * ln(c / r)``, with ``c`` and ``r`` the shares of current and reference values in each
  bin. The bins are the reference's quantiles (``bins`` of them, equal reference shares). Every bin's count is
  smoothed by half a study (``share = (count + 0.5) / (n + 0.5 * bins)``): an empty bin is not a share of 0 (the
  logarithm needs more), and one bin that happens to be empty in a small sample does not dominate (with a fixed
  epsilon such as 1e-4 it adds about 1.5 on its own: measured, that made the 1 % tail of PSI between two samples
  of the same films 1.6 at 40 studies). PSI is 0 for identical distributions; 0.1-0.25 is usually read as
  "moderate", above 0.25 as "a real shift" (on large samples).
- **PSI noise.** Two samples of the same films still differ: for ``n`` current and ``m`` reference studies, PSI
  is about ``(1/n + 1/m)`` times a chi-square with ``bins - 1`` degrees of freedom. With 5 bins and 40 studies
  against 40 that is 0.2 on average and 0.6 in 1 % of windows (measured on real radiographs: README, "Drift
  watch"), above the usual alert level of 0.25 with no drift at all. So a device alerts on PSI only above
  :func:`psi_limit`: the larger of ``psi_alert`` and the PSI that chance alone exceeds once in 1000 windows at
  these ``n`` and ``m``. At a site's usual weekly numbers (hundreds) the limit is ``psi_alert``; at a few dozen
  studies only a large shift alerts.
- **Flagged** means the classifier's own verdict at the operating point in force: ``p_abnormal >= 0.5`` (the
  calibrated P, where 0.5 is the operating point of the image's view). The reference's flag rate is the share of
  the reference P values at or above the raw threshold in force now, which each live result carries implicitly
  (``p_raw`` and ``p_abnormal`` together give it: :func:`raw_threshold`); with per-view thresholds it is the mean
  over the current studies of the reference share above each study's threshold. So a recalibration after the
  validation moves both rates alike, and only a change in the films moves their ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "ALL_DEVICES",
    "SMOOTHING",
    "DeviceDrift",
    "DriftRule",
    "drift_status",
    "flag_ratio",
    "psi",
    "psi_bins",
    "psi_limit",
    "raw_threshold",
]

ALL_DEVICES = "*"  # the reference key of all validated cases together
SMOOTHING = 0.5  # studies added to every bin's count on both sides


@dataclass(frozen=True)
class DriftRule:
    """When a device's drift is reported (``drift_status``); defaults chosen by measurement (README)."""

    min_studies: int = 30  # fewer current studies: no verdict ("not enough studies")
    psi_alert: float = 0.25  # PSI above this alerts (and above chance: psi_limit)
    chance: float = 0.001  # the share of windows of unchanged films whose PSI may exceed psi_limit
    flag_ratio_low: float = 0.5  # flag rate / reference flag rate outside [low, high] alerts
    flag_ratio_high: float = 2.0
    bins: int = 5  # reference quantile bins of the PSI
    min_reference: int = 30  # a device's own reference is used when it has this many cases, else all cases ("*")


@dataclass(frozen=True)
class DeviceDrift:
    """One device's drift over one period (``n`` current studies against ``reference_n`` reference cases)."""

    device: str
    n: int
    reference: str  # which reference: the device's own label, or "*" (all validated cases)
    reference_n: int
    psi: float | None  # None below min_studies
    psi_limit: float | None  # PSI above this alerts (psi_limit)
    flag_rate: float | None
    reference_flag_rate: float | None
    ratio: float | None  # flag_rate / reference_flag_rate (smoothed, see flag_ratio)
    alert: bool
    verdict: str  # "ok", "not enough studies (12 < 30)", "drift: PSI 0.41 > 0.25", ...

    def to_dict(self) -> dict:
        return asdict(self)


def psi_bins(reference: Sequence[float] | np.ndarray, bins: int) -> np.ndarray:
    """The inner bin edges: the reference's ``bins``-quantiles (ties merged, so there may be fewer bins)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0 or bins < 2:
        return np.empty(0)
    return np.unique(np.quantile(ref, np.arange(1, bins) / bins))


def psi(current: Sequence[float], reference: Sequence[float], bins: int = 5, smoothing: float = SMOOTHING) -> float:
    """Population stability index of ``current`` against ``reference`` over the reference's quantile bins, each
    bin's count smoothed by ``smoothing`` studies on both sides."""
    cur = np.asarray(current, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cur.size == 0 or ref.size == 0:
        raise ValueError("PSI needs current and reference values")
    edges = psi_bins(ref, bins)
    k = edges.size + 1

    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=k)
        return (counts + smoothing) / (values.size + smoothing * k)

    c, r = shares(cur), shares(ref)
    return float(np.sum((c - r) * np.log(c / r)))


def psi_limit(n: int, m: int, bins: int, psi_alert: float, chance: float = 0.001) -> float:
    """The PSI above which ``n`` current against ``m`` reference studies alert: ``psi_alert``, or more where
    chance alone would exceed it more often than ``chance``: ``(1/n + 1/m)`` times the ``1 - chance`` quantile of a
    chi-square with ``bins - 1`` degrees of freedom (Wilson-Hilferty's approximation)."""
    k = max(1, bins - 1)
    z = NormalDist().inv_cdf(1.0 - chance)
    quantile = k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3
    return max(psi_alert, quantile * (1.0 / max(1, n) + 1.0 / max(1, m)))


def raw_threshold(p_raw: float, p_abnormal: float) -> float:
    """The raw-probability operating point a result was judged at: the node maps it to P = 0.5 by shifting the
    logit (``logit(p_abnormal) = logit(p_raw) - logit(threshold)``), so ``threshold = sigmoid(logit(p_raw) -
    logit(p_abnormal))``."""

    def logit(p: float) -> float:
        p = min(max(p, 1e-12), 1 - 1e-12)
        return math.log(p / (1 - p))

    return 1.0 / (1.0 + math.exp(-(logit(p_raw) - logit(p_abnormal))))


def flag_ratio(flagged: int, n: int, reference_rate: float, reference_n: int) -> float:
    """The flag rate's ratio, each rate smoothed by half a study (``(k + 0.5) / (n + 1)``) so that a rate of 0
    on either side gives a finite ratio."""
    cur = (flagged + 0.5) / (n + 1)
    ref = (reference_rate * reference_n + 0.5) / (reference_n + 1)
    return cur / ref


def drift_status(
    current: Mapping[str, Sequence[tuple[float, float]]],
    reference: Mapping[str, Sequence[float]],
    rule: DriftRule | None = None,
) -> dict[str, DeviceDrift]:
    """Per device: its drift over the current period, and whether it alerts.

    ``current``: device -> (p_raw, p_abnormal) of each current study; ``reference``: device -> the p_raw of each
    validated case, and ``"*"`` -> all of them. Every device of either side is reported (a device with no current
    study has n = 0).

    **The rule.** A device's reference is its own validated cases when it has at least ``rule.min_reference`` of
    them, else all validated cases (``"*"``). With fewer than ``rule.min_studies`` current studies there is no
    verdict ("not enough studies") and no alert. Otherwise it **alerts when PSI > its limit (the larger of
    ``rule.psi_alert`` and the PSI that chance exceeds in a share ``rule.chance`` of windows at this n:
    :func:`psi_limit`), or when flag rate / reference flag rate is below ``rule.flag_ratio_low`` or above
    ``rule.flag_ratio_high``**. PSI is over ``rule.bins`` reference-quantile bins of the raw P; "flagged" is
    ``p_abnormal >= 0.5``; the reference flag rate is the share of reference P at or above each current study's
    raw threshold (averaged; module docstring); the ratio is smoothed by half a study on each side
    (:func:`flag_ratio`)."""
    rule = rule or DriftRule()
    everything = list(reference.get(ALL_DEVICES, ()))
    out: dict[str, DeviceDrift] = {}
    for device in sorted(set(current) | (set(reference) - {ALL_DEVICES})):
        cases = list(current.get(device, ()))
        own = list(reference.get(device, ()))
        ref_name, ref = (device, own) if len(own) >= rule.min_reference or not everything else (ALL_DEVICES, everything)
        n = len(cases)
        if not ref:
            out[device] = DeviceDrift(device, n, ref_name, 0, None, None, None, None, None, False, "no reference")
            continue
        if n < rule.min_studies:
            verdict = f"not enough studies ({n} < {rule.min_studies})"
            out[device] = DeviceDrift(device, n, ref_name, len(ref), None, None, None, None, None, False, verdict)
            continue
        p_raw = [p for p, _ in cases]
        value = psi(p_raw, ref, rule.bins)
        limit = psi_limit(n, len(ref), rule.bins, rule.psi_alert, rule.chance)
        flagged = sum(1 for _, p in cases if p >= 0.5)
        ref_arr = np.asarray(ref, dtype=np.float64)
        ref_rate = float(np.mean([np.mean(ref_arr >= raw_threshold(pr, pa)) for pr, pa in cases]))
        ratio = flag_ratio(flagged, n, ref_rate, len(ref))
        reasons = []
        if value > limit:
            reasons.append(f"PSI {value:.2f} > {limit:.2f}")
        if not rule.flag_ratio_low <= ratio <= rule.flag_ratio_high:
            reasons.append(f"flag rate ratio {ratio:.2f} outside [{rule.flag_ratio_low:g}, {rule.flag_ratio_high:g}]")
        verdict = "drift: " + "; ".join(reasons) if reasons else "ok"
        out[device] = DeviceDrift(
            device, n, ref_name, len(ref), value, limit, flagged / n, ref_rate, ratio, bool(reasons), verdict
        )
    return out
