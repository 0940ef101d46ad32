"""Site ground truth and site validations: :class:`ValidationStore`.

- Ground truth (table ``ground_truth``): rows imported from a site's CSV (``dicom-node ground-truth import``), and an
  operator's verdict on a study in the console (agree / disagree / finding missed), whose label is derived from the
  study's current result. A row names its study by Study UID or by accession number (matched through
  ``instances.accession_number``); the newest row of a study counts.
- Validation cases: one per study that has a done result made by a given model pair (``jobs.models`` names each
  model's sha256 prefix) and ground truth: the study's score is the highest P(abnormal) over its analysable
  images, with that image's raw probability and view, the acquiring device, the month and whether a backfill
  pulled it (retrospective) or it came in live.
- Validations (table ``validations``): what ``dicom-node validate`` measured, per model pair.

Plain fields in and out; the statistics are the caller's (storage never imports inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, or_, select

from storage.base import StoreBase, database_errors, utcnow
from storage.db import BackfillStudy, GroundTruth, ImageResult, Instance, Job, Study, Validation
from storage.devices import device_label
from storage.errors import UnknownStudyError
from storage.states import JobState

VERDICTS = ("agree", "disagree", "missed")


@dataclass(frozen=True)
class TruthRow:
    """One ground-truth statement: a study (by Study UID or accession number), normal or abnormal, findings."""

    abnormal: bool
    study_uid: str | None = None
    accession_number: str | None = None
    findings: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class ValidationCase:
    """One study with a done result of the model pair and ground truth."""

    study_uid: str
    label: int  # 1 abnormal, 0 normal (the newest ground truth of the study)
    p_abnormal: float  # the study's score: the highest calibrated P(abnormal) over its analysable images
    p_raw: float | None  # that image's raw probability (None for results made before it was kept)
    view: str  # that image's ViewPosition ("" when none)
    device: str  # storage.devices.device_label of that image's device
    month: str  # YYYY-MM of the study date, else of the day the image was received
    study_date: date  # the study date, else the day received
    received_at: datetime
    retrospective: bool  # pulled by a backfill (never delivered), else live traffic
    truth_source: str  # "csv:<file>" or "console:<user>"


@dataclass(frozen=True)
class VerdictRecord:
    study_uid: str
    verdict: str
    abnormal: bool  # the label recorded
    node_abnormal: bool | None  # what the node's current result says (None: no result)
    findings: tuple[str, ...]


def _day(study_date: str, received_at: datetime) -> date:
    if len(study_date) == 8 and study_date.isdigit():
        try:
            return date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:]))
        except ValueError:
            pass
    return received_at.date()


def made_by(models: str | None, classifier_sha256: str, detector_sha256: str) -> bool:
    """Whether a job's ``models`` text (``classifier ... (4f2a9c1b); detector ... (a1b2c3d4)``) names both."""
    text = models or ""
    return f"({classifier_sha256[:8].lower()})" in text and f"({detector_sha256[:8].lower()})" in text


def newest_of_pair(classifier_sha256: str, detector_sha256: str) -> Select[Validation]:
    """The query for the newest validation of exactly this model pair (another sha256 has none)."""
    return (
        select(Validation)
        .where(
            Validation.classifier_sha256 == classifier_sha256.lower(),
            Validation.detector_sha256 == detector_sha256.lower(),
        )
        .order_by(Validation.created_at.desc(), Validation.id.desc())
        .limit(1)
    )


class ValidationStore(StoreBase):
    """Ground truth, validation cases and recorded validations."""

    # ---- ground truth -----------------------------------------------------------------------------------
    @database_errors
    def import_ground_truth(self, rows: list[TruthRow], source: str) -> tuple[int, int]:
        """Add the rows (newer than any earlier row of the same study); returns (rows added, of them how many name
        a study this node holds)."""
        now = utcnow()
        with self._session.begin() as s:
            for r in rows:
                s.add(
                    GroundTruth(
                        study_uid=r.study_uid or None,
                        accession_number=r.accession_number or None,
                        abnormal=bool(r.abnormal),
                        findings="; ".join(r.findings),
                        verdict=None,
                        source=source[:200],
                        note=r.note,
                        created_at=now,
                    )
                )
            uids = {r.study_uid for r in rows if r.study_uid}
            accessions = {r.accession_number for r in rows if r.accession_number}
            held_uids: set[str] = set()
            held_acc: set[str] = set()
            for chunk in _chunks(sorted(uids)):
                held_uids |= set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(chunk))))
            for chunk in _chunks(sorted(accessions)):
                held_acc |= set(
                    s.scalars(select(Instance.accession_number).where(Instance.accession_number.in_(chunk)).distinct())
                )
        matched = sum(1 for r in rows if (r.study_uid and r.study_uid in held_uids) or (r.accession_number in held_acc))
        return len(rows), matched

    @database_errors
    def record_verdict(
        self, study_uid: str, verdict: str, user: str, finding: str = "", note: str = ""
    ) -> VerdictRecord:
        """An operator's verdict on the study's current result, kept as ground truth ``console:<user>``: agree =
        the node's verdict, disagree = its opposite, missed = abnormal with ``finding``. Raises
        UnknownStudyError for a study that is not stored, ValueError for a verdict that needs a result and has
        none (agree, disagree) or an unknown verdict."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        with self._session.begin() as s:
            if s.get(Study, study_uid) is None:
                raise UnknownStudyError("no such study")
            node_abnormal = self._study_verdict(s, study_uid)
            if verdict == "missed":
                abnormal = True
            elif node_abnormal is None:
                raise ValueError("the study has no result to agree or disagree with")
            else:
                abnormal = node_abnormal if verdict == "agree" else not node_abnormal
            findings = (finding,) if verdict == "missed" and finding else ()
            s.add(
                GroundTruth(
                    study_uid=study_uid,
                    accession_number=None,
                    abnormal=abnormal,
                    findings="; ".join(findings),
                    verdict=verdict,
                    source=f"console:{user}"[:200],
                    note=note,
                    created_at=utcnow(),
                )
            )
        return VerdictRecord(study_uid, verdict, abnormal, node_abnormal, findings)

    @staticmethod
    def _study_verdict(s, study_uid: str) -> bool | None:
        """The latest done job's verdict on the study (any image abnormal); None when it has none."""
        job_id = s.scalar(
            select(Job.id)
            .where(Job.study_uid == study_uid, Job.state == JobState.DONE)
            .order_by(Job.id.desc())
            .limit(1)
        )
        if job_id is None:
            return None
        flags = [
            a for a in s.scalars(select(ImageResult.abnormal).where(ImageResult.job_id == job_id)) if a is not None
        ]
        return any(flags) if flags else None

    @database_errors
    def ground_truth_of(self, study_uid: str) -> GroundTruth | None:
        """The ground truth that counts for a study (its newest row, by Study UID or accession number)."""
        with self._session() as s:
            accessions = [
                a
                for a in s.scalars(select(Instance.accession_number).where(Instance.study_uid == study_uid).distinct())
                if a
            ]
            cond = GroundTruth.study_uid == study_uid
            if accessions:
                cond = or_(cond, GroundTruth.accession_number.in_(accessions))
            return s.scalars(
                select(GroundTruth).where(cond).order_by(GroundTruth.created_at.desc(), GroundTruth.id.desc()).limit(1)
            ).first()

    # ---- cases -------------------------------------------------------------------------------------------
    @database_errors
    def validation_cases(
        self,
        classifier_sha256: str,
        detector_sha256: str,
        since: date | None = None,
        until: date | None = None,
    ) -> list[ValidationCase]:
        """One case per study with a done result of this model pair (its latest such job) and ground truth, whose
        date (study date, else day received) lies in [since, until]."""
        with self._session() as s:
            truth_by_uid: dict[str, GroundTruth] = {}
            truth_by_acc: dict[str, GroundTruth] = {}
            for g in s.scalars(select(GroundTruth).order_by(GroundTruth.created_at, GroundTruth.id)):
                if g.study_uid:  # ascending: the newest row of a key wins
                    truth_by_uid[g.study_uid] = g
                if g.accession_number:
                    truth_by_acc[g.accession_number] = g
            if not truth_by_uid and not truth_by_acc:
                return []
            latest: dict[str, int] = {}  # study -> its latest done job of the pair
            for job_id, study_uid, models in s.execute(
                select(Job.id, Job.study_uid, Job.models).where(Job.state == JobState.DONE).order_by(Job.id)
            ):
                if made_by(models, classifier_sha256, detector_sha256):
                    latest[study_uid] = job_id
            backfilled = set(s.scalars(select(BackfillStudy.study_uid)))
            cases: list[ValidationCase] = []
            for chunk in _chunks(sorted(latest.values())):
                rows = s.execute(
                    select(ImageResult, Instance)
                    .join(Instance, Instance.sop_instance_uid == ImageResult.sop_instance_uid)
                    .where(
                        ImageResult.job_id.in_(chunk),
                        ImageResult.p_abnormal.is_not(None),
                        ImageResult.not_analysable.is_(None),
                    )
                ).all()
                best: dict[str, tuple[ImageResult, Instance]] = {}
                accessions: dict[str, set[str]] = {}
                for img, inst in rows:
                    if img.p_abnormal is None or img.p_abnormal != img.p_abnormal:  # NaN: not judged
                        continue
                    accessions.setdefault(img.study_uid, set()).add(inst.accession_number or "")
                    held = best.get(img.study_uid)
                    if held is None or float(img.p_abnormal) > float(held[0].p_abnormal or 0.0):
                        best[img.study_uid] = (img, inst)
                for study_uid, (img, inst) in best.items():
                    truth = self._truth(study_uid, accessions.get(study_uid, set()), truth_by_uid, truth_by_acc)
                    if truth is None:
                        continue
                    day = _day(inst.study_date or "", inst.received_at)
                    if (since and day < since) or (until and day > until):
                        continue
                    cases.append(
                        ValidationCase(
                            study_uid=study_uid,
                            label=int(bool(truth.abnormal)),
                            p_abnormal=float(img.p_abnormal or 0.0),
                            p_raw=None if img.p_raw is None else float(img.p_raw),
                            view=(inst.view_position or "").strip().upper(),
                            device=device_label(
                                inst.manufacturer or "", inst.model_name or "", inst.station_name or ""
                            ),
                            month=day.strftime("%Y-%m"),
                            study_date=day,
                            received_at=inst.received_at,
                            retrospective=study_uid in backfilled,
                            truth_source=truth.source,
                        )
                    )
        return sorted(cases, key=lambda c: (c.study_date, c.study_uid))

    @staticmethod
    def _truth(
        study_uid: str, accessions: set[str], by_uid: dict[str, GroundTruth], by_acc: dict[str, GroundTruth]
    ) -> GroundTruth | None:
        found = [g for g in [by_uid.get(study_uid), *(by_acc.get(a) for a in accessions if a)] if g is not None]
        return max(found, key=lambda g: (g.created_at, g.id)) if found else None

    # ---- validations -------------------------------------------------------------------------------------
    @database_errors
    def record_validation(self, **fields: Any) -> int:
        """Record a validation (the :class:`storage.db.Validation` columns); returns its id."""
        with self._session.begin() as s:
            row = Validation(created_at=fields.pop("created_at", None) or utcnow(), **fields)
            s.add(row)
            s.flush()
            return int(row.id)

    @database_errors
    def set_validation_report(self, validation_id: int, report_path: str) -> None:
        with self._session.begin() as s:
            row = s.get(Validation, validation_id)
            if row is not None:
                row.report_path = report_path

    @database_errors
    def latest_validation(self, classifier_sha256: str, detector_sha256: str) -> Validation | None:
        """The newest validation of exactly this model pair (another sha256 has none)."""
        with self._session() as s:
            return s.scalars(newest_of_pair(classifier_sha256, detector_sha256)).first()

    @database_errors
    def validation(self, validation_id: int) -> Validation | None:
        with self._session() as s:
            return s.get(Validation, validation_id)

    @database_errors
    def validations(self, limit: int = 100) -> list[Validation]:
        """The recorded validations, newest first."""
        with self._session() as s:
            return list(
                s.scalars(select(Validation).order_by(Validation.created_at.desc(), Validation.id.desc()).limit(limit))
            )


def _chunks(items: list, size: int = 500):
    for i in range(0, len(items), size):
        yield items[i : i + size]
