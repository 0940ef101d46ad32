"""What drift watching reads (:class:`DriftStore`): the reference of a model pair's latest site validation, and the
live results since a date, per device and per ISO week or over a rolling window.

**Live** means received over DICOM in normal operation: studies a backfill pulled from the archive
(``backfill_studies``) are retrospective and left out, and so is everything received before the end of the
validation period (that is the reference). One study counts once per device: its latest done job's results, the
analysable image with the highest P(abnormal) (a study is as abnormal as its most abnormal image; the same choice
as :meth:`storage.validation.ValidationStore.validation_cases` makes for the reference). Only results of the
given model pair count (``jobs.models`` names each file by its sha256's first 8 hex digits).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from storage.base import StoreBase, database_errors, utcnow
from storage.db import BackfillStudy, ImageResult, Instance, Job
from storage.devices import device_label
from storage.states import JobState
from storage.validation import newest_of_pair


@dataclass(frozen=True)
class LiveStudy:
    """One live study's result on one device."""

    study_uid: str
    device: str
    received_at: datetime  # its latest image's
    p_raw: float  # the classifier's raw P(abnormal) of the study's most abnormal image
    p_abnormal: float  # that image's calibrated P (0.5 = the operating point of its view): the highest
    abnormal: bool  # the study was flagged (any image reported abnormal)

    @property
    def week(self) -> str:
        """ISO week of receipt, e.g. ``2026-W48``."""
        year, week, _ = self.received_at.isocalendar()
        return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class DriftReference:
    """A validation's reference distribution: device label (and "*") -> the raw P of each validated case."""

    validation_id: int
    created_at: datetime
    period_start: datetime | None
    period_end: datetime | None
    classifier_sha256: str
    detector_sha256: str
    values: dict[str, list[float]]

    @property
    def live_since(self) -> datetime | None:
        """Live traffic starts after the validation period (its end, else the validation's own date)."""
        return self.period_end or self.created_at


class DriftStore(StoreBase):
    """The drift-watching reads of the Store."""

    @database_errors
    def drift_reference(self, classifier_sha256: str, detector_sha256: str) -> DriftReference | None:
        """The reference of the newest validation of this model pair; None when it has none (or it kept no
        reference: ``details`` without ``"reference"``)."""
        with self._session() as s:
            row = s.scalars(newest_of_pair(classifier_sha256, detector_sha256)).first()
        if row is None:
            return None
        try:
            details = json.loads(row.details or "{}")
        except ValueError:
            return None
        ref = details.get("reference") if isinstance(details, dict) else None
        if not isinstance(ref, dict) or not ref:
            return None
        values = {
            str(device): [float(p) for p in ps if p is not None] for device, ps in ref.items() if isinstance(ps, list)
        }
        return DriftReference(
            row.id,
            row.created_at,
            row.period_start,
            row.period_end,
            row.classifier_sha256,
            row.detector_sha256,
            values,
        )

    @database_errors
    def live_studies(
        self,
        since: datetime,
        until: datetime | None = None,
        classifier_sha256: str | None = None,
        detector_sha256: str | None = None,
    ) -> list[LiveStudy]:
        """Live studies received in ``[since, until)`` (``until`` None: up to now), oldest first; only results
        made by the given model files when their sha256s are given."""
        latest = (
            select(Job.study_uid, func.max(Job.id).label("job_id"))
            .where(Job.state == JobState.DONE)
            .group_by(Job.study_uid)
            .subquery()
        )
        q = (
            select(
                ImageResult.study_uid,
                Instance.manufacturer,
                Instance.model_name,
                Instance.station_name,
                Instance.received_at,
                ImageResult.p_raw,
                ImageResult.p_abnormal,
                ImageResult.abnormal,
            )
            .join(latest, latest.c.job_id == ImageResult.job_id)
            .join(Job, Job.id == ImageResult.job_id)
            .join(Instance, Instance.sop_instance_uid == ImageResult.sop_instance_uid)
            .where(
                Instance.received_at >= since,
                ImageResult.p_raw.is_not(None),
                ImageResult.p_abnormal.is_not(None),
                ImageResult.not_analysable.is_(None),
                ~select(BackfillStudy.study_uid).where(BackfillStudy.study_uid == ImageResult.study_uid).exists(),
            )
        )
        if until is not None:
            q = q.where(Instance.received_at < until)
        for sha in (classifier_sha256, detector_sha256):
            if sha:
                q = q.where(Job.models.contains(f"({sha[:8].lower()})"))
        per_study: dict[tuple[str, str], list[tuple[datetime, float, float, bool]]] = defaultdict(list)
        with self._session() as s:
            for study_uid, make, model, station, received, p_raw, p_cal, abnormal in s.execute(q):
                if p_raw is None or p_cal is None or p_cal != p_cal:  # not judged (NaN: the same)
                    continue
                per_study[(study_uid, device_label(make, model, station))].append(
                    (received, float(p_raw), float(p_cal), bool(abnormal))
                )
        out = []
        for (study_uid, device), images in per_study.items():
            top = max(images, key=lambda i: i[2])
            out.append(
                LiveStudy(study_uid, device, max(i[0] for i in images), top[1], top[2], any(i[3] for i in images))
            )
        return sorted(out, key=lambda r: (r.received_at, r.study_uid))

    def live_by_week(
        self,
        since: datetime,
        classifier_sha256: str | None = None,
        detector_sha256: str | None = None,
        not_before: datetime | None = None,
    ) -> dict[str, dict[str, list[LiveStudy]]]:
        """:meth:`live_studies` since ``since`` (and after ``not_before``, the end of the validation period),
        grouped: ISO week -> device -> its studies (weeks in order)."""
        out: dict[str, dict[str, list[LiveStudy]]] = {}
        for r in self.live_studies(since, None, classifier_sha256, detector_sha256):
            if not_before is None or r.received_at > not_before:
                out.setdefault(r.week, {}).setdefault(r.device, []).append(r)
        return out

    def drift_window(
        self,
        window_days: float = 7,
        not_before: datetime | None = None,
        classifier_sha256: str | None = None,
        detector_sha256: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, list[LiveStudy]]:
        """The rolling current window: device -> its live studies of the last ``window_days`` days, only those
        received after ``not_before`` (the end of the validation period)."""
        since = (now or utcnow()) - timedelta(days=window_days)
        if not_before is not None and not_before > since:
            since = not_before
        out: dict[str, list[LiveStudy]] = {}
        for r in self.live_studies(since, None, classifier_sha256, detector_sha256):
            if not_before is None or r.received_at > not_before:
                out.setdefault(r.device, []).append(r)
        return out
