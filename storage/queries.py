"""Read-only views of the database for the web console: the overview, the studies list and a study's page.

Every list is paged and every query is indexed, so a page costs the same with 10 or 10,000 studies stored
(``bench/console.py``). Nothing here writes; the console's two actions (re-analyse a study, retry a delivery)
are :class:`storage.Store` methods like the CLI's.

The boundary with the Store: the node-wide numbers that ``status`` and ``/metrics`` report too are the Store's
(:mod:`storage.reporting`), and a page that shows one calls it there (``destinations`` uses
``deliveries_by_destination``); what only the console shows - pages of studies, a study's detail, throughput
bins, the workers' table, destination health - is here. Each query has one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import Session

from storage.base import database_errors, utcnow
from storage.db import Delivery, FindingRow, ImageResult, Instance, Job, Result, Study, WorkerRow
from storage.jobs import worker_state
from storage.repository import Store
from storage.states import JobState, QueuePriority

STUDY_STATES = ("receiving", *JobState, "skipped")  # a study is receiving, in its latest job's state, or skipped
THROUGHPUT_BIN_S = 300  # the overview's last hour in 5-minute bins


def aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None else None


@dataclass
class StudyRow:
    study_uid: str
    first_received_at: datetime
    last_received_at: datetime
    state: str
    job_id: int | None
    instances: int = 0
    eligible: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    abnormal: bool | None = None  # the latest done job's verdict (any image abnormal)
    findings: int = 0
    urgent: bool = False  # the latest job's priority (queued urgent by the sender, or found urgent once done)


@dataclass
class StudyPage:
    rows: list[StudyRow]
    total: int
    page: int
    pages: int


@dataclass
class StudyDetail:
    study: Study
    state: str
    instances: list[Instance]
    jobs: list[Job]
    images: list[ImageResult]  # of the latest done job
    findings: list[FindingRow]  # of the latest done job
    results: list[Result]  # of the latest done job
    deliveries: list[tuple[Delivery, Result]]  # of every job, newest first


@dataclass
class DestinationHealth:
    name: str
    last_success_at: datetime | None = None
    last_error_at: datetime | None = None
    last_error: str | None = None
    by_state: dict[str, int] = field(default_factory=dict)


class Queries:
    """The console's reads, on a :class:`Store`'s engine."""

    def __init__(self, store: Store):
        self.store = store
        self._session = store._session

    # ---- studies --------------------------------------------------------------------------------------
    @staticmethod
    def _studies_with_state():
        """SELECT study, its latest job's id, its state (receiving, the latest job's state, or skipped when no
        image of it was eligible): one definition for the list, its filter and a study's page."""
        latest = select(Job.study_uid, func.max(Job.id).label("job_id")).group_by(Job.study_uid).subquery()
        has_eligible = exists().where(Instance.study_uid == Study.study_uid, Instance.eligible.is_(True))
        state = case(
            (Study.stable_due_at.is_not(None), "receiving"),
            (Job.state.is_not(None), Job.state),
            (~has_eligible, "skipped"),
            else_="receiving",
        ).label("state")
        q = (
            select(Study, latest.c.job_id, state)
            .outerjoin(latest, latest.c.study_uid == Study.study_uid)
            .outerjoin(Job, Job.id == latest.c.job_id)
        )
        return q, state

    @database_errors
    def studies(
        self,
        page: int = 1,
        page_size: int = 50,
        state: str | None = None,
        received_on: str | None = None,
        skipped_reason: str | None = None,
    ) -> StudyPage:
        """Studies, the most recently received first, filtered by state, the day their last image came
        (``YYYY-MM-DD``, UTC) and text in an instance's skip reason."""
        q, state_expr = self._studies_with_state()
        if state:
            q = q.where(state_expr == state)
        if received_on:
            day = datetime.fromisoformat(received_on).replace(tzinfo=None)
            q = q.where(Study.last_received_at >= day, Study.last_received_at < day + timedelta(days=1))
        if skipped_reason:
            q = q.where(
                exists().where(
                    Instance.study_uid == Study.study_uid,
                    Instance.skip_reason.contains(skipped_reason, autoescape=True),
                )
            )
        with self._session() as s:
            total = int(s.scalar(select(func.count()).select_from(q.subquery())) or 0)
            pages = max(1, -(-total // page_size))
            page = min(max(page, 1), pages)
            got = s.execute(
                q.order_by(Study.last_received_at.desc(), Study.study_uid)
                .limit(page_size)
                .offset((page - 1) * page_size)
            ).all()
            rows = [
                StudyRow(st.study_uid, st.first_received_at, st.last_received_at, str(state_), job_id)
                for st, job_id, state_ in got
            ]
            self._fill(s, rows)
        return StudyPage(rows, total, page, pages)

    @staticmethod
    def _fill(s: Session, rows: list[StudyRow]) -> None:
        """Counts, skip reasons, priorities and verdicts of one page of studies (a few small queries)."""
        by_uid = {r.study_uid: r for r in rows}
        if not by_uid:
            return
        for uid, n, eligible in s.execute(
            select(Instance.study_uid, func.count(), func.sum(case((Instance.eligible.is_(True), 1), else_=0)))
            .where(Instance.study_uid.in_(by_uid))
            .group_by(Instance.study_uid)
        ):
            by_uid[uid].instances, by_uid[uid].eligible = int(n), int(eligible or 0)
        for uid, reason in s.execute(
            select(Instance.study_uid, Instance.skip_reason)
            .where(Instance.study_uid.in_(by_uid), Instance.skip_reason.is_not(None))
            .distinct()
        ):
            by_uid[uid].skip_reasons.append(str(reason))
        latest = {r.job_id: r for r in rows if r.job_id is not None}
        if latest:
            for job_id in s.scalars(select(Job.id).where(Job.id.in_(latest), Job.priority == QueuePriority.URGENT)):
                latest[job_id].urgent = True
        jobs = {r.job_id: r for r in rows if r.job_id is not None and r.state == JobState.DONE}
        if jobs:
            for job_id, abnormal in s.execute(
                select(ImageResult.job_id, func.max(case((ImageResult.abnormal.is_(True), 1), else_=0)))
                .where(ImageResult.job_id.in_(jobs))
                .group_by(ImageResult.job_id)
            ):
                jobs[job_id].abnormal = bool(abnormal)
            for job_id, n in s.execute(
                select(FindingRow.job_id, func.count()).where(FindingRow.job_id.in_(jobs)).group_by(FindingRow.job_id)
            ):
                jobs[job_id].findings = int(n)

    @database_errors
    def study(self, study_uid: str) -> StudyDetail | None:
        q, _ = self._studies_with_state()
        with self._session() as s:
            found = s.execute(q.where(Study.study_uid == study_uid)).first()
            if found is None:
                return None
            study, _, state = found
            instances = list(
                s.scalars(select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.received_at))
            )
            jobs = list(s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id.desc())))
            done = next((j for j in jobs if j.state == JobState.DONE), None)
            images: list[ImageResult] = []
            findings: list[FindingRow] = []
            results: list[Result] = []
            if done is not None:
                images = list(s.scalars(select(ImageResult).where(ImageResult.job_id == done.id)))
                findings = list(
                    s.scalars(select(FindingRow).where(FindingRow.job_id == done.id).order_by(FindingRow.score.desc()))
                )
                results = list(s.scalars(select(Result).where(Result.job_id == done.id).order_by(Result.id)))
            deliveries = [
                (d, r)
                for d, r in s.execute(
                    select(Delivery, Result)
                    .join(Result, Result.id == Delivery.result_id)
                    .where(Result.study_uid == study_uid)
                    .order_by(Delivery.id.desc())
                ).all()
            ]
        return StudyDetail(study, str(state), instances, jobs, images, findings, results, deliveries)

    @database_errors
    def result(self, result_id: int) -> Result | None:
        with self._session() as s:
            return s.get(Result, result_id)

    @database_errors
    def delivery_study(self, delivery_id: int) -> str | None:
        with self._session() as s:
            return s.scalar(
                select(Result.study_uid)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(Delivery.id == delivery_id)
            )

    # ---- overview -------------------------------------------------------------------------------------
    @database_errors
    def throughput(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """The last hour in 5-minute bins, oldest first: images received, jobs done, objects delivered."""
        now = now or utcnow()
        since = now - timedelta(hours=1)
        nbins = 3600 // THROUGHPUT_BIN_S
        counts: dict[str, list[int]] = {k: [0] * nbins for k in ("received", "analysed", "sent")}

        def add(times, key: str) -> None:
            for t in times:
                i = int((t - since).total_seconds() // THROUGHPUT_BIN_S)
                if 0 <= i < nbins:
                    counts[key][i] += 1

        with self._session() as s:
            add(s.scalars(select(Instance.received_at).where(Instance.received_at >= since)), "received")
            add(
                s.scalars(select(Job.finished_at).where(Job.finished_at >= since, Job.state == JobState.DONE)),
                "analysed",
            )
            add(s.scalars(select(Delivery.delivered_at).where(Delivery.delivered_at >= since)), "sent")
        return [
            {"start": aware(since + timedelta(seconds=i * THROUGHPUT_BIN_S)), **{k: v[i] for k, v in counts.items()}}
            for i in range(nbins)
        ]

    @database_errors
    def workers(self) -> list[dict[str, Any]]:
        now = utcnow()
        with self._session() as s:
            out = []
            for w in s.scalars(select(WorkerRow).order_by(WorkerRow.name)):
                out.append(
                    {
                        "name": w.name,
                        "state": worker_state(w.state, w.heartbeat_at, now),
                        "pid": w.pid,
                        "host": w.host,
                        "models": w.models,
                        "heartbeat_age_s": round((now - w.heartbeat_at).total_seconds(), 1),
                        "current_job": w.current_job,
                        "deaths": w.deaths,
                        "last_exit": w.last_exit,
                        "started_at": aware(w.started_at),
                    }
                )
            return out

    @database_errors
    def destinations(self, names: list[str]) -> list[DestinationHealth]:
        """Each configured destination's last success, last error and deliveries by state."""
        health = {n: DestinationHealth(n) for n in names}
        with self._session() as s:
            for (dest, st), n in self.store.deliveries_by_destination().items():
                health.setdefault(dest, DestinationHealth(dest)).by_state[st] = n
            for dest, t in s.execute(
                select(Delivery.destination, func.max(Delivery.delivered_at)).group_by(Delivery.destination)
            ):
                health.setdefault(dest, DestinationHealth(dest)).last_success_at = aware(t)
            last_error = (
                select(Delivery.destination, func.max(Delivery.last_attempt_at).label("at"))
                .where(Delivery.last_error.is_not(None))
                .group_by(Delivery.destination)
                .subquery()
            )
            for dest, t, err in s.execute(
                select(last_error.c.destination, last_error.c.at, func.max(Delivery.last_error))
                .join(
                    Delivery,
                    and_(Delivery.destination == last_error.c.destination, Delivery.last_attempt_at == last_error.c.at),
                )
                .group_by(last_error.c.destination, last_error.c.at)
            ):
                h = health.setdefault(dest, DestinationHealth(dest))
                h.last_error_at, h.last_error = aware(t), err
        return list(health.values())
