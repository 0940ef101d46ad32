"""Jobs and the workers that run them: :class:`JobStore` claims a job under a lease, renews it, and commits a
job's results (files, rows and their deliveries at once) or its failure; it also keeps the workers' heartbeats.
The dataclasses are what a worker gets (:class:`JobInfo`) and hands back (:class:`ResultSpec`,
:class:`ImageVerdict`, :class:`FindingSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update

from storage.base import StoreBase, database_errors, rowcount, utcnow
from storage.db import BackfillStudy, Delivery, FindingRow, ImageResult, Instance, Job, Result, WorkerRow
from storage.errors import StaleJobError
from storage.states import DeliveryState, JobState, QueuePriority

MAX_JOB_CRASHES = 3  # a job whose worker process died this many times (node running) is failed, not retried
WORKER_STALE_S = 30.0  # an "alive" worker without a heartbeat for this long is reported stale


@dataclass(frozen=True)
class JobInfo:
    id: int
    study_uid: str
    attempts: int
    instances: tuple[tuple[str, Path], ...]  # (SOP Instance UID, spool path) of the eligible instances
    priority: int = QueuePriority.ROUTINE  # as queued: urgent when the sender asked
    requested: str = ""  # what the sender asked for its instances ("STAT", "HIGH", "STAT, HIGH"; "" = nothing)


@dataclass(frozen=True)
class ResultSpec:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    source_sop_uid: str | None
    data: bytes
    destinations: tuple[str, ...]  # live destinations: a pending delivery each
    held: tuple[str, ...] = ()  # silent destinations: a held delivery each (sent only if an operator releases it)
    suffix: str = ".dcm"  # the result file's; a notification message's says what it holds (.hl7, .json, .eml)


@dataclass(frozen=True)
class FindingSpec:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in the source image's pixels


@dataclass(frozen=True)
class ImageVerdict:
    """What the job said about one image (kept for the console and the findings metric)."""

    sop_instance_uid: str
    p_abnormal: float | None  # None: not analysable
    abnormal: bool | None
    not_analysable: str | None
    findings: tuple[FindingSpec, ...] = ()
    p_raw: float | None = None  # the classifier's own probability, before the view's operating point


def worker_state(state: str, heartbeat_at: datetime, now: datetime) -> str:
    """alive, dead, or stale: registered alive but no heartbeat for WORKER_STALE_S (hung, or killed outright)."""
    if state == "alive" and now - heartbeat_at > timedelta(seconds=WORKER_STALE_S):
        return "stale"
    return state


class JobStore(StoreBase):
    """The job-queue part of the Store: leases, results and worker heartbeats."""

    # ---- jobs --------------------------------------------------------------------------------------
    @database_errors
    def claim_job(self, worker: str, lease_s: float) -> JobInfo | None:
        """Atomically take the oldest urgent queued job, else the oldest queued one, or a running one whose worker's
        lease ran out (urgent ones first as well)."""
        now = utcnow()
        with self._session.begin() as s:
            while True:
                cand = s.scalars(
                    select(Job)
                    .where(
                        or_(Job.state == JobState.QUEUED, and_(Job.state == JobState.RUNNING, Job.lease_until < now))
                    )
                    .order_by(Job.priority, Job.id)
                    .limit(1)
                ).first()
                if cand is None:
                    return None
                job_id, study_uid, attempts, priority = cand.id, cand.study_uid, cand.attempts, cand.priority
                if cand.state == JobState.RUNNING and (cand.crashes or 0) >= MAX_JOB_CRASHES:
                    # its worker died every time (a crash or out of memory on this study): stop trying
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(
                            state=JobState.FAILED,
                            finished_at=now,
                            lease_until=None,
                            reason=f"the worker process died {cand.crashes} times while analysing this study",
                        )
                    )
                    continue
                got = rowcount(
                    s.execute(
                        update(Job)
                        .where(Job.id == cand.id, Job.state == cand.state, Job.attempts == cand.attempts)
                        .values(
                            state=JobState.RUNNING,
                            worker=worker,
                            started_at=now,
                            lease_until=now + timedelta(seconds=lease_s),
                            attempts=Job.attempts + 1,
                        )
                    )
                )
                if got:
                    break
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.requested_priority)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
                .order_by(Instance.received_at)
            ).all()
            asked = {part.strip() for r in rows for part in (r[2] or "").split(",") if part.strip()}
            return JobInfo(
                job_id,
                study_uid,
                attempts + 1,
                tuple((r[0], self.spool.resolve(r[1])) for r in rows),
                priority,
                ", ".join(sorted(asked, key=lambda a: (a != "STAT", a))),
            )

    @database_errors
    def renew_lease(self, job_id: int, worker: str, lease_s: float) -> bool:
        with self._session.begin() as s:
            return bool(
                rowcount(
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
                    )
                )
            )

    @database_errors
    def finish_job(
        self,
        job_id: int,
        worker: str,
        results: list[ResultSpec],
        pipeline_s: float | None = None,
        images: list[ImageVerdict] | None = None,
        models: str | None = None,
        priority: int | None = None,
        priority_reasons: str | None = None,
    ) -> None:
        """Write result files, then commit their rows, one delivery per destination (pending for a live one, held
        for a silent one; none for a study a backfill pulled), the verdict per image and the job's end at once.

        ``priority`` (a :class:`QueuePriority`) is the study's final priority and ``priority_reasons`` why: kept
        on the job (the console shows it), and the place of its deliveries in the outbox (urgent ones are sent
        first). None keeps the priority the job was queued with.

        Raises StaleJobError (and keeps nothing) when the job is no longer this worker's: its lease ran out and
        another worker took it over, so exactly one set of results is ever delivered."""
        now = utcnow()
        with self._session() as s:
            job = s.get(Job, job_id)
            if job is None:  # only a finished study's jobs are ever purged: this worker's lease had run out
                raise StaleJobError(f"job {job_id} no longer exists")
            study_uid = job.study_uid
            if priority is None:
                priority = job.priority
            # a study pulled from the archive by a backfill is never delivered anywhere (one fetched for a
            # re-analysis is)
            pulled = s.get(BackfillStudy, study_uid)
            retrospective = pulled is not None and not pulled.deliver
        paths = [
            self.spool.write_file(r.data, self.spool.result_path(study_uid, r.sop_instance_uid, r.suffix))
            for r in results
        ]
        with self._session.begin() as s:
            owned = rowcount(
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                    .values(
                        state=JobState.DONE,
                        finished_at=now,
                        lease_until=None,
                        reason=None,
                        pipeline_s=pipeline_s,
                        models=models,
                        priority=priority,
                        priority_reasons=priority_reasons,
                    )
                )
            )
            if not owned:
                for p in paths:
                    p.unlink(missing_ok=True)
                raise StaleJobError(f"job {job_id} was taken over by another worker; results discarded")
            for image in images or ():
                s.add(
                    ImageResult(
                        job_id=job_id,
                        study_uid=study_uid,
                        sop_instance_uid=image.sop_instance_uid,
                        p_abnormal=image.p_abnormal,
                        p_raw=image.p_raw,
                        abnormal=image.abnormal,
                        not_analysable=image.not_analysable,
                    )
                )
                for f in image.findings:
                    x0, y0, x1, y1 = f.box
                    s.add(
                        FindingRow(
                            job_id=job_id,
                            study_uid=study_uid,
                            sop_instance_uid=image.sop_instance_uid,
                            label=f.label,
                            score=f.score,
                            x_min=x0,
                            y_min=y0,
                            x_max=x1,
                            y_max=y1,
                        )
                    )
            for spec, path in zip(results, paths):
                row = Result(
                    job_id=job_id,
                    study_uid=study_uid,
                    kind=spec.kind,
                    sop_instance_uid=spec.sop_instance_uid,
                    sop_class_uid=spec.sop_class_uid,
                    series_uid=spec.series_uid,
                    source_sop_uid=spec.source_sop_uid,
                    path=self.spool.relative(path),
                    created_at=now,
                )
                s.add(row)
                s.flush()
                if retrospective:
                    continue
                for dest, state in [(d, DeliveryState.PENDING) for d in spec.destinations] + [
                    (d, DeliveryState.HELD) for d in spec.held
                ]:
                    s.add(
                        Delivery(
                            result_id=row.id,
                            destination=dest,
                            state=state,
                            attempts=0,
                            next_attempt_at=now,
                            created_at=now,
                            priority=priority,
                        )
                    )

    @database_errors
    def fail_job(self, job_id: int, worker: str, reason: str) -> None:
        with self._session.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                .values(state=JobState.FAILED, finished_at=utcnow(), lease_until=None, reason=reason[:2000])
            )

    # ---- workers -------------------------------------------------------------------------------------
    @database_errors
    def worker_heartbeat(self, name: str, pid: int, host: str, models: str, current_job: int | None) -> None:
        """A worker is alive (and what it is doing); the first beat of a (re)started worker says so too."""
        now = utcnow()
        with self._session.begin() as s:
            row = s.get(WorkerRow, name)
            if row is None:
                s.add(
                    WorkerRow(
                        name=name,
                        state="alive",
                        pid=pid,
                        host=host,
                        models=models,
                        started_at=now,
                        heartbeat_at=now,
                        current_job=current_job,
                        deaths=0,
                    )
                )
                return
            if row.pid != pid or row.state != "alive":
                row.started_at = now
            row.state, row.pid, row.host, row.models = "alive", pid, host, models
            row.heartbeat_at, row.current_job = now, current_job

    @database_errors
    def live_workers(self) -> int:
        """Workers alive with a heartbeat within WORKER_STALE_S, on any host (one indexed count: /readyz)."""
        since = utcnow() - timedelta(seconds=WORKER_STALE_S)
        with self._session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(WorkerRow)
                    .where(WorkerRow.state == "alive", WorkerRow.heartbeat_at >= since)
                )
                or 0
            )

    @database_errors
    def worker_stopped(self, name: str) -> None:
        with self._session.begin() as s:
            s.execute(update(WorkerRow).where(WorkerRow.name == name).values(state="stopped", current_job=None))

    @database_errors
    def worker_died(self, name: str, exit_reason: str) -> list[int]:
        """The supervisor saw a worker process die: its running job counts one crash and may be taken over at
        once (no need to wait for the lease). Returns the ids of those jobs."""
        now = utcnow()
        with self._session.begin() as s:
            jobs = list(s.scalars(select(Job.id).where(Job.worker == name, Job.state == JobState.RUNNING)))
            if jobs:
                s.execute(update(Job).where(Job.id.in_(jobs)).values(crashes=Job.crashes + 1, lease_until=now))
            s.execute(
                update(WorkerRow)
                .where(WorkerRow.name == name)
                .values(state="dead", current_job=None, deaths=WorkerRow.deaths + 1, last_exit=exit_reason[:200])
            )
            return jobs
