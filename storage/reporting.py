"""Node-wide numbers for ``dicom-node status`` and ``/metrics``: :class:`ReportingStore` counts by state, the
latest activity, findings per class, deliveries per destination and recent job times.

The web console's pages read through :class:`storage.queries.Queries` instead; where a page shows one of these
numbers, it calls the method here (one place per query).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from storage.base import database_errors, utcnow
from storage.cluster import NODE_STALE_S, ClusterStore
from storage.db import BackfillStudy, Delivery, FindingRow, Instance, Job, Purge, Study, WorkerRow
from storage.jobs import worker_state
from storage.states import DeliveryState, JobState, QueuePriority


class ReportingStore(ClusterStore):
    """The read-only reporting part of the Store."""

    @database_errors
    def findings_by_class(self) -> dict[str, int]:
        """Findings reported so far (by the studies still stored), per class label."""
        with self._session() as s:
            return {
                str(k): int(n) for k, n in s.execute(select(FindingRow.label, func.count()).group_by(FindingRow.label))
            }

    @database_errors
    def deliveries_by_destination(self) -> dict[tuple[str, str], int]:
        with self._session() as s:
            rows = s.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            )
            return {(str(d), str(st)): int(n) for d, st, n in rows}

    @database_errors
    def recent_job_seconds(self, within_s: float) -> list[tuple[float, float]]:
        """(pipeline time, whole job time from claim to commit) of the jobs done in the last ``within_s`` s."""
        since = utcnow() - timedelta(seconds=within_s)
        with self._session() as s:
            rows = s.execute(
                select(Job.pipeline_s, Job.started_at, Job.finished_at).where(
                    Job.finished_at >= since, Job.state == JobState.DONE, Job.pipeline_s.is_not(None)
                )
            )
            return [
                (float(p or 0.0), (end - start).total_seconds() if start and end else float(p or 0.0))
                for p, start, end in rows
            ]

    @database_errors
    def recent_time_to_flag(self, within_s: float) -> list[tuple[int, float]]:
        """(final priority, seconds from the study's last image received before its job was claimed to the job's
        results committed: its flag) of the jobs done in the last ``within_s`` s. A job is no new flag, and left
        out, when no image came since the study's previous job was queued (an operator's re-analysis); so are
        studies a backfill pulled (retrospective)."""
        since = utcnow() - timedelta(seconds=within_s)
        earlier = aliased(Job)
        last_image = (
            select(func.max(Instance.received_at))
            .where(Instance.study_uid == Job.study_uid, Instance.received_at <= Job.started_at)
            .correlate(Job)
            .scalar_subquery()
        )
        previous_job = (
            select(func.max(earlier.created_at))
            .where(earlier.study_uid == Job.study_uid, earlier.id < Job.id)
            .correlate(Job)
            .scalar_subquery()
        )
        with self._session() as s:
            rows = s.execute(
                select(Job.priority, Job.finished_at, last_image, previous_job).where(
                    Job.finished_at >= since,
                    Job.state == JobState.DONE,
                    Job.study_uid.not_in(select(BackfillStudy.study_uid)),
                )
            ).all()
        return [
            (int(p), (end - image).total_seconds())
            for p, end, image, previous in rows
            if end is not None and image is not None and (previous is None or image > previous)
        ]

    @database_errors
    def status(self) -> dict:
        """Counts by state and the latest activity; no patient identifiers (there are none in the DB)."""

        def counts(s: Session, col, states) -> dict:
            got: dict[Any, int] = dict(s.execute(select(col, func.count()).group_by(col)).all())
            return {str(k): int(got.get(k, 0)) for k in states}

        def iso(t: datetime | None) -> str | None:
            return t.replace(tzinfo=UTC).isoformat() if t else None

        nodes = self.nodes(NODE_STALE_S)  # before the session: SQLite allows one open transaction per process here
        with self._session() as s:
            total = cast(int, s.scalar(select(func.count()).select_from(Instance)))
            eligible = cast(
                int, s.scalar(select(func.count()).select_from(Instance).where(Instance.eligible.is_(True)))
            )
            studies = cast(int, s.scalar(select(func.count()).select_from(Study)))
            receiving = cast(
                int, s.scalar(select(func.count()).select_from(Study).where(Study.stable_due_at.is_not(None)))
            )
            jobs = counts(s, Job.state, list(JobState))
            deliveries = counts(s, Delivery.state, list(DeliveryState))
            now = utcnow()
            workers = s.execute(select(WorkerRow.state, WorkerRow.heartbeat_at)).all()
            oldest_queued = s.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
            urgent_queued = s.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == JobState.QUEUED, Job.priority == QueuePriority.URGENT)
            )
            purged = s.execute(
                select(
                    func.coalesce(func.sum(Purge.studies), 0),
                    func.coalesce(func.sum(Purge.instances), 0),
                    func.coalesce(func.sum(Purge.bytes), 0),
                    func.max(Purge.run_at),
                )
            ).one()
            return {
                "instances": {"total": total, "eligible": eligible, "skipped": total - eligible},
                "studies": {"total": studies, "receiving": receiving, "complete": studies - receiving},
                "jobs": {"total": sum(jobs.values()), **jobs},
                "deliveries": {"total": sum(deliveries.values()), **deliveries},
                "workers": {
                    state: sum(1 for st, hb in workers if worker_state(st, hb, now) == state)
                    for state in ("alive", "stale", "dead")
                },
                "urgent_queued_jobs": int(urgent_queued or 0),
                "oldest_queued_job_age_s": (
                    round((now - oldest_queued).total_seconds(), 1) if oldest_queued is not None else None
                ),
                "purged": {
                    "studies": int(purged[0]),
                    "instances": int(purged[1]),
                    "bytes": int(purged[2]),
                    "last_at": iso(purged[3]),
                },
                "last_activity": {
                    "instance_received_at": iso(s.scalar(select(func.max(Instance.received_at)))),
                    "job_finished_at": iso(s.scalar(select(func.max(Job.finished_at)))),
                    "delivery_at": iso(s.scalar(select(func.max(Delivery.delivered_at)))),
                },
                "nodes": [  # the serve instances sharing this database (storage.cluster)
                    {
                        "name": n.name,
                        "host": n.host,
                        "state": n.state,
                        "role": n.role,
                        "dicom": n.dicom_address,
                        "web": n.web_address,
                        "version": n.version,
                        "heartbeat_at": iso(n.heartbeat_at),
                    }
                    for n in nodes
                ],
            }
