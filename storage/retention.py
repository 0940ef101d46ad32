"""Retention: the spool does not grow for ever.

Two rules, checked every ``check_interval_s`` by the node (``retention`` in the config):

- **Age.** With ``keep_days`` > 0, a study whose last image came more than that many days ago is removed.
- **Disk.** When the storage's filesystem is fuller than ``high_watermark_percent``, studies are removed, the
  one whose last image came longest ago first, until it is below ``low_watermark_percent`` or nothing more may
  be removed.

Only studies that nothing waits for are ever removed: no study timer running, no job queued or running, no
delivery pending or failed (a failed delivery waits for `dicom-node retry`). A study's rows and files go together
(:meth:`storage.purges.PurgeStore.purge_study`). Each run that removed something is recorded (``status`` shows
the totals) and logged, without identifiers. A study sent again after its removal is stored and analysed anew.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from storage.base import utcnow
from storage.errors import StorageError
from storage.repository import Store

log = logging.getLogger(__name__)

BATCH = 50  # studies looked up per round
MAX_PER_RUN = 1000  # studies one run of the disk rule removes at most (the next run goes on)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_days: float = 0.0  # 0 = no age limit
    high_watermark_percent: float = 0.0  # 0 = no disk rule
    low_watermark_percent: float = 0.0

    @property
    def active(self) -> bool:
        return self.keep_days > 0 or self.high_watermark_percent > 0


@dataclass
class PurgeReport:
    reason: str = ""
    studies: int = 0
    instances: int = 0
    results: int = 0
    bytes: int = 0

    def add(self, counts: tuple[int, int, int]) -> None:
        if counts[0] or counts[1]:
            self.studies += 1
            self.instances += counts[0]
            self.results += counts[1]
            self.bytes += counts[2]


def disk_used_percent(root: Path) -> float:
    """How full the filesystem is, as ``df`` shows it: used / (used + available to us)."""
    usage = shutil.disk_usage(root)
    room = usage.used + usage.free
    return 100.0 * usage.used / room if room else 0.0


class Purger:
    """Applies a :class:`RetentionPolicy` to a store. ``used_percent(root)`` reads the filesystem's fill level."""

    def __init__(
        self, store: Store, policy: RetentionPolicy, used_percent: Callable[[Path], float] = disk_used_percent
    ):
        self.store = store
        self.policy = policy
        self.used_percent = used_percent

    def run(self, now: datetime | None = None) -> list[PurgeReport]:
        """One check; returns what each rule removed (rules that removed nothing are left out)."""
        now = now or utcnow()
        reports = []
        if self.policy.keep_days > 0:
            cutoff = now - timedelta(days=self.policy.keep_days)
            report = PurgeReport(f"older than {self.policy.keep_days:g} days (retention.keep_days)")
            while batch := self.store.purgeable_studies(received_before=cutoff, limit=BATCH):
                before = report.studies
                for study_uid in batch:
                    report.add(self._purge(study_uid))
                if report.studies == before:
                    break  # all of them started waiting for something meanwhile, or could not be removed
            reports.append(report)
        if self.policy.high_watermark_percent > 0:
            root = self.store.spool.root
            used = self.used_percent(root)
            if used > self.policy.high_watermark_percent:
                report = PurgeReport(
                    f"disk {used:.0f} % full, above {self.policy.high_watermark_percent:g} % "
                    f"(retention.high_watermark_percent)"
                )
                freed_nothing = 0
                while used > self.policy.low_watermark_percent and report.studies < MAX_PER_RUN:
                    batch = self.store.purgeable_studies(limit=BATCH)
                    before = report.studies
                    for study_uid in batch:
                        counts = self._purge(study_uid)
                        report.add(counts)
                        freed_nothing = freed_nothing + 1 if counts[0] and not counts[2] else 0
                        used = self.used_percent(root)
                        if used <= self.policy.low_watermark_percent or freed_nothing >= 5:
                            break
                    if report.studies == before or freed_nothing >= 5:
                        break  # nothing more may be removed, or removing frees no space (files not where rows say)
                if used > self.policy.low_watermark_percent:
                    log.warning(
                        "retention: disk still %.0f %% full; every remaining study is waiting for a job or a "
                        "delivery (failed deliveries wait for `dicom-node retry`)",
                        used,
                    )
                reports.append(report)
        done = [r for r in reports if r.studies]
        return self._record(done)

    def _purge(self, study_uid: str) -> tuple[int, int, int]:
        """One study; a storage failure skips it (logged) instead of stopping every later run at the same study."""
        try:
            return self.store.purge_study(study_uid)
        except StorageError as exc:
            log.error("retention: a study could not be removed, skipped: %s", exc)
            return 0, 0, 0

    def _record(self, done: list[PurgeReport]) -> list[PurgeReport]:
        for r in done:
            self.store.record_purge(r.reason, r.studies, r.instances, r.results, r.bytes)
            log.info(
                "retention: removed %d studies (%d instances, %d results, %.1f MB): %s",
                r.studies,
                r.instances,
                r.results,
                r.bytes / 1e6,
                r.reason,
            )
        return done
