"""Receiving and assembling studies: :class:`IngestStore` stores each received instance durably (spool file
fsync'd, row committed) and turns a study whose timer fired into a job (also an operator's re-analysis);
:class:`InstanceMeta` and :class:`Stored` are what goes in and comes out of ``add_instance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.base import UPSERT, StoreBase, database_errors, rowcount, utcnow
from storage.db import Instance, Job, Study
from storage.errors import DiskFullError, UnknownStudyError
from storage.states import JobState, QueuePriority


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
    # the acquiring device and the study's date and accession number ("" = not in the header)
    manufacturer: str = ""
    model_name: str = ""
    station_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    # the sender's urgent request ("STAT", "HIGH", both; "" = none): the study's job is queued urgent
    requested_priority: str = ""


@dataclass(frozen=True)
class Stored:
    duplicate: bool
    path: Path
    stable_due_at: datetime | None


class IngestStore(StoreBase):
    """Instances in, jobs out: the ingest and study-assembly part of the Store."""

    @database_errors
    def __init__(self, database_url: str, root: Path, min_free_disk_mb: float = 0, owner: str = ""):
        super().__init__(database_url, root, min_free_disk_mb, owner)
        # Built once: these run for every received image, before its C-STORE is answered (Core, cached SQL).
        upsert = UPSERT[self.engine.dialect.name](Study)
        self._study_upsert = upsert.on_conflict_do_update(
            index_elements=[Study.study_uid],
            set_={
                "last_received_at": upsert.excluded.last_received_at,
                # a skipped instance (no due time) leaves the study's timer as it is
                "stable_due_at": func.coalesce(upsert.excluded.stable_due_at, Study.stable_due_at),
            },
        )
        self._instance_insert = insert(Instance)

    # ---- ingest ------------------------------------------------------------------------------------
    @database_errors
    def has_instance(self, sop_uid: str) -> bool:
        with self._session() as s:
            return s.get(Instance, sop_uid) is not None

    @database_errors
    def instance_file(self, sop_uid: str) -> Path | None:
        with self._session() as s:
            path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
            return self.spool.resolve(path) if path is not None else None

    @database_errors
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
                    {
                        **meta.__dict__,
                        "size_bytes": size,
                        "path": self.spool.relative(final),
                        "received_at": now,
                        "job_id": None,
                    },
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
    @database_errors
    def pending_study_timers(self) -> list[tuple[str, datetime]]:
        with self._session() as s:
            rows = s.execute(select(Study.study_uid, Study.stable_due_at).where(Study.stable_due_at.is_not(None)))
            return [(r[0], cast(datetime, r[1])) for r in rows]  # not None: filtered by the WHERE

    @database_errors
    def study_complete(self, study_uid: str, now: datetime | None = None) -> datetime | None:
        """The whole study arrived at once (one STOW-RS request, one WADO-RS retrieve): a timer still running is
        due now, with no stability wait. Returns the new due time, or None when no timer runs (nothing eligible)."""
        now = now or utcnow()
        with self._session.begin() as s:
            changed = rowcount(
                s.execute(
                    update(Study)
                    .where(Study.study_uid == study_uid, Study.stable_due_at.is_not(None))
                    .values(stable_due_at=now)
                )
            )
        return now if changed else None

    @database_errors
    def study_due_at(self, study_uid: str) -> datetime | None:
        with self._session() as s:
            return s.scalar(select(Study.stable_due_at).where(Study.study_uid == study_uid))

    @database_errors
    def study_stable(self, study_uid: str, now: datetime | None = None) -> int | None:
        """The study's timer fired: hand its not-yet-covered eligible instances to a job.

        Returns the job id, or None when the timer was re-armed meanwhile or nothing new is eligible.
        A job still queued for the study absorbs the new instances instead of a second job being made. The job
        is urgent (claimed before routine ones) when the sender asked for any of its new instances urgently."""
        now = now or utcnow()
        with self._session.begin() as s:
            cleared = rowcount(
                s.execute(
                    update(Study)
                    .where(Study.study_uid == study_uid, Study.stable_due_at <= now)
                    .values(stable_due_at=None)
                )
            )
            if not cleared:
                return None
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.requested_priority).where(
                    Instance.study_uid == study_uid, Instance.eligible.is_(True), Instance.job_id.is_(None)
                )
            ).all()
            if not rows:
                return None
            new = [r[0] for r in rows]
            priority = QueuePriority.URGENT if any(r[1] for r in rows) else QueuePriority.ROUTINE
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
                    priority=priority,
                )
                s.add(job)
                s.flush()
            elif priority < job.priority:
                job.priority = priority
            s.execute(update(Instance).where(Instance.sop_instance_uid.in_(new)).values(job_id=job.id))
            return job.id

    @database_errors
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
            requested = s.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True), Instance.requested_priority != "")
            )
            job = Job(
                study_uid=study_uid,
                state=JobState.QUEUED,
                created_at=utcnow(),
                reason="re-analysis requested",
                priority=QueuePriority.URGENT if requested else QueuePriority.ROUTINE,
            )
            s.add(job)
            s.flush()
            s.execute(
                update(Instance)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
                .values(job_id=job.id)
            )
            return job.id
