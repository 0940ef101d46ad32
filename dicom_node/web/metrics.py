"""Prometheus metrics at ``/metrics``, correct across the node's processes.

Two kinds:

- **Counted where it happens, in ``serve``** (:mod:`dicom_node.metrics`: the listener, the C-STORE handler and the
  sender live there): ``dicom_node_cstore_total{status, calling_ae}``, ``dicom_node_received_bytes_total``,
  ``dicom_node_associations_total{result}``, ``dicom_node_associations_active``,
  ``dicom_node_delivery_attempts_total{destination, result}``.
- **Read from the database at each scrape** (:class:`StoreCollector`), so that what the worker processes did is
  counted whichever process did it, and the figures agree with ``dicom-node status --json``: instances, studies,
  jobs and deliveries by state, the queue (depth, oldest queued job's age), workers by state, what retention
  purged, deliveries by destination, findings by class, free disk, and the job and pipeline times of the
  last hour (histograms).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dicom_node.metrics import ACTIVE, REGISTRY
from storage import Store

PIPELINE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


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
        findings = GaugeMetricFamily(
            "dicom_node_findings", "findings reported in the studies still stored, by class", labels=["finding"]
        )
        for label, n in sorted(self.store.findings_by_class().items()):
            findings.add_metric([label], n)
        yield findings
        yield GaugeMetricFamily(
            "dicom_node_disk_free_bytes",
            "free disk under storage.root",
            value=shutil.disk_usage(self.store.spool.root).free,
        )


def registry_for(store: Store, active: Callable[[], int] | None = None) -> CollectorRegistry:
    """The process's registry with the database collector of ``store`` (replacing one for another store)."""
    current = getattr(REGISTRY, "_dicom_node_collector", None)
    if current is None or current.store is not store:
        if current is not None:
            REGISTRY.unregister(current)
        collector = StoreCollector(store)
        REGISTRY.register(collector)
        REGISTRY._dicom_node_collector = collector  # type: ignore[attr-defined]
    if active is not None:
        ACTIVE.set_function(active)
    return REGISTRY
