"""Removing what nothing needs any more: :class:`PurgeStore` purges studies nothing waits for (the retention
rules that pick them are in :mod:`storage.retention`) and sets aside spool files no row references (after a crash).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, delete, select

from storage.base import StoreBase, database_errors, utcnow
from storage.db import Delivery, FindingRow, ImageResult, Instance, Job, Purge, Result, Study
from storage.errors import StorageError
from storage.states import DeliveryState, JobState

log = logging.getLogger(__name__)


class PurgeStore(StoreBase):
    """The retention and spool-cleanup part of the Store."""

    # ---- unreferenced files --------------------------------------------------------------------------
    @database_errors
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

    @database_errors
    def purgeable_studies(self, received_before: datetime | None = None, limit: int = 100) -> list[str]:
        """Studies nothing waits for (see ``_nothing_waits``), the one whose last image came longest ago first;
        with ``received_before``, only those whose last image came before it."""
        q = select(Study.study_uid).where(self._nothing_waits())
        if received_before is not None:
            q = q.where(Study.last_received_at < received_before)
        with self._session() as s:
            return list(s.scalars(q.order_by(Study.last_received_at, Study.study_uid).limit(limit)))

    @database_errors
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
        for p in map(self.spool.resolve, [*instances, *results]):
            try:
                size += p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # the rows are gone: the file is set aside at the next start
                log.error("retention: could not delete %s (%s)", p.name, exc.strerror)
        return len(instances), len(results), size

    @database_errors
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
