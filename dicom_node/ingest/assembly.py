"""Study assembly: every received instance re-arms its study's "stable" timer (apscheduler).

When the timer fires, the study's eligible instances become one queued analysis job (storage decides that
atomically). Timers live in the database (studies.stable_due_at), so they are re-armed after a restart.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from storage import Store
from storage.base import to_local, utcnow

log = logging.getLogger(__name__)


class StudyAssembler:
    def __init__(self, store: Store, scheduler: BackgroundScheduler):
        self.store = store
        self.scheduler = scheduler

    def arm(self, study_uid: str, due_at: datetime) -> None:
        run_at = to_local(max(due_at, utcnow()))  # due_at is on the database's clock, the scheduler on this host's
        self.scheduler.add_job(
            self._fire,
            "date",
            run_date=run_at,
            args=[study_uid],
            id=f"study:{study_uid}",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )

    def restore(self) -> int:
        """Re-arm the timers of studies that were still receiving when the node stopped."""
        pending = self.store.pending_study_timers()
        for study_uid, due in pending:
            self.arm(study_uid, due)
        return len(pending)

    def fire_overdue(self, grace_s: float) -> int:
        """Make jobs of studies whose timer is more than ``grace_s`` overdue: their listener stopped before its
        timer fired (the leader sweeps for these; study_stable is atomic, so a timer firing too does no harm).
        Returns how many studies became jobs."""
        late = utcnow() - timedelta(seconds=grace_s)
        fired = 0
        for study_uid, due in self.store.pending_study_timers():
            if due <= late and self.store.study_stable(study_uid) is not None:
                fired += 1
        return fired

    def _fire(self, study_uid: str) -> None:
        try:
            job_id = self.store.study_stable(study_uid)
        except Exception:
            log.exception("study assembly failed; retrying in 5 s")
            self.arm(study_uid, utcnow() + timedelta(seconds=5))
            return
        if job_id is not None:
            log.info("study stable: job %d queued", job_id)
            return
        # Not cleared: the timer was re-armed by a later instance (its own arm() may have raced with ours).
        due = self.store.study_due_at(study_uid)
        if due is not None:
            self.arm(study_uid, due)
