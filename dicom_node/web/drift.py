"""Drift watching as ``/metrics`` and the console's Drift page see it (:class:`DriftWatch`): the configured model
pair's latest site validation is the reference; live studies of the rolling window (``drift.window_days``) and of
each ISO week since the validation are compared with it by :func:`inference.drift.drift_status`.

Computed from the database when asked, and kept ``drift.cache_s`` seconds (a scrape every 15 s reads the database
at most once per period).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from dicom_node.config import Config
from inference.drift import DeviceDrift, DriftRule, drift_status
from storage import Store
from storage.base import utcnow
from storage.drift import DriftReference


@dataclass(frozen=True)
class DriftReport:
    """The current window's verdict per device, against ``reference`` (None: the model pair has no validation
    with a reference, so nothing is judged; ``problem`` says why)."""

    reference: DriftReference | None
    devices: dict[str, DeviceDrift] = field(default_factory=dict)
    window_days: float = 7
    problem: str = ""


@dataclass(frozen=True)
class WeekDrift:
    week: str  # ISO week, e.g. 2026-W48
    devices: dict[str, DeviceDrift]


class _Sha256Cache:
    """A model file's sha256, computed once per file version (path, size, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def of(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            from inference.modelfile import sha256_of

            self._cache[key] = sha256_of(path)
        return self._cache[key]


class DriftWatch:
    """Drift of the configured model pair's live traffic against its latest validation."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self._sha = _Sha256Cache()
        self._lock = threading.Lock()
        self._cached: tuple[float, DriftReport] | None = None

    @property
    def rule(self) -> DriftRule:
        d = self.config.drift
        low, high = d.flag_ratio_alert
        return DriftRule(
            min_studies=d.min_studies,
            psi_alert=d.psi_alert,
            flag_ratio_low=low,
            flag_ratio_high=high,
            bins=d.bins,
            min_reference=d.min_reference,
        )

    def model_pair(self) -> tuple[str, str] | None:
        models = self.config.inference.models
        clf, det = self._sha.of(models.classifier), self._sha.of(models.detector)
        return (clf, det) if clf and det else None

    def reference(self) -> tuple[DriftReference | None, str]:
        pair = self.model_pair()
        if pair is None:
            return None, "the configured model files cannot be read"
        ref = self.store.drift_reference(*pair)
        if ref is None:
            return None, "no site validation with a reference for the configured models (dicom-node validate)"
        return ref, ""

    def current(self, now: datetime | None = None) -> DriftReport:
        """The rolling window's verdict per device (cached ``drift.cache_s`` seconds unless ``now`` is given)."""
        with self._lock:
            if now is None and self._cached and time.monotonic() - self._cached[0] < self.config.drift.cache_s:
                return self._cached[1]
            report = self._compute(now)
            if now is None:
                self._cached = (time.monotonic(), report)
            return report

    def _compute(self, now: datetime | None) -> DriftReport:
        window = self.config.drift.window_days
        ref, problem = self.reference()
        if ref is None:
            return DriftReport(None, {}, window, problem)
        live = self.store.drift_window(window, ref.live_since, ref.classifier_sha256, ref.detector_sha256, now)
        current = {dev: [(r.p_raw, r.p_abnormal) for r in rows] for dev, rows in live.items()}
        return DriftReport(ref, drift_status(current, ref.values, self.rule), window)

    def weekly(self, weeks: int | None = None, now: datetime | None = None) -> list[WeekDrift]:
        """Per ISO week since the validation (the last ``drift.weeks_shown`` weeks at most), each device's drift."""
        ref, _ = self.reference()
        if ref is None:
            return []
        weeks = weeks or self.config.drift.weeks_shown
        since = (now or utcnow()) - timedelta(weeks=weeks)
        by_week = self.store.live_by_week(since, ref.classifier_sha256, ref.detector_sha256, ref.live_since)
        rule = self.rule
        out = []
        for week, devices in sorted(by_week.items()):
            current = {dev: [(r.p_raw, r.p_abnormal) for r in rows] for dev, rows in devices.items()}
            out.append(WeekDrift(week, drift_status(current, ref.values, rule)))
        return out


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class ChartSeries:
    device: str
    color: str
    points: str  # SVG polyline points ("x,y x,y"); a week without a value breaks the line into segments
    segments: tuple[str, ...]
    dots: tuple[tuple[float, float, str], ...]  # (x, y, tooltip)


@dataclass(frozen=True)
class Chart:
    """An inline SVG line chart's geometry (the template draws it; no script, nothing downloaded)."""

    title: str
    width: int
    height: int
    left: int
    top: int
    plot_w: int
    plot_h: int
    x_labels: tuple[tuple[float, str], ...]
    y_ticks: tuple[tuple[float, str], ...]
    limits: tuple[tuple[float, str], ...]  # alert thresholds as dashed lines (y, label)
    series: tuple[ChartSeries, ...]


def weekly_chart(weeks: list[WeekDrift], what: str, title: str, limits: tuple[float, ...], floor_max: float) -> Chart:
    """Per device, ``what`` ("psi" or "ratio") of each week as a line; weeks without a verdict leave a gap."""
    width, height, left, top, right, bottom = 760, 260, 48, 16, 48, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [getattr(d, what) for w in weeks for d in w.devices.values() if getattr(d, what) is not None]
    y_max = max([floor_max, *values, *limits]) * 1.1
    n = max(1, len(weeks) - 1)

    def x(i: int) -> float:
        return round(left + (plot_w * i / n if len(weeks) > 1 else plot_w / 2), 1)

    def y(v: float) -> float:
        return round(top + plot_h * (1 - min(v, y_max) / y_max), 1)

    devices = sorted({dev for w in weeks for dev in w.devices})
    series = []
    for k, dev in enumerate(devices):
        segments: list[list[str]] = [[]]
        dots = []
        for i, w in enumerate(weeks):
            d = w.devices.get(dev)
            v = getattr(d, what) if d is not None else None
            if v is None:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append(f"{x(i)},{y(v)}")
            dots.append((x(i), y(v), f"{dev}, {w.week}: {v:.2f} (n={d.n})" if d else ""))
        segs = tuple(" ".join(s) for s in segments if len(s) > 1)
        series.append(ChartSeries(dev, PALETTE[k % len(PALETTE)], " ".join(sum(segments, [])), segs, tuple(dots)))
    step = max(1, len(weeks) // 8)
    x_labels = tuple((x(i), w.week) for i, w in enumerate(weeks) if i % step == 0)
    y_ticks = tuple((y(v), f"{v:.2g}") for v in [y_max / 1.1 * f for f in (0, 0.25, 0.5, 0.75, 1.0)])
    return Chart(
        title,
        width,
        height,
        left,
        top,
        plot_w,
        plot_h,
        x_labels,
        y_ticks,
        tuple((y(v), f"{v:g}") for v in limits),
        tuple(series),
    )
