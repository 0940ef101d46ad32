"""Database schema and engine. SQLite (WAL) by default; any SQLAlchemy URL (PostgreSQL) by configuration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy import false as sa_false
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)  # the console lists newest first
    # When the "stable" timer fires; NULL once the study's received instances have been handed to a job.
    stable_due_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    # What site validation and drift watching group by: the acquiring device, the study's date, its accession
    # number (site ground truth may be keyed by it). "" when the header has none.
    manufacturer: Mapped[str] = mapped_column(String(64), default="", server_default="")
    model_name: Mapped[str] = mapped_column(String(64), default="", server_default="")
    station_name: Mapped[str] = mapped_column(String(64), default="", server_default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", server_default="")  # YYYYMMDD
    accession_number: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)
    # What the sender asked for, when urgent and priority.sender_request is on: "STAT" (Requested Procedure
    # Priority), "HIGH" (the C-STORE request's Priority), both, or "" (routine).
    requested_priority: Mapped[str] = mapped_column(String(16), default="", server_default="")
    size_bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    eligible: Mapped[bool] = mapped_column(Boolean)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The latest job that covers this instance; NULL = received after the last job was queued.
    job_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("jobs.id"), nullable=True, index=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why queued / why failed
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Deaths of a worker process while it held this job, seen by the supervisor of a running node (a whole-node
    # restart is not one): a study that kills its worker every time is failed after MAX_JOB_CRASHES.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pipeline_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    models: Mapped[str | None] = mapped_column(Text, nullable=True)  # the model versions that made the result
    # storage.states.QueuePriority (0 urgent, 1 routine; lower is claimed first): queued urgent when the sender
    # asked; once done, the study's final priority (the priority rules on its findings) and why ("; "-separated)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    priority_reasons: Mapped[str | None] = mapped_column(Text, nullable=True)


class ImageResult(Base):
    """What a done job said about one image (the SR says the same): P(abnormal) and the verdict, or why the
    models could not judge it. Its findings are :class:`FindingRow` rows."""

    __tablename__ = "image_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    p_abnormal: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The classifier's raw probability, before the operating point of the image's view was mapped to 0.5: a site
    # calibration proposed by `validate` is chosen on this scale. NULL for results made before it was kept.
    p_raw: Mapped[float | None] = mapped_column(Float, nullable=True)
    abnormal: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    not_analysable: Mapped[str | None] = mapped_column(Text, nullable=True)


class FindingRow(Base):
    """One finding (box) of an image of a done job, in the source image's pixels."""

    __tablename__ = "findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    label: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(Float)
    x_min: Mapped[float] = mapped_column(Float)
    y_min: Mapped[float] = mapped_column(Float)
    x_max: Mapped[float] = mapped_column(Float)
    y_max: Mapped[float] = mapped_column(Float)


class Result(Base):
    """An output object this node made (SR/SC/GSPS). Its UIDs are made once and kept."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    source_sop_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    """One (result object, destination) pair: the outbox."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"), Index("ix_due", "state", "next_attempt_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(Integer, ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # its job's final priority


class WorkerRow(Base):
    """A worker process and its last heartbeat (``state``: alive, dead = died and being restarted, stopped)."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(128))
    models: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    current_job: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deaths: Mapped[int] = mapped_column(Integer, default=0)
    last_exit: Mapped[str | None] = mapped_column(Text, nullable=True)


class Purge(Base):
    """One retention run that removed something: what, why, how much (no identifiers)."""

    __tablename__ = "purges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_at: Mapped[datetime] = mapped_column(DateTime)
    reason: Mapped[str] = mapped_column(Text)
    studies: Mapped[int] = mapped_column(Integer)
    instances: Mapped[int] = mapped_column(Integer)
    results: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)


class GroundTruth(Base):
    """A site's own truth about a study: from a CSV (``dicom-node ground-truth import``) or an operator's verdict
    in the console. The newest row of a study counts. ``study_uid`` or ``accession_number`` names the study (a CSV
    row keyed by accession number is matched to its study when validating)."""

    __tablename__ = "ground_truth"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    abnormal: Mapped[bool] = mapped_column(Boolean)
    findings: Mapped[str] = mapped_column(Text, default="")  # finding names, "; "-separated ("" = none given)
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)  # console: agree/disagree/missed
    source: Mapped[str] = mapped_column(String(200))  # "csv:<file name>" or "console:<user>"
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Validation(Base):
    """One site validation (``dicom-node validate``): for which model files, over which studies, with what
    result. A model file with another sha256 has none until it gets its own."""

    __tablename__ = "validations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    classifier_sha256: Mapped[str] = mapped_column(String(64), index=True)
    detector_sha256: Mapped[str] = mapped_column(String(64))
    calibration: Mapped[str] = mapped_column(Text, default="")  # the calibration in force (file, sha256) or ""
    period_start: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # results' received times
    period_end: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    n: Mapped[int] = mapped_column(Integer)
    positives: Mapped[int] = mapped_column(Integer)
    auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    auc_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    auc_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    sensitivity: Mapped[float | None] = mapped_column(Float, nullable=True)
    sensitivity_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    sensitivity_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    specificity: Mapped[float | None] = mapped_column(Float, nullable=True)
    specificity_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    specificity_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_path: Mapped[str] = mapped_column(Text, default="")  # the HTML report
    by: Mapped[str] = mapped_column(String(200), default="")  # "cli" or "console:<user>"
    # Everything else as JSON: per view / device / month, the proposed calibration, and the reference
    # distribution of P(abnormal) per device that drift watching compares live traffic with.
    details: Mapped[str] = mapped_column(Text, default="{}")


class BackfillRun(Base):
    """A retrospective pull from the PACS (``dicom-node backfill``): its query and bounds; ``serve`` works it."""

    __tablename__ = "backfill_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    state: Mapped[str] = mapped_column(String(16), index=True)  # searching, moving, done, cancelled, failed
    query: Mapped[str] = mapped_column(Text)  # JSON: dates, modalities, accession numbers, study UIDs
    settings: Mapped[str] = mapped_column(Text, default="{}")  # JSON: source, concurrency, rate, window
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # the search's retry
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # What the search found: studies the PACS answered with, and of those the ones the node already held
    # (received earlier, or pulled by an earlier run), which this run leaves alone.
    found: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    already_held: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BackfillStudy(Base):
    """One study a backfill pulls. A study is pulled once, whichever run found it; results of a pulled study are
    never delivered (retrospective)."""

    __tablename__ = "backfill_studies"
    __table_args__ = (Index("ix_backfill_due", "state", "next_attempt_at"),)
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("backfill_runs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))  # pending, moving, moved, failed, skipped
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    expected_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)  # from the C-FIND answer
    moved_instances: Mapped[int] = mapped_column(Integer, default=0)  # completed C-MOVE sub-operations
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Pulled for `dicom-node reanalyze` of a study the node no longer held: its results are delivered like a
    # live study's (a backfill's never are).
    deliver: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class NodeRow(Base):
    """One ``serve`` instance sharing this database: what it listens on and its last heartbeat (database time).
    ``state``: running, stopped (a clean stop), gone (its heartbeat stopped: the leader noticed)."""

    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(16), default="follower")  # leader or follower, as last beaten
    dicom_address: Mapped[str] = mapped_column(String(128), default="")
    web_address: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)


class Leader(Base):
    """The one row that says which ``serve`` instance is the leader (it runs the study-timer sweep, retention,
    the sender and backfills) until when: a lease on the database's clock, renewed by its heartbeat."""

    __tablename__ = "leader"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    holder: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[datetime] = mapped_column(DateTime)
    since: Mapped[datetime] = mapped_column(DateTime)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, like the fsync'd file
    cur.execute("PRAGMA busy_timeout=30000")  # SCP threads, scheduler and worker processes share the file
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE


def _sqlite_begin_immediate(conn) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads then writes can fail with
    # "database is locked" at once when another process committed in between (busy_timeout cannot help).
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    from storage.migrate import upgrade  # the schema: created, or upgraded from an earlier release

    upgrade(engine)
    return engine
