"""The Store: every durable state change of the node goes through here.

Callers pass bytes and plain fields; the Store writes spool files (fsync'd) and commits rows, so that an
acknowledged instance, a queued job and a pending delivery all survive a crash.

:class:`Store` is composed of one class per concern, each built on :class:`storage.base.StoreBase` (the engine,
the session factory and the spool they share):

- :class:`storage.ingest.IngestStore`: received instances and study assembly (timers, re-analysis);
- :class:`storage.jobs.JobStore`: the job queue with its leases, and the workers' heartbeats;
- :class:`storage.outbox.OutboxStore`: result objects and their deliveries;
- :class:`storage.reporting.ReportingStore`: the node-wide numbers of ``status`` and ``/metrics``;
- :class:`storage.purges.PurgeStore`: retention's purges and the spool's unreferenced files;
- :class:`storage.validation.ValidationStore`: site ground truth, validation cases and recorded validations;
- :class:`storage.drift.DriftStore`: live results per device and week against a validation (drift watching);
- :class:`storage.backfill.BackfillStore`: backfill runs (retrospective pulls from the PACS) and their studies;
- :class:`storage.cluster.ClusterStore`: the ``serve`` instances sharing the database, and their leader.
"""

from __future__ import annotations

from storage.backfill import BackfillStore
from storage.cluster import ClusterStore
from storage.drift import DriftStore
from storage.ingest import IngestStore
from storage.jobs import JobStore
from storage.outbox import OutboxStore
from storage.purges import PurgeStore
from storage.reporting import ReportingStore
from storage.validation import ValidationStore


class Store(
    IngestStore,
    JobStore,
    OutboxStore,
    ReportingStore,
    PurgeStore,
    ValidationStore,
    DriftStore,
    BackfillStore,
    ClusterStore,
):
    """One database and spool; its methods are those of the concerns it is composed of."""
