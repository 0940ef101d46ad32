"""Backfill runs: :class:`BackfillStore` records a retrospective pull from the PACS (``dicom-node backfill``), what
its search found, and each study's move (claimed atomically, retried with backoff, given up with a reason).

States (plain strings, as stored):

- a run: ``searching`` (the C-FIND is due at ``next_attempt_at``) -> ``moving`` -> ``done``; or ``failed`` (the
  PACS refused the search for good) or ``cancelled`` (an operator's ``--cancel``);
- a study: ``pending`` (due at ``next_attempt_at``) -> ``moving`` (a C-MOVE is under way since ``started_at``) ->
  ``moved``; or back to ``pending`` with a backoff, ``failed`` (given up, ``last_error`` says why) or ``skipped``
  (its run was cancelled before it was pulled).

A study is pulled once, whichever run found it: a search leaves alone the studies the node already holds and
those an earlier run pulled or is pulling (a failed or skipped one is taken over by the new run). Every state is
in the database, so a node killed at any moment resumes where it was: a study found ``moving`` at start-up is
moved again (the store ignores the instances it already has). A study present here is retrospective: its results
are never delivered (:meth:`storage.jobs.JobStore.finish_job`).

The exception is a **re-analysis fetch**: ``dicom-node reanalyze`` of a study the node does not hold (never
received, purged by retention, or its files gone) records a run of that one Study UID whose settings say
``deliver: true``. Its search takes the study whatever this table or the node's studies say (an earlier run's row,
moved or not, is taken over: pending again), and marks the row ``deliver``: its results are delivered as a live
study's. Such a move goes before a backfill's (:meth:`BackfillStore.next_due_move`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import and_, func, or_, select, update

from storage.base import StoreBase, database_errors, rowcount, utcnow
from storage.db import BackfillRun, BackfillStudy, Instance, Job, Study

RUN_STATES = ("searching", "moving", "done", "cancelled", "failed")
STUDY_STATES = ("pending", "moving", "moved", "failed", "skipped")
ACTIVE_RUN_STATES = ("searching", "moving")
ERROR_CHARS = 2000


@dataclass(frozen=True)
class FoundStudy:
    """One study a search found (what the C-FIND answer said of it)."""

    study_uid: str
    accession_number: str = ""
    study_date: str = ""
    expected_instances: int | None = None


@dataclass(frozen=True)
class RunToSearch:
    id: int
    attempts: int
    query: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class DueMove:
    """The next study to pull, with its run's settings (the run's bounds, if it set its own)."""

    study_uid: str
    run_id: int
    state: str
    attempts: int
    settings: dict[str, Any]
    deliver: bool = False  # a re-analysis fetch: its results are delivered


@dataclass(frozen=True)
class Holding:
    """What the node holds of a study: its instances, the eligible ones, and of those the ones whose file is gone."""

    instances: int
    eligible: int
    missing: int

    @property
    def analysable(self) -> bool:
        """Everything needed for a re-analysis is here (no fetch needed)."""
        return self.eligible > 0 and self.missing == 0


@dataclass(frozen=True)
class SearchOutcome:
    found: int  # distinct studies the PACS answered with
    new: int  # queued by this run
    already_held: int  # held by the node already, or pulled (or being pulled) by another run


@dataclass
class RunProgress:
    """One run as ``backfill --status``, the console and the CLI's progress bar show it (no identifiers)."""

    id: int
    state: str
    created_at: datetime
    finished_at: datetime | None
    query: dict[str, Any]
    settings: dict[str, Any]
    found: int
    already_held: int
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    studies: dict[str, int] = field(default_factory=dict)  # by state
    moved_instances: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # failed studies by reason
    retrying: int = 0  # pending studies whose last attempt failed

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE_RUN_STATES


class BackfillStore(StoreBase):
    """The backfill part of the Store."""

    # ---- runs ------------------------------------------------------------------------------------------
    @database_errors
    def create_backfill_run(self, query: dict[str, Any], settings: dict[str, Any]) -> int:
        """A new run, searching at once; returns its id."""
        now = utcnow()
        with self._session.begin() as s:
            run = BackfillRun(
                created_at=now,
                state="searching",
                query=json.dumps(query, sort_keys=True),
                settings=json.dumps(settings, sort_keys=True),
                next_attempt_at=now,
                attempts=0,
                found=0,
                already_held=0,
            )
            s.add(run)
            s.flush()
            return int(run.id)

    @database_errors
    def backfill_runs_to_search(self, now: datetime | None = None) -> list[RunToSearch]:
        now = now or utcnow()
        with self._session() as s:
            rows = s.scalars(
                select(BackfillRun)
                .where(
                    BackfillRun.state == "searching",
                    or_(BackfillRun.next_attempt_at.is_(None), BackfillRun.next_attempt_at <= now),
                )
                .order_by(BackfillRun.id)
            )
            return [RunToSearch(r.id, r.attempts, json.loads(r.query), json.loads(r.settings or "{}")) for r in rows]

    @database_errors
    def backfill_search_done(self, run_id: int, studies: list[FoundStudy]) -> SearchOutcome:
        """Queue what the search found, leaving alone what the node holds or another run pulled; the run moves on
        to ``moving`` (``done`` at once when there is nothing to pull)."""
        now = utcnow()
        unique = {f.study_uid: f for f in studies if f.study_uid}
        new = held = 0
        with self._session.begin() as s:
            run = s.get(BackfillRun, run_id)
            if run is None or run.state != "searching":  # cancelled meanwhile
                return SearchOutcome(len(unique), 0, 0)
            deliver = bool(json.loads(run.settings or "{}").get("deliver"))  # a re-analysis fetch
            uids = list(unique)
            known: dict[str, BackfillStudy] = {}
            stored: set[str] = set()
            for i in range(0, len(uids), 500):
                chunk = uids[i : i + 500]
                known.update(
                    {b.study_uid: b for b in s.scalars(select(BackfillStudy).where(BackfillStudy.study_uid.in_(chunk)))}
                )
                stored.update(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(chunk))))
            for uid, f in unique.items():
                row = known.get(uid)
                if row is not None and deliver:
                    # fetched again for a re-analysis (purged since an earlier pull, or its files gone): this run
                    # takes it over; a move under way goes on, now for this run
                    row.run_id, row.deliver, row.last_error, row.finished_at = run_id, True, None, None
                    if row.state != "moving":
                        row.state, row.attempts, row.next_attempt_at, row.started_at = "pending", 0, now, None
                    new += 1
                elif row is not None and row.state in ("failed", "skipped"):
                    # an earlier run gave it up or was cancelled before pulling it: this run tries again
                    row.run_id, row.state, row.attempts, row.last_error = run_id, "pending", 0, None
                    row.next_attempt_at, row.started_at, row.finished_at = now, None, None
                    row.deliver = False  # a backfill's pull: never delivered
                    new += 1
                elif row is not None or (uid in stored and not deliver):
                    held += 1
                else:
                    s.add(
                        BackfillStudy(
                            study_uid=uid,
                            run_id=run_id,
                            state="pending",
                            accession_number=f.accession_number[:64],
                            study_date=f.study_date[:8],
                            expected_instances=f.expected_instances,
                            moved_instances=0,
                            attempts=0,
                            next_attempt_at=now,
                            created_at=now,
                            deliver=deliver,
                        )
                    )
                    new += 1
            run.found, run.already_held = len(unique), held
            run.attempts, run.last_error, run.next_attempt_at = run.attempts + 1, None, None
            run.state = "moving" if new else "done"
            if not new:
                run.finished_at = now
        return SearchOutcome(len(unique), new, held)

    @database_errors
    def backfill_search_failed(self, run_id: int, error: str, retry_at: datetime | None) -> None:
        """The search failed: retried at ``retry_at``, or (None) the run failed for good."""
        values: dict[str, Any] = {"last_error": error[:ERROR_CHARS], "attempts": BackfillRun.attempts + 1}
        if retry_at is None:
            values.update(state="failed", finished_at=utcnow(), next_attempt_at=None)
        else:
            values.update(next_attempt_at=retry_at)
        with self._session.begin() as s:
            s.execute(
                update(BackfillRun).where(BackfillRun.id == run_id, BackfillRun.state == "searching").values(**values)
            )

    @database_errors
    def finish_backfill_runs(self) -> list[int]:
        """Runs whose every study is moved, failed or skipped are done; returns their ids."""
        now = utcnow()
        with self._session.begin() as s:
            open_ = select(BackfillStudy.run_id).where(BackfillStudy.state.in_(("pending", "moving")))
            ids = list(
                s.scalars(select(BackfillRun.id).where(BackfillRun.state == "moving", BackfillRun.id.not_in(open_)))
            )
            if ids:
                s.execute(update(BackfillRun).where(BackfillRun.id.in_(ids)).values(state="done", finished_at=now))
            return ids

    @database_errors
    def cancel_backfill_run(self, run_id: int) -> bool:
        """Stop a run: nothing more is searched or moved (a move under way finishes). False: no such active run."""
        now = utcnow()
        with self._session.begin() as s:
            got = rowcount(
                s.execute(
                    update(BackfillRun)
                    .where(BackfillRun.id == run_id, BackfillRun.state.in_(ACTIVE_RUN_STATES))
                    .values(state="cancelled", finished_at=now, next_attempt_at=None)
                )
            )
            if got:
                s.execute(
                    update(BackfillStudy)
                    .where(BackfillStudy.run_id == run_id, BackfillStudy.state == "pending")
                    .values(state="skipped", last_error="run cancelled", finished_at=now)
                )
            return bool(got)

    # ---- moves -----------------------------------------------------------------------------------------
    @database_errors
    def requeue_interrupted_moves(self) -> int:
        """At start-up: moves that were under way when the node stopped are due again now."""
        with self._session.begin() as s:
            return rowcount(
                s.execute(
                    update(BackfillStudy)
                    .where(BackfillStudy.state == "moving")
                    .values(state="pending", next_attempt_at=utcnow())
                )
            )

    @database_errors
    def next_due_move(self, stale_before: datetime, now: datetime | None = None) -> DueMove | None:
        """The next study to pull of a run that is moving: a pending one that is due, or one whose move started
        before ``stale_before`` and never finished; a re-analysis fetch first. :meth:`claim_move` takes it."""
        now = now or utcnow()
        with self._session() as s:
            row = s.execute(
                select(
                    BackfillStudy.study_uid,
                    BackfillStudy.run_id,
                    BackfillStudy.state,
                    BackfillStudy.attempts,
                    BackfillRun.settings,
                    BackfillStudy.deliver,
                )
                .join(BackfillRun, BackfillRun.id == BackfillStudy.run_id)
                .where(
                    BackfillRun.state == "moving",
                    or_(
                        and_(BackfillStudy.state == "pending", BackfillStudy.next_attempt_at <= now),
                        and_(BackfillStudy.state == "moving", BackfillStudy.started_at < stale_before),
                    ),
                )
                .order_by(
                    BackfillStudy.deliver.desc(),
                    BackfillStudy.next_attempt_at,
                    BackfillStudy.run_id,
                    BackfillStudy.study_uid,
                )
                .limit(1)
            ).first()
            if row is None:
                return None
            return DueMove(row[0], row[1], row[2], row[3], json.loads(row[4] or "{}"), bool(row[5]))

    @database_errors
    def claim_move(self, due: DueMove) -> bool:
        """Atomically mark ``due`` moving (False: another thread or process took it first)."""
        with self._session.begin() as s:
            return bool(
                rowcount(
                    s.execute(
                        update(BackfillStudy)
                        .where(
                            BackfillStudy.study_uid == due.study_uid,
                            BackfillStudy.state == due.state,
                            BackfillStudy.attempts == due.attempts,
                        )
                        .values(state="moving", started_at=utcnow(), attempts=BackfillStudy.attempts + 1)
                    )
                )
            )

    @database_errors
    def moves_started_since(self, since: datetime) -> int:
        """Studies whose (latest) move started at or after ``since``: what ``studies_per_hour`` bounds."""
        with self._session() as s:
            return cast(
                int,
                s.scalar(select(func.count()).select_from(BackfillStudy).where(BackfillStudy.started_at >= since)),
            )

    @database_errors
    def mark_moved(self, study_uid: str, moved_instances: int) -> None:
        with self._session.begin() as s:
            s.execute(
                update(BackfillStudy)
                .where(BackfillStudy.study_uid == study_uid, BackfillStudy.state == "moving")
                .values(state="moved", moved_instances=moved_instances, last_error=None, finished_at=utcnow())
            )

    @database_errors
    def mark_move_retry(self, study_uid: str, retry_at: datetime, error: str, moved_instances: int = 0) -> None:
        """The move failed and is tried again at ``retry_at`` (skipped instead when its run was cancelled)."""
        with self._session.begin() as s:
            row = s.get(BackfillStudy, study_uid)
            if row is None or row.state != "moving":
                return
            run = s.get(BackfillRun, row.run_id)
            row.last_error = error[:ERROR_CHARS]
            row.moved_instances = max(row.moved_instances or 0, moved_instances)
            if run is not None and run.state == "cancelled":
                row.state, row.finished_at = "skipped", utcnow()
            else:
                row.state, row.next_attempt_at = "pending", retry_at

    @database_errors
    def mark_move_failed(self, study_uid: str, error: str, moved_instances: int = 0) -> None:
        with self._session.begin() as s:
            s.execute(
                update(BackfillStudy)
                .where(BackfillStudy.study_uid == study_uid, BackfillStudy.state == "moving")
                .values(
                    state="failed",
                    last_error=error[:ERROR_CHARS],
                    moved_instances=moved_instances,
                    finished_at=utcnow(),
                )
            )

    # ---- what was pulled ---------------------------------------------------------------------------------
    @database_errors
    def is_retrospective(self, study_uid: str) -> bool:
        """Whether a backfill pulled (or is pulling) this study: its results are never delivered (a re-analysis
        fetch's are: not retrospective)."""
        with self._session() as s:
            row = s.get(BackfillStudy, study_uid)
            return row is not None and not row.deliver

    @database_errors
    def retrospective_studies(self, study_uids: list[str] | None = None) -> set[str]:
        """The studies of ``study_uids`` (or all) that a backfill pulled (not those fetched for a re-analysis)."""
        with self._session() as s:
            q = select(BackfillStudy.study_uid).where(BackfillStudy.deliver.is_(False))
            if study_uids is None:
                return set(s.scalars(q))
            out: set[str] = set()
            for i in range(0, len(study_uids), 500):
                out.update(s.scalars(q.where(BackfillStudy.study_uid.in_(study_uids[i : i + 500]))))
            return out

    # ---- re-analysis fetches -------------------------------------------------------------------------------
    @database_errors
    def study_holding(self, study_uid: str) -> Holding:
        """What the node holds of a study (``dicom-node reanalyze`` fetches it when nothing eligible is held, or
        when an eligible instance's file is gone)."""
        with self._session() as s:
            rows = s.execute(select(Instance.eligible, Instance.path).where(Instance.study_uid == study_uid)).all()
        eligible = [path for ok, path in rows if ok]
        missing = sum(1 for path in eligible if not self.spool.resolve(path).is_file())
        return Holding(len(rows), len(eligible), missing)

    @database_errors
    def fetched_study_needs_job(self, study_uid: str) -> bool:
        """After a re-analysis fetch moved ``study_uid``: True when no job will analyse it by itself, because every
        instance was one the node had a row for already (its file was gone, and is back): no study timer runs and
        no job was made since the move started. The caller queues the re-analysis."""
        with self._session() as s:
            row = s.get(BackfillStudy, study_uid)
            study = s.get(Study, study_uid)
            if row is None or not row.deliver or study is None or study.stable_due_at is not None:
                return False
            since = row.started_at or row.created_at
            newer = s.scalar(
                select(func.count()).select_from(Job).where(Job.study_uid == study_uid, Job.created_at >= since)
            )
            eligible = s.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.study_uid == study_uid, Instance.eligible.is_(True))
            )
            return not newer and bool(eligible)

    # ---- progress ----------------------------------------------------------------------------------------
    @database_errors
    def backfill_progress(self, run_id: int | None = None, limit: int = 20) -> list[RunProgress]:
        """The run ``run_id``, or the latest ``limit`` runs (newest first), with their studies' counts."""
        with self._session() as s:
            q = select(BackfillRun).order_by(BackfillRun.id.desc())
            q = q.where(BackfillRun.id == run_id) if run_id is not None else q.limit(limit)
            runs = {
                r.id: RunProgress(
                    id=r.id,
                    state=r.state,
                    created_at=r.created_at,
                    finished_at=r.finished_at,
                    query=json.loads(r.query),
                    settings=json.loads(r.settings or "{}"),
                    found=r.found or 0,
                    already_held=r.already_held or 0,
                    attempts=r.attempts or 0,
                    last_error=r.last_error,
                    next_attempt_at=r.next_attempt_at,
                    studies={state: 0 for state in STUDY_STATES},
                )
                for r in s.scalars(q)
            }
            if not runs:
                return []
            ids = list(runs)
            for rid, state, n, inst in s.execute(
                select(
                    BackfillStudy.run_id,
                    BackfillStudy.state,
                    func.count(),
                    func.coalesce(func.sum(BackfillStudy.moved_instances), 0),
                )
                .where(BackfillStudy.run_id.in_(ids))
                .group_by(BackfillStudy.run_id, BackfillStudy.state)
            ):
                runs[rid].studies[str(state)] = int(n)
                if state == "moved":
                    runs[rid].moved_instances = int(inst)
            for rid, state, error, n in s.execute(
                select(BackfillStudy.run_id, BackfillStudy.state, BackfillStudy.last_error, func.count())
                .where(
                    BackfillStudy.run_id.in_(ids),
                    BackfillStudy.state.in_(("failed", "pending")),
                    BackfillStudy.last_error.is_not(None),
                )
                .group_by(BackfillStudy.run_id, BackfillStudy.state, BackfillStudy.last_error)
            ):
                if state == "failed":
                    runs[rid].errors[str(error)] = int(n)
                else:
                    runs[rid].retrying += int(n)
            return list(runs.values())

    @database_errors
    def backfill_counts(self) -> dict[str, dict[str, int]]:
        """Runs and studies by state, and what is waiting for a retry (``/metrics``, the console)."""
        with self._session() as s:
            runs = dict(s.execute(select(BackfillRun.state, func.count()).group_by(BackfillRun.state)).all())
            studies = dict(s.execute(select(BackfillStudy.state, func.count()).group_by(BackfillStudy.state)).all())
            search_retrying = cast(
                int,
                s.scalar(
                    select(func.count())
                    .select_from(BackfillRun)
                    .where(BackfillRun.state == "searching", BackfillRun.last_error.is_not(None))
                ),
            )
            move_retrying = cast(
                int,
                s.scalar(
                    select(func.count())
                    .select_from(BackfillStudy)
                    .where(BackfillStudy.state == "pending", BackfillStudy.last_error.is_not(None))
                ),
            )
        return {
            "runs": {st: int(runs.get(st, 0)) for st in RUN_STATES},
            "studies": {st: int(studies.get(st, 0)) for st in STUDY_STATES},
            "retrying": {"search": search_retrying, "move": move_retrying},
        }
