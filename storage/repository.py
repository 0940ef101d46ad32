"""The Store: every durable state change of the node goes through here.

Callers pass bytes and plain fields; the Store writes spool files (fsync'd) and commits rows, so that an
acknowledged instance, a queued job and a pending delivery all survive a crash.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Result as QueryResult
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import (
    Delivery,
    FindingRow,
    ImageResult,
    Instance,
    Job,
    Purge,
    Result,
    Study,
    WorkerRow,
    make_engine,
)
from storage.errors import DatabaseError, DiskFullError, StaleJobError, StorageError, UnknownStudyError
from storage.spool import Spool
from storage.states import DeliveryState, JobState

_UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}  # INSERT ... ON CONFLICT

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)
MAX_JOB_CRASHES = 3  # a job whose worker process died this many times (node running) is failed, not retried
WORKER_STALE_S = 30.0  # an "alive" worker without a heartbeat for this long is reported stale


def _database_errors(method: F) -> F:
    """Translate SQLAlchemy's errors into :class:`DatabaseError` at the Store's boundary.

    The message keeps the driver's first line (e.g. "database is locked") and never SQLAlchemy's rendering,
    which would carry the statement's parameters."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            detail = (str(orig).strip().splitlines() or [""])[0] if orig is not None else ""
            raise DatabaseError(
                f"database failure in {method.__name__}: {type(orig or exc).__name__}"
                + (f": {detail}" if detail else "")
            ) from exc

    return wrapper  # type: ignore[return-value]


def _rowcount(result: QueryResult[Any]) -> int:
    """Rows matched by an UPDATE/DELETE: ``Session.execute`` is typed as returning a plain ``Result``, but for
    DML statements it returns a ``CursorResult``, which carries ``rowcount``."""
    return cast(CursorResult[Any], result).rowcount


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class InstanceMeta:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    view_position: str
    calling_ae: str
    eligible: bool
    skip_reason: str | None


@dataclass(frozen=True)
class Stored:
    duplicate: bool
    path: Path
    stable_due_at: datetime | None


@dataclass(frozen=True)
class JobInfo:
    id: int
    study_uid: str
    attempts: int
    instances: tuple[tuple[str, Path], ...]  # (SOP Instance UID, spool path) of the eligible instances


@dataclass(frozen=True)
class ResultSpec:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    source_sop_uid: str | None
    data: bytes
    destinations: tuple[str, ...]


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


@dataclass(frozen=True)
class DueDelivery:
    id: int
    destination: str
    attempts: int
    kind: str
    sop_instance_uid: str
    path: Path


def worker_state(state: str, heartbeat_at: datetime, now: datetime) -> str:
    """alive, dead, or stale: registered alive but no heartbeat for WORKER_STALE_S (hung, or killed outright)."""
    if state == "alive" and now - heartbeat_at > timedelta(seconds=WORKER_STALE_S):
        return "stale"
    return state


class Store:
    @_database_errors
    def __init__(self, database_url: str, root: Path, min_free_disk_mb: float = 0):
        self.spool = Spool(root)
        self.engine = make_engine(database_url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if self.engine.dialect.name not in _UPSERT:
            raise StorageError(
                f"storage.database_url: {self.engine.dialect.name} is not supported (use SQLite or PostgreSQL)"
            )
        # Built once: these run for every received image, before its C-STORE is answered (Core, cached SQL).
        upsert = _UPSERT[self.engine.dialect.name](Study)
        self._study_upsert = upsert.on_conflict_do_update(
            index_elements=[Study.study_uid],
            set_={
                "last_received_at": upsert.excluded.last_received_at,
                # a skipped instance (no due time) leaves the study's timer as it is
                "stable_due_at": func.coalesce(upsert.excluded.stable_due_at, Study.stable_due_at),
            },
        )
        self._instance_insert = insert(Instance)
        self.min_free_disk_mb = min_free_disk_mb

    def close(self) -> None:
        self.engine.dispose()

    # ---- ingest ------------------------------------------------------------------------------------
    @_database_errors
    def has_instance(self, sop_uid: str) -> bool:
        with self._session() as s:
            return s.get(Instance, sop_uid) is not None

    @_database_errors
    def instance_file(self, sop_uid: str) -> Path | None:
        with self._session() as s:
            path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
            return Path(path) if path is not None else None

    @_database_errors
    def remove_unreferenced_files(self, result_min_age_s: float = 3600.0) -> int:
        """Set aside (into ``storage.root/orphans``, never deleted) spool and result files that no row references:
        left by a crash between placing a received file and committing its row (never acknowledged, so the sender
        still has it), or between a purge's commit and its deletions. Result files younger than
        ``result_min_age_s`` are left alone (a `dicom-node worker` elsewhere writes them just before its commit).
        When most files look unreferenced, the database is probably not this spool's (a wrong
        ``storage.database_url``): nothing is moved and StorageError says so. Call only while nothing is being
        received. Returns how many were set aside."""

        def key(path: Path) -> tuple[str, ...]:  # study folder + file name: the same if the root was moved
            return path.parts[-2:]

        now = time.time()
        orphans: list[Path] = []
        total = 0
        for folder, column, min_age in (
            (self.spool.files, Instance.path, 0.0),
            (self.spool.results, Result.path, result_min_age_s),
        ):
            with self._session() as s:
                known = {key(Path(p)) for p in s.scalars(select(column))}
            for p in sorted(folder.rglob("*")):
                if not p.is_file():
                    continue
                total += 1
                if key(p) not in known and now - p.stat().st_mtime >= min_age:
                    orphans.append(p)
        if len(orphans) > 10 and len(orphans) > total // 2:
            raise StorageError(
                f"{len(orphans)} of {total} spool files are unknown to the database: is storage.database_url the "
                f"database of this spool ({self.spool.root})? Nothing was moved."
            )
        for p in orphans:
            dest = self.spool.root / "orphans" / p.relative_to(self.spool.root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
        return len(orphans)

    @_database_errors
    def add_instance(
        self, data: bytes | memoryview | Path, meta: InstanceMeta, stable_after_s: float, now: datetime | None = None
    ) -> Stored:
        """Store one received instance durably. Returns only after the file is fsync'd and the row committed.

        ``data`` is the encoded file, as bytes or as the path of a complete file in the spool's tmp folder
        (which the caller still owns). The same SOP Instance UID twice is stored once."""
        if self.min_free_disk_mb and self.spool.free_mb() < self.min_free_disk_mb:
            raise DiskFullError(f"free disk below storage.min_free_disk_mb ({self.min_free_disk_mb} MB)")
        final = self.spool.instance_path(meta.study_uid, meta.sop_instance_uid)
        if isinstance(data, Path):
            size = data.stat().st_size
            placed = self.spool.adopt(data, final)
            temp = data
        else:
            size = len(data)
            temp = self.spool.write_temp(data)
            placed = self.spool.place(temp, final)
        if not placed:
            # The name exists: a copy of the same instance stored earlier or concurrently, or a file left by a
            # crash between placing it and committing its row (never acknowledged): keep a committed one.
            if self.has_instance(meta.sop_instance_uid):
                if not isinstance(data, Path):
                    self.spool.discard(temp)
                return Stored(True, final, None)
            if isinstance(data, Path):
                temp = self.spool.write_temp(data.read_bytes())
            self.spool.place(temp, final, replace=True)
        now = now or utcnow()
        due = now + timedelta(seconds=stable_after_s) if meta.eligible else None
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    self._study_upsert,
                    {
                        "study_uid": meta.study_uid,
                        "first_received_at": now,
                        "last_received_at": now,
                        "stable_due_at": due,
                    },
                )
                conn.execute(
                    self._instance_insert,
                    {**meta.__dict__, "size_bytes": size, "path": str(final), "received_at": now, "job_id": None},
                )
        except IntegrityError:
            committed = self.instance_file(meta.sop_instance_uid)
            if committed is not None:  # stored earlier (or concurrently) - under another study, if the name differs
                if committed != final:
                    final.unlink(missing_ok=True)  # our copy is referenced by no row
                return Stored(True, committed, None)
            raise
        return Stored(False, final, due)

    # ---- study assembly ----------------------------------------------------------------------------
    @_database_errors
    def pending_study_timers(self) -> list[tuple[str, datetime]]:
        with self._session() as s:
            rows = s.execute(select(Study.study_uid, Study.stable_due_at).where(Study.stable_due_at.is_not(None)))
            return [(r[0], cast(datetime, r[1])) for r in rows]  # not None: filtered by the WHERE

    @_database_errors
    def study_due_at(self, study_uid: str) -> datetime | None:
        with self._session() as s:
            return s.scalar(select(Study.stable_due_at).where(Study.study_uid == study_uid))

    @_database_errors
    def study_stable(self, study_uid: str, now: datetime | None = None) -> int | None:
        """The study's timer fired: hand its not-yet-covered eligible instances to a job.

        Returns the job id, or None when the timer was re-armed meanwhile or nothing new is eligible.
        A job still queued for the study absorbs the new instances instead of a second job being made."""
        now = now or utcnow()
        with self._session.begin() as s:
            cleared = _rowcount(
                s.execute(
                    update(Study)
                    .where(Study.study_uid == study_uid, Study.stable_due_at <= now)
                    .values(stable_due_at=None)
                )
            )
            if not cleared:
                return None
            new = s.scalars(
                select(Instance.sop_instance_uid).where(
                    Instance.study_uid == study_uid, Instance.eligible.is_(True), Instance.job_id.is_(None)
                )
            ).all()
            if not new:
                return None
            job = s.scalars(
                select(Job)
                .where(Job.study_uid == study_uid, Job.state == JobState.QUEUED)
                .order_by(Job.id.desc())
                .limit(1)
            ).first()
            if job is None:
                analysed_before = s.scalar(select(func.count()).select_from(Job).where(Job.study_uid == study_uid))
                job = Job(
                    study_uid=study_uid,
                    state=JobState.QUEUED,
                    created_at=now,
                    reason="re-analysis: new instances after an earlier job" if analysed_before else "study stable",
                )
                s.add(job)
                s.flush()
            s.execute(update(Instance).where(Instance.sop_instance_uid.in_(new)).values(job_id=job.id))
            return job.id

    @_database_errors
    def reanalyze(self, study_uid: str) -> int:
        """Queue an operator-requested re-analysis of a study (all its eligible instances)."""
        with self._session.begin() as s:
            s.execute(select(Study.study_uid).where(Study.study_uid == study_uid).with_for_update())  # vs. a purge
            n = s.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
            )
            if not n:
                raise UnknownStudyError(f"no eligible instances stored for study {study_uid}")
            job = Job(study_uid=study_uid, state=JobState.QUEUED, created_at=utcnow(), reason="re-analysis requested")
            s.add(job)
            s.flush()
            s.execute(
                update(Instance)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
                .values(job_id=job.id)
            )
            return job.id

    # ---- jobs --------------------------------------------------------------------------------------
    @_database_errors
    def claim_job(self, worker: str, lease_s: float) -> JobInfo | None:
        """Atomically take the oldest queued job, or a running one whose worker's lease ran out."""
        now = utcnow()
        with self._session.begin() as s:
            while True:
                cand = s.scalars(
                    select(Job)
                    .where(
                        or_(Job.state == JobState.QUEUED, and_(Job.state == JobState.RUNNING, Job.lease_until < now))
                    )
                    .order_by(Job.id)
                    .limit(1)
                ).first()
                if cand is None:
                    return None
                job_id, study_uid, attempts = cand.id, cand.study_uid, cand.attempts
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
                got = _rowcount(
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
                select(Instance.sop_instance_uid, Instance.path)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
                .order_by(Instance.received_at)
            )
            return JobInfo(job_id, study_uid, attempts + 1, tuple((r[0], Path(r[1])) for r in rows))

    @_database_errors
    def renew_lease(self, job_id: int, worker: str, lease_s: float) -> bool:
        with self._session.begin() as s:
            return bool(
                _rowcount(
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
                    )
                )
            )

    @_database_errors
    def results_of_study(self, study_uid: str) -> list[Result]:
        with self._session() as s:
            return list(s.scalars(select(Result).where(Result.study_uid == study_uid).order_by(Result.id)))

    @_database_errors
    def finish_job(
        self,
        job_id: int,
        worker: str,
        results: list[ResultSpec],
        pipeline_s: float | None = None,
        images: list[ImageVerdict] | None = None,
        models: str | None = None,
    ) -> None:
        """Write result files, then commit their rows, one delivery per destination, the verdict per image and
        the job's end at once.

        Raises StaleJobError (and keeps nothing) when the job is no longer this worker's: its lease ran out and
        another worker took it over, so exactly one set of results is ever delivered."""
        now = utcnow()
        with self._session() as s:
            job = s.get(Job, job_id)
            if job is None:  # only a finished study's jobs are ever purged: this worker's lease had run out
                raise StaleJobError(f"job {job_id} no longer exists")
            study_uid = job.study_uid
        paths = [self.spool.write_file(r.data, self.spool.result_path(study_uid, r.sop_instance_uid)) for r in results]
        with self._session.begin() as s:
            owned = _rowcount(
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
                    path=str(path),
                    created_at=now,
                )
                s.add(row)
                s.flush()
                for dest in spec.destinations:
                    s.add(
                        Delivery(
                            result_id=row.id,
                            destination=dest,
                            state=DeliveryState.PENDING,
                            attempts=0,
                            next_attempt_at=now,
                            created_at=now,
                        )
                    )

    @_database_errors
    def fail_job(self, job_id: int, worker: str, reason: str) -> None:
        with self._session.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                .values(state=JobState.FAILED, finished_at=utcnow(), lease_until=None, reason=reason[:2000])
            )

    # ---- deliveries --------------------------------------------------------------------------------
    @_database_errors
    def due_deliveries(self, limit: int = 50, now: datetime | None = None) -> list[DueDelivery]:
        now = now or utcnow()
        with self._session() as s:
            rows = s.execute(
                select(
                    Delivery.id,
                    Delivery.destination,
                    Delivery.attempts,
                    Result.kind,
                    Result.sop_instance_uid,
                    Result.path,
                )
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            )
            return [DueDelivery(r[0], r[1], r[2], r[3], r[4], Path(r[5])) for r in rows]

    @_database_errors
    def next_delivery_due(self) -> datetime | None:
        with self._session() as s:
            return s.scalar(select(func.min(Delivery.next_attempt_at)).where(Delivery.state == DeliveryState.PENDING))

    @_database_errors
    def _set_delivery(self, delivery_id: int, **values) -> None:
        with self._session.begin() as s:
            s.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))

    def mark_delivered(self, delivery_id: int) -> None:
        now = utcnow()
        self._set_delivery(
            delivery_id,
            state=DeliveryState.DELIVERED,
            delivered_at=now,
            last_attempt_at=now,
            last_error=None,
            attempts=Delivery.attempts + 1,
        )

    def mark_retry(self, delivery_id: int, next_attempt_at: datetime, error: str) -> None:
        self._set_delivery(
            delivery_id,
            next_attempt_at=next_attempt_at,
            last_error=error[:2000],
            last_attempt_at=utcnow(),
            attempts=Delivery.attempts + 1,
        )

    def mark_failed(self, delivery_id: int, error: str) -> None:
        self._set_delivery(
            delivery_id,
            state=DeliveryState.FAILED,
            last_error=error[:2000],
            last_attempt_at=utcnow(),
            attempts=Delivery.attempts + 1,
        )

    @_database_errors
    def retry_failed(self, delivery_id: int | None = None) -> int:
        """Re-queue every failed delivery, or only ``delivery_id`` (operator actions: ``dicom-node retry``, the
        console's button); returns how many (0: that delivery is not failed)."""
        failed = Delivery.state == DeliveryState.FAILED
        which = failed if delivery_id is None else and_(failed, Delivery.id == delivery_id)
        with self._session.begin() as s:
            return _rowcount(
                s.execute(
                    update(Delivery)
                    .where(which)
                    .values(state=DeliveryState.PENDING, next_attempt_at=utcnow(), attempts=0)
                )
            )

    @_database_errors
    def findings_by_class(self) -> dict[str, int]:
        """Findings reported so far (by the studies still stored), per class label."""
        with self._session() as s:
            return {
                str(k): int(n) for k, n in s.execute(select(FindingRow.label, func.count()).group_by(FindingRow.label))
            }

    @_database_errors
    def is_own_output(self, sop_uid: str) -> bool:
        with self._session() as s:
            # COUNT(*) always yields one row, so the scalar is never None (likewise in status())
            n = cast(int, s.scalar(select(func.count()).select_from(Result).where(Result.sop_instance_uid == sop_uid)))
            return n > 0

    # ---- reporting ---------------------------------------------------------------------------------
    @_database_errors
    def deliveries_by_destination(self) -> dict[tuple[str, str], int]:
        with self._session() as s:
            rows = s.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            )
            return {(str(d), str(st)): int(n) for d, st, n in rows}

    @_database_errors
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

    # ---- workers -------------------------------------------------------------------------------------
    @_database_errors
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

    @_database_errors
    def worker_stopped(self, name: str) -> None:
        with self._session.begin() as s:
            s.execute(update(WorkerRow).where(WorkerRow.name == name).values(state="stopped", current_job=None))

    @_database_errors
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

    # ---- retention -----------------------------------------------------------------------------------
    def _nothing_waits(self):
        """SQL condition on Study: nothing waits for this study any more - no timer, no queued or running job, no
        delivery pending or failed (a failed one waits for `dicom-node retry`)."""
        busy_jobs = select(Job.study_uid).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        open_deliveries = (
            select(Result.study_uid)
            .join(Delivery, Delivery.result_id == Result.id)
            .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]))
        )
        return and_(
            Study.stable_due_at.is_(None), Study.study_uid.not_in(busy_jobs), Study.study_uid.not_in(open_deliveries)
        )

    @_database_errors
    def purgeable_studies(self, received_before: datetime | None = None, limit: int = 100) -> list[str]:
        """Studies nothing waits for (see ``_nothing_waits``), the one whose last image came longest ago first;
        with ``received_before``, only those whose last image came before it."""
        q = select(Study.study_uid).where(self._nothing_waits())
        if received_before is not None:
            q = q.where(Study.last_received_at < received_before)
        with self._session() as s:
            return list(s.scalars(q.order_by(Study.last_received_at, Study.study_uid).limit(limit)))

    @_database_errors
    def purge_study(self, study_uid: str) -> tuple[int, int, int]:
        """Remove a study nothing waits for, rows and files together: returns (instances, results, bytes), or
        (0, 0, 0) when something started waiting for it meanwhile (an image arrived, a re-analysis was queued).

        In one transaction the study row is locked (PostgreSQL: an image or a re-analysis for it waits), the
        conditions are checked again and the rows deleted; after the commit the files are deleted. A crash in
        between leaves files no row references (set aside at the next start), never a row without its file."""
        with self._session.begin() as s:
            locked = s.scalar(select(Study.study_uid).where(Study.study_uid == study_uid).with_for_update())
            still = locked and s.scalar(
                select(Study.study_uid).where(Study.study_uid == study_uid, self._nothing_waits())
            )
            if not still:
                return 0, 0, 0
            instances = s.scalars(select(Instance.path).where(Instance.study_uid == study_uid)).all()
            results = s.scalars(select(Result.path).where(Result.study_uid == study_uid)).all()
            result_ids = select(Result.id).where(Result.study_uid == study_uid)
            s.execute(delete(Delivery).where(Delivery.result_id.in_(result_ids)))
            s.execute(delete(Result).where(Result.study_uid == study_uid))
            s.execute(delete(FindingRow).where(FindingRow.study_uid == study_uid))
            s.execute(delete(ImageResult).where(ImageResult.study_uid == study_uid))
            s.execute(delete(Instance).where(Instance.study_uid == study_uid))
            s.execute(delete(Job).where(Job.study_uid == study_uid))
            s.execute(delete(Study).where(Study.study_uid == study_uid))
        size = 0
        for p in map(Path, [*instances, *results]):
            try:
                size += p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # the rows are gone: the file is set aside at the next start
                log.error("retention: could not delete %s (%s)", p.name, exc.strerror)
        return len(instances), len(results), size

    @_database_errors
    def record_purge(self, reason: str, studies: int, instances: int, results: int, size: int) -> None:
        with self._session.begin() as s:
            s.add(
                Purge(
                    run_at=utcnow(),
                    reason=reason,
                    studies=studies,
                    instances=instances,
                    results=results,
                    bytes=size,
                )
            )

    @_database_errors
    def status(self) -> dict:
        """Counts by state and the latest activity; no patient identifiers (there are none in the DB)."""

        def counts(s: Session, col, states) -> dict:
            got: dict[Any, int] = dict(s.execute(select(col, func.count()).group_by(col)).all())
            return {str(k): int(got.get(k, 0)) for k in states}

        def iso(t: datetime | None) -> str | None:
            return t.replace(tzinfo=UTC).isoformat() if t else None

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
            }
