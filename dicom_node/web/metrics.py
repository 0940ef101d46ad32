"""Prometheus metrics at ``/metrics``, correct across the node's processes.

Two kinds:

- **Counted where it happens, in ``serve``** (:mod:`dicom_node.metrics`: the listener, the C-STORE handler and the
  sender live there): ``dicom_node_cstore_total{status, calling_ae}``, ``dicom_node_received_bytes_total``,
  ``dicom_node_associations_total{result}``, ``dicom_node_associations_active``,
  ``dicom_node_delivery_attempts_total{destination, result}``.
- **Read from the database at each scrape** (:class:`StoreCollector`), so that what the worker processes did is
  counted whichever process did it, and the figures agree with ``dicom-node status --json``: instances, studies,
  jobs and deliveries by state, the queue (depth, oldest queued job's age), workers by state, what retention
  purged, deliveries by destination, findings by class, backfill runs and studies by state (and those waiting
  for a retry), free disk, and the job and pipeline times of the last hour (histograms), and the time from a
  study's last image to its flag (results committed) of the last hour by final priority,
  ``dicom_node_time_to_flag_seconds{priority}`` (histogram; an operator's re-analysis and backfilled studies are
  not counted).
- **Drift of live traffic** (:class:`DriftCollector`, :mod:`dicom_node.web.drift`), per device of the rolling
  window (``drift.window_days``) against the configured model pair's latest site validation:
  ``dicom_node_drift_psi{device}``, ``dicom_node_drift_psi_limit{device}`` (the PSI above which the device alerts:
  ``drift.psi_alert``, or more where its few studies make PSI noisy), ``dicom_node_drift_flag_rate_ratio{device}``,
  ``dicom_node_drift_studies{device}`` (studies in the window), ``dicom_node_drift_alert{device}`` (0/1, the rule
  of :func:`inference.drift.drift_status`), and ``dicom_node_drift_reference`` (1 when there is a validation to
  compare with, else 0 and no per-device series). PSI and ratio are left out for a device with too few studies
  for a verdict (``drift.min_studies``). Computed at scrape time, kept ``drift.cache_s`` seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dicom_node.metrics import ACTIVE, REGISTRY
from dicom_node.web.drift import DriftWatch
from storage import Store
from storage.states import QueuePriority

PIPELINE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# from the last image: studies.stable_after_s (10 s by default), then the queue, the models and the commit
TIME_TO_FLAG_BUCKETS = (2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative histogram buckets of ``values`` as Prometheus wants them (``+Inf`` last)."""
    out: list[tuple[str, float]] = [(str(bound), len([v for v in values if v <= bound])) for bound in bounds]
    out.append(("+Inf", len(values)))
    return out


class StoreCollector(Collector):
    """Gauges read from the database at scrape time (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator:
        st = self.store.status()
        for name, section, what in (
            ("instances", "instances", "stored instances"),
            ("studies", "studies", "studies"),
            ("jobs", "jobs", "analysis jobs"),
            ("deliveries", "deliveries", "deliveries (result object x destination)"),
            ("workers", "workers", "worker processes by heartbeat state"),
        ):
            g = GaugeMetricFamily(f"dicom_node_{name}", f"{what}, by state", labels=["state"])
            for state, n in st[section].items():
                if state != "total":
                    g.add_metric([state], n)
            yield g
        yield GaugeMetricFamily("dicom_node_queue_depth", "jobs waiting for a worker", value=st["jobs"]["queued"])
        age = st["oldest_queued_job_age_s"]
        yield GaugeMetricFamily(
            "dicom_node_oldest_queued_job_age_seconds", "how long the oldest queued job has waited", value=age or 0.0
        )
        yield GaugeMetricFamily(
            "dicom_node_retry_backlog",
            "deliveries pending a retry or a first attempt",
            value=st["deliveries"]["pending"],
        )
        for key in ("studies", "instances", "bytes"):
            yield GaugeMetricFamily(
                f"dicom_node_purged_{key}", f"{key} removed by retention in all", value=st["purged"][key]
            )
        by_dest = GaugeMetricFamily(
            "dicom_node_deliveries_by_destination",
            "deliveries by destination and state",
            labels=["destination", "state"],
        )
        for (dest, state), n in self.store.deliveries_by_destination().items():
            by_dest.add_metric([dest, state], n)
        yield by_dest
        recent = self.store.recent_job_seconds(3600)
        for name, what, durations in (
            (
                "dicom_node_job_pipeline_seconds",
                "pipeline (model) time of the jobs done in the last hour",
                [p for p, _ in recent],
            ),
            (
                "dicom_node_job_seconds",
                "whole job time (decode, models, encode, commit) of the jobs done in the last hour",
                [j for _, j in recent],
            ),
        ):
            buckets: list[tuple[str, float]] = [
                (str(bound), len([d for d in durations if d <= bound])) for bound in PIPELINE_BUCKETS
            ]
            buckets.append(("+Inf", len(durations)))
            h = HistogramMetricFamily(name, what, unit="")
            h.add_metric([], buckets, float(sum(durations)))
            yield h
        flags = self.store.recent_time_to_flag(3600)
        h = HistogramMetricFamily(
            "dicom_node_time_to_flag_seconds",
            "seconds from a study's last received image to its flag (results committed) of the studies done in the "
            "last hour, by final priority",
            labels=["priority"],
        )
        for priority in QueuePriority:
            seconds = [t for p, t in flags if p == priority]
            h.add_metric([priority.name.lower()], _buckets(seconds, TIME_TO_FLAG_BUCKETS), float(sum(seconds)))
        yield h
        findings = GaugeMetricFamily(
            "dicom_node_findings", "findings reported in the studies still stored, by class", labels=["finding"]
        )
        for label, n in sorted(self.store.findings_by_class().items()):
            findings.add_metric([label], n)
        yield findings
        backfill = self.store.backfill_counts()
        for key, what in (("runs", "backfill runs"), ("studies", "studies of backfill runs (pulled from the PACS)")):
            g = GaugeMetricFamily(f"dicom_node_backfill_{key}", f"{what}, by state", labels=["state"])
            for state, n in backfill[key].items():
                g.add_metric([state], n)
            yield g
        retrying = GaugeMetricFamily(
            "dicom_node_backfill_retrying",
            "backfill searches (runs) and moves (studies) waiting for a retry after the PACS failed them",
            labels=["step"],
        )
        for step, n in backfill["retrying"].items():
            retrying.add_metric([step], n)
        yield retrying
        yield GaugeMetricFamily(
            "dicom_node_disk_free_bytes",
            "free disk under storage.root",
            value=shutil.disk_usage(self.store.spool.root).free,
        )


class DriftCollector(Collector):
    """Drift of live traffic per device (see the module docstring)."""

    def __init__(self, watch: DriftWatch):
        self.watch = watch
        self.store = watch.store

    def collect(self) -> Iterator:
        report = self.watch.current()
        yield GaugeMetricFamily(
            "dicom_node_drift_reference",
            "1 when the configured model pair has a site validation to compare live traffic with, else 0",
            value=1 if report.reference is not None else 0,
        )
        if report.reference is None:
            return
        families = {
            "psi": GaugeMetricFamily(
                "dicom_node_drift_psi",
                "population stability index of the raw P(abnormal) of the window's live studies against the "
                "validation's, per device",
                labels=["device"],
            ),
            "limit": GaugeMetricFamily(
                "dicom_node_drift_psi_limit",
                "the PSI above which the device alerts: drift.psi_alert, or what chance alone exceeds once in 1000 "
                "windows at its number of studies, whichever is larger",
                labels=["device"],
            ),
            "ratio": GaugeMetricFamily(
                "dicom_node_drift_flag_rate_ratio",
                "flagged rate of the window's live studies / the validation's at the same operating point, per device",
                labels=["device"],
            ),
            "n": GaugeMetricFamily(
                "dicom_node_drift_studies", "live studies in the drift window, per device", labels=["device"]
            ),
            "alert": GaugeMetricFamily(
                "dicom_node_drift_alert",
                "1 when the device's live traffic has drifted from the validation (PSI or flag rate ratio), else 0",
                labels=["device"],
            ),
        }
        for device, d in sorted(report.devices.items()):
            if d.psi is not None:
                families["psi"].add_metric([device], d.psi)
            if d.psi_limit is not None:
                families["limit"].add_metric([device], d.psi_limit)
            if d.ratio is not None:
                families["ratio"].add_metric([device], d.ratio)
            families["n"].add_metric([device], d.n)
            families["alert"].add_metric([device], 1 if d.alert else 0)
        yield from families.values()


def _replace(attr: str, collector: Collector | None) -> None:
    current = getattr(REGISTRY, attr, None)
    if current is not None:
        REGISTRY.unregister(current)
    if collector is not None:
        REGISTRY.register(collector)
    setattr(REGISTRY, attr, collector)


def registry_for(
    store: Store, active: Callable[[], int] | None = None, drift: DriftWatch | None = None
) -> CollectorRegistry:
    """The process's registry with the database collector of ``store`` (replacing one for another store), and
    the drift collector of ``drift`` when given."""
    current = getattr(REGISTRY, "_dicom_node_collector", None)
    if current is None or current.store is not store:
        _replace("_dicom_node_collector", StoreCollector(store))
    current_drift = getattr(REGISTRY, "_dicom_node_drift_collector", None)
    if drift is not None and (current_drift is None or current_drift.watch is not drift):
        _replace("_dicom_node_drift_collector", DriftCollector(drift))
    elif drift is None and current_drift is not None and current_drift.store is not store:
        _replace("_dicom_node_drift_collector", None)
    if active is not None:
        ACTIVE.set_function(active)
    return REGISTRY
