"""Composition root: one validated :class:`Config` in, every long-lived object built here, and every
process-wide setting made here and nowhere else.

    dicom-node serve      Node: Store, scheduler, StudyAssembler, StoreHandler + Listener, Sender,
                          ``workers.count`` × WorkerProcess (each runs :func:`worker_main`)
    dicom-node worker     worker_main: Store, Pipeline (the models), Analyzer, Worker
    dicom-node analyze    build_pipeline
    status/retry/...      open_store

Process-wide settings: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` and ``tempfile.tempdir`` (received data sets
are streamed to files in the spool's tmp folder, so that they can be hard-linked into place), logging, signal
handlers, torch's thread count.

Importing this module does not import torch: only worker processes and ``analyze`` load the models.
"""

from __future__ import annotations

import functools
import logging
import signal
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom import _config as pynetdicom_config

from dicom_node import audit
from dicom_node.config import Config
from dicom_node.errors import DicomNodeError
from dicom_node.ingest.assembly import StudyAssembler
from dicom_node.ingest.store_handler import StoreHandler
from dicom_node.logs import safe_traceback, setup_logging
from dicom_node.net import spoolfile
from dicom_node.net.listener import Listener
from dicom_node.net.sender import Sender
from dicom_node.work.processes import WorkerProcess
from storage import Store
from storage.retention import Purger, RetentionPolicy

if TYPE_CHECKING:
    from inference.pipeline import Pipeline

log = logging.getLogger(__name__)

SENDER_POLL_S = 0.1  # how often the outbox is checked for due deliveries (a cheap indexed query)


def open_store(config: Config) -> Store:
    config.storage.root.mkdir(parents=True, exist_ok=True)
    return Store(config.storage.resolved_database_url, config.storage.root, config.storage.min_free_disk_mb)


def build_pipeline(config: Config) -> Pipeline:
    """Load both models (torch is imported here, in the calling process)."""
    from inference.pipeline import Pipeline

    m = config.inference.models
    if m.threads:
        Pipeline.limit_threads(m.threads)
    return Pipeline.from_files(
        m.classifier, m.detector, fusion=config.inference.fusion, device=m.device, calibration=m.calibration
    )


def receive_into_spool(store: Store) -> None:
    """pynetdicom streams each received data set into a ``tempfile.NamedTemporaryFile`` (no directory argument
    exists), so the default temporary folder of this process becomes the spool's tmp folder: same filesystem,
    so the handler can hard-link the file into place without copying it."""
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(store.spool.tmp)
    spoolfile.install()  # a full disk gives 0xA700, not an aborted association


def run_retention(purger: Purger) -> None:
    """One retention check (scheduled by the node); each rule that removed something goes into the audit trail."""
    for r in purger.run():
        audit.event(
            "purge", studies=r.studies, instances=r.instances, results=r.results, bytes=r.bytes, reason=r.reason
        )


class Node:
    """The running node: listener, study timers, worker processes and the sender."""

    def __init__(self, config: Config):
        self.config = config
        log_cfg = config.logging
        audit.configure(
            log_cfg.audit_path(config.storage.root), int(log_cfg.audit_max_mb * 1e6), log_cfg.audit_backups, rotate=True
        )
        self.store = open_store(config)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"max_instances": 1})
        self.assembler = StudyAssembler(self.store, self.scheduler)
        self.listener = Listener(config.node, StoreHandler(config, self.store, on_stored=self.assembler.arm))
        self.sender = Sender(config, self.store)
        self.workers = [
            WorkerProcess(worker_main, config.model_dump(mode="json"), i) for i in range(config.workers.count)
        ]
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> int:
        """Start everything; returns the bound DICOM port."""
        receive_into_spool(self.store)
        removed = self.store.spool.clean_tmp()
        if removed:
            log.info("removed %d partial files of interrupted transfers (never acknowledged)", removed)
        orphans = self.store.remove_unreferenced_files()
        if orphans:
            log.info("removed %d unreferenced spool files (placed by a crash before their row was committed)", orphans)
        self.scheduler.start()
        restored = self.assembler.restore()
        if restored:
            log.info("re-armed %d study timers after restart", restored)
        port = self.listener.start()
        for w in self.workers:
            w.start()
        if self.workers:
            log.info("started %d worker process(es)", len(self.workers))
        retention = self.config.retention
        policy = RetentionPolicy(retention.keep_days, retention.high_watermark_percent, retention.low_watermark_percent)
        if policy.active:
            self.scheduler.add_job(
                functools.partial(run_retention, Purger(self.store, policy)),
                "interval",
                seconds=retention.check_interval_s,
                id="retention",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),  # once at start-up, then every check_interval_s
            )
        self.scheduler.add_job(
            self.sender.run_due,
            "interval",
            seconds=SENDER_POLL_S,
            id="sender",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        return port

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down")
        self.listener.stop()
        for w in self.workers:
            w.process.terminate()
        for w in self.workers:
            w.stop()
        self.scheduler.shutdown(wait=True)
        self.store.close()
        log.info("stopped")

    def run_forever(self, announce: Callable[[int], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly. ``announce(port)`` runs once listening."""
        done = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        port = self.start()
        if announce is not None:
            announce(port)
        try:
            # Wake up now and then: a signal delivered to another thread (pynetdicom's, apscheduler's) only sets
            # a flag, and the main thread runs the Python handler when it next executes bytecode.
            while not done.wait(0.5):
                pass
        finally:
            self.stop()


def worker_main(config_data: dict, name: str, parent_pid: int | None) -> None:
    """A worker: in a child process of ``serve`` (then it exits when its parent is gone) or in the foreground
    (``dicom-node worker``). Exits on SIGTERM/SIGINT after the job at hand."""
    from dicom_node.work.analyzer import Analyzer
    from dicom_node.work.worker import Worker

    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    audit.configure(config.logging.audit_path(config.storage.root))  # appends; serve rotates
    store = open_store(config)
    try:
        worker = Worker(config, store, Analyzer(config, build_pipeline(config)), name)
    except Exception as exc:
        # Say why in one line (e.g. a missing model file), then exit; a bug also gets its traceback.

        log.error(
            "worker %s cannot start: %s", name, exc if isinstance(exc, DicomNodeError) else "\n" + safe_traceback(exc)
        )
        store.close()
        raise SystemExit(1) from exc
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    log.info("worker %s ready", name)
    try:
        worker.run(parent_pid)
    finally:
        store.close()
