"""Composition root: one validated :class:`Config` in, every long-lived object built here, and every
process-wide setting made here and nowhere else.

    dicom-node serve      Node: Store, scheduler, StudyAssembler, StoreHandler + Listener, Sender,
                          ``workers.count`` × WorkerProcess (each runs :func:`worker_main`)
    dicom-node worker     worker_main: Store, Pipeline (the models), Analyzer, Worker
    dicom-node analyze    build_pipeline (dicom_node.factories, with open_store: the leaf every entry point uses)

Process-wide settings: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` and ``tempfile.tempdir`` (received data sets
are streamed to files in the spool's tmp folder, so that they can be hard-linked into place), logging, signal
handlers, torch's thread count.

Importing this module does not import torch: only worker processes and ``analyze`` load the models.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom import _config as pynetdicom_config

from dicom_node import __version__, audit
from dicom_node.config import Config
from dicom_node.errors import DicomNodeError, WorkerStartError
from dicom_node.factories import build_pipeline, describe_pipeline, open_store
from dicom_node.ingest.assembly import StudyAssembler
from dicom_node.ingest.backfill import Backfiller
from dicom_node.ingest.store_handler import StoreHandler
from dicom_node.logs import safe_traceback, setup_logging
from dicom_node.membership import HEARTBEAT_S, STALE_S, Membership, default_instance_name
from dicom_node.net import spoolfile
from dicom_node.net.listener import Listener
from dicom_node.net.sender import Sender
from dicom_node.work.processes import WorkerProcess
from storage import Store
from storage.retention import Purger, RetentionPolicy

if TYPE_CHECKING:
    from dicom_node.web.server import WebServer

log = logging.getLogger(__name__)

SENDER_POLL_S = 0.1  # how often the outbox is checked for due deliveries (a cheap indexed query)
SWEEP_S = 5.0  # how often the leader looks for study timers overdue (their listener gone) and lost partial files
SUPERVISE_S = 1.0  # how often the worker processes are checked
RESTART_INITIAL_S, RESTART_MAX_S = 1.0, 60.0  # restart backoff after a worker died, doubling per quick death
WORKER_STABLE_S = 60.0  # a worker that has lived this long resets its backoff


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
        configure_audit(config)
        self.instance = config.node.instance_name or default_instance_name()
        self.store = open_store(config, owner=self.instance)  # partial files go to tmp/<instance>/
        self.membership = Membership(self.store, self.instance, self._became_leader)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"max_instances": 1})
        self.assembler = StudyAssembler(self.store, self.scheduler)
        self.ingest = StoreHandler(config, self.store, on_stored=self.assembler.arm)  # C-STORE, STOW-RS, WADO-RS
        self.listener = Listener(config.node, self.ingest)
        self.sender = Sender(config, self.store)
        self.backfiller = Backfiller(config, self.store, self.ingest)  # pulls past studies (dicom-node backfill)
        self._ready = multiprocessing.get_context("spawn").Queue()  # workers report "ready" or "failed" here
        self.workers = [
            WorkerProcess(worker_main, config.model_dump(mode="json"), i, self._ready, prefix=self.instance)
            for i in range(config.workers.count)
        ]
        self.web: WebServer | None = None
        self.web_port: int | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> int:
        """Start everything; returns the bound DICOM port."""
        version = __version__
        self.membership.register(version)  # refuses a second running instance of the same name
        receive_into_spool(self.store)
        removed = self.store.spool.clean_tmp()
        if removed:
            log.info("removed %d partial files of interrupted transfers (never acknowledged)", removed)
        others = [n.name for n in self.store.nodes(STALE_S) if n.state == "running" and n.name != self.instance]
        if others:  # one of them may be between placing a received file and committing its row
            log.info("instances %s are running: the check for unreferenced spool files is left out", ", ".join(others))
        else:
            orphans = self.store.remove_unreferenced_files()
            if orphans:
                log.warning(
                    "set aside %d unreferenced spool files in %s (a crash between writing a file and committing "
                    "its row)",
                    orphans,
                    self.store.spool.root / "orphans",
                )
        self.scheduler.start()
        self.membership.beat()  # the first instance on a database leads at once (and re-arms every study timer)
        if not self.membership.leads:
            self._restore_timers()  # a follower re-arms them too: the studies it received are due soon
        self.scheduler.add_job(  # from now on, also while the workers load their models (longer than a lease)
            self.membership.beat,
            "interval",
            seconds=HEARTBEAT_S,
            id="heartbeat",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        for w in self.workers:
            w.start()
        if self.workers:
            self._wait_for_workers()  # models that do not load: refuse to start, before accepting any study
            log.info("started %d worker process(es)", len(self.workers))
            self.scheduler.add_job(
                self._supervise,
                "interval",
                seconds=SUPERVISE_S,
                id="supervisor",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        if self.config.web.enabled:  # before the listener: "listening" means everything is up
            from dicom_node.web.server import WebServer

            self.web = WebServer(
                self.config,
                self.store,
                functools.partial(build_pipeline, self.config),
                lambda: self.listener.admission.snapshot()["associations"],
                self.ingest,
                self.membership.snapshot,
            )
            self.web_port = self.web.start()
        self.scheduler.add_job(
            self.membership.leader_only(self._sweep),
            "interval",
            seconds=SWEEP_S,
            id="sweep",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        retention = self.config.retention
        policy = RetentionPolicy(retention.keep_days, retention.high_watermark_percent, retention.low_watermark_percent)
        if policy.active:
            self.scheduler.add_job(
                self.membership.leader_only(functools.partial(run_retention, Purger(self.store, policy))),
                "interval",
                seconds=retention.check_interval_s,
                id="retention",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),  # once at start-up, then every check_interval_s
            )
        for d in self.config.destinations:
            if d.mode == "silent":
                log.warning(
                    "destination %s is silent: its results are kept and shown in the console, not sent "
                    "(mode: live sends new ones; README, Go live)",
                    d.name,
                )
        self.scheduler.add_job(
            self.membership.leader_only(self.sender.run_due),
            "interval",
            seconds=SENDER_POLL_S,
            id="sender",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        if self.config.backfill.source is not None:
            self.scheduler.add_job(
                self.membership.leader_only(self.backfiller.tick),
                "interval",
                seconds=self.config.backfill.check_interval_s,
                id="backfill",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        port = self.listener.start()  # last: "listening" means everything is up
        self.membership.addresses(
            f"{self.config.node.host}:{port}", f"{self.config.web.host}:{self.web_port}" if self.web_port else ""
        )
        return port

    def _became_leader(self) -> None:
        """This instance leads now: what the previous leader left under way is picked up (study timers of every
        listener, moves of a backfill that were in progress)."""
        self._restore_timers()
        if self.config.backfill.source is not None:
            self.backfiller.start()

    def _restore_timers(self) -> None:
        restored = self.assembler.restore()
        if restored:
            log.info("re-armed %d study timers after restart", restored)

    def _sweep(self) -> None:
        """The leader's housekeeping: studies whose timer is overdue (their listener is gone) are made jobs, and
        partial files of processes that are gone are removed from tmp/ (never acknowledged)."""
        fired = self.assembler.fire_overdue(grace_s=SWEEP_S)
        if fired:
            log.info("leader: %d overdue study timer(s) fired (their listener stopped)", fired)
        removed = self.store.spool.clean_tmp_of(self.store.live_owners(STALE_S), min_age_s=STALE_S)
        if removed:
            log.info("leader: removed %d partial files of stopped instances or workers from tmp/", removed)

    def _wait_for_workers(self) -> None:
        """Until every worker has loaded its models; WorkerStartError (with the reason) if one cannot."""
        pending = {w.name: w for w in self.workers}
        deadline = time.monotonic() + self.config.workers.start_timeout_s
        while pending:
            try:
                kind, name, detail = self._ready.get(timeout=0.5)
            except queue.Empty:
                gone = [w for w in pending.values() if not w.process.is_alive()]
                if gone:
                    raise WorkerStartError(f"worker {gone[0].name} exited at start ({gone[0].exit_reason()})") from None
                if time.monotonic() > deadline:
                    raise WorkerStartError(
                        f"{len(pending)} worker(s) did not load their models within "
                        f"{self.config.workers.start_timeout_s:g} s (workers.start_timeout_s)"
                    ) from None
                continue
            if kind == "failed":
                raise WorkerStartError(f"worker cannot start: {detail}")
            pending.pop(name, None)
            log.info("worker %s ready: %s", name, detail)

    def _supervise(self) -> None:
        """Every SUPERVISE_S: a worker process that died is recorded (its job counts one crash and is taken over
        at once), then restarted after a backoff that doubles with each death soon after a start."""
        while True:  # what restarted workers reported
            try:
                kind, name, detail = self._ready.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            (log.info if kind == "ready" else log.error)("worker %s %s: %s", name, kind, detail)
        now = time.monotonic()
        for w in self.workers:
            if self._stopped.is_set():
                return
            if w.process.is_alive():
                if w.deaths_in_a_row and now - w.started_at > WORKER_STABLE_S:
                    w.deaths_in_a_row = 0
                continue
            if w.restart_at is None:  # found dead just now
                reason = w.exit_reason()
                jobs = self.store.worker_died(w.name, reason)
                w.deaths_in_a_row += 1
                delay = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (w.deaths_in_a_row - 1))
                w.restart_at = now + delay
                log.error(
                    "worker %s died (%s)%s; restarting it in %.0f s",
                    w.name,
                    reason,
                    f"; job {', '.join(map(str, jobs))} will be taken over" if jobs else "",
                    delay,
                )
                audit.event("worker_died", worker=w.name, reason=reason, jobs=jobs)
            elif now >= w.restart_at:
                w.restart()
                log.info("worker %s restarted", w.name)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down")
        try:
            self.scheduler.remove_job("supervisor")  # no restarts while the workers are being stopped
        except Exception:  # noqa: BLE001 - not scheduled (no workers) or the scheduler never started
            pass
        self.backfiller.stop()  # moves under way are aborted (and moved again at the next start)
        self.listener.stop()
        if self.web is not None:
            self.web.stop()
        for w in self.workers:
            if w.process.is_alive():  # (never started when the start failed before them)
                w.process.terminate()
        for w in self.workers:
            w.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.membership.stop()  # after the last scheduled job: a leader hands its lease back now
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
        try:
            port = self.start()
        except BaseException:
            self.stop()  # workers, scheduler, listener: nothing may outlive a start that failed
            raise
        if announce is not None:
            announce(port)
        try:
            # Wake up now and then: a signal delivered to another thread (pynetdicom's, apscheduler's) only sets
            # a flag, and the main thread runs the Python handler when it next executes bytecode.
            while not done.wait(0.5):
                pass
        finally:
            self.stop()


def configure_audit(config: Config) -> None:
    """The audit trail of this process: ``serve`` and every worker append to (and rotate) the instance's file."""
    log_cfg = config.logging
    audit.configure(
        log_cfg.audit_path(config.storage.root, config.node.instance_name),
        int(log_cfg.audit_max_mb * 1e6),
        log_cfg.audit_backups,
    )


def worker_main(config_data: dict, name: str, parent_pid: int | None, ready: Any = None) -> None:
    """A worker: in a child process of ``serve`` (then it exits when its parent is gone) or in the foreground
    (``dicom-node worker``). Exits on SIGTERM/SIGINT after the job at hand."""
    from dicom_node.work.analyzer import Analyzer
    from dicom_node.work.worker import Worker

    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    configure_audit(config)
    store = open_store(config, owner=name)  # partial files go to tmp/<name>/
    store.spool.clean_tmp()  # a worker restarted under this name: what its predecessor left was never committed
    try:
        pipeline = build_pipeline(config)
        worker = Worker(config, store, Analyzer(config, pipeline), name, describe_pipeline(pipeline))
    except Exception as exc:
        # Say why in one line (e.g. a missing model file), then exit; a bug also gets its traceback.
        log.error(
            "worker %s cannot start: %s", name, exc if isinstance(exc, DicomNodeError) else "\n" + safe_traceback(exc)
        )
        if ready is not None:
            ready.put(("failed", name, str(exc) if isinstance(exc, DicomNodeError) else type(exc).__name__))
        store.close()
        raise SystemExit(1) from exc
    if ready is not None:
        ready.put(("ready", name, worker.models))
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    log.info("worker %s ready", name)
    try:
        worker.run(parent_pid)
    finally:
        store.close()
