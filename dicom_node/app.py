"""Composition root: builds every long-lived object from one validated Config and wires them together."""
from __future__ import annotations

import logging
import signal
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from storage import Store

from dicom_node.ingest.assembly import StudyAssembler
from dicom_node.config import Config
from dicom_node.net.listener import StoreSCP
from dicom_node.net.sender import Sender
from dicom_node.work.processes import WorkerProcess

log = logging.getLogger(__name__)

SENDER_POLL_S = 0.1   # how often the outbox is checked for due deliveries (a cheap indexed query)


def open_store(config: Config) -> Store:
    config.storage.root.mkdir(parents=True, exist_ok=True)
    return Store(config.storage.resolved_database_url, config.storage.root, config.storage.min_free_disk_mb)


class Node:
    """The running node: SCP, study timers, worker processes and the sender."""

    def __init__(self, config: Config):
        self.config = config
        self.store = open_store(config)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"max_instances": 1})
        self.assembler = StudyAssembler(self.store, self.scheduler)
        self.scp = StoreSCP(config, self.store, on_stored=self.assembler.arm)
        self.sender = Sender(config, self.store)
        self.workers: list[WorkerProcess] = []
        self._stopped = threading.Event()

    def start(self) -> int:
        removed = self.store.spool.clean_tmp()
        if removed:
            log.info("removed %d partial files of interrupted transfers (never acknowledged)", removed)
        self.scheduler.start()
        restored = self.assembler.restore()
        if restored:
            log.info("re-armed %d study timers after restart", restored)
        port = self.scp.start()
        self._start_extras()
        return port

    def _start_extras(self) -> None:
        for i in range(self.config.workers.count):
            w = WorkerProcess(self.config, i)
            w.start()
            self.workers.append(w)
        if self.config.workers.count:
            log.info("started %d worker process(es)", self.config.workers.count)
        self.scheduler.add_job(self.sender.run_due, "interval", seconds=SENDER_POLL_S, id="sender",
                               max_instances=1, coalesce=True, misfire_grace_time=None)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down")
        self.scp.stop()
        for w in self.workers:
            w.process.terminate()
        for w in self.workers:
            w.stop()
        self.scheduler.shutdown(wait=True)
        self.store.close()
        log.info("stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        done = threading.Event()

        def on_signal(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            # Wake up now and then: a signal delivered to another thread (pynetdicom's, apscheduler's) only sets
            # a flag, and the main thread runs the Python handler when it next executes bytecode.
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
