"""Worker processes: ``serve`` starts ``workers.count`` of them; ``dicom-node worker`` runs one in the foreground.

Kept apart from :mod:`dicom_node.work.worker` so that the node process starts without importing torch: only the
spawned children load the models.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal

from storage import Store

from dicom_node.config import Config
from dicom_node.logs import setup_logging

log = logging.getLogger(__name__)


def worker_main(config_data: dict, name: str, parent_pid: int | None) -> None:
    """Entry point of a worker process. Exits when SIGTERM'd or when its parent node process is gone."""
    from dicom_node.work.worker import Analyzer, Worker, load_pipeline

    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    store = Store(config.storage.resolved_database_url, config.storage.root, config.storage.min_free_disk_mb)
    try:
        worker = Worker(config, store, Analyzer(config, load_pipeline(config)), name)
    except Exception as exc:  # noqa: BLE001 - say why in one line (e.g. a missing model file), then exit
        log.error("worker %s cannot start: %s", name, exc)
        raise SystemExit(1) from exc
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    log.info("worker %s ready", name)
    worker.run(parent_pid)
    store.close()


class WorkerProcess:
    """A worker in a child process, started with 'spawn' (safe with threads and torch)."""

    def __init__(self, config: Config, index: int):
        ctx = multiprocessing.get_context("spawn")
        self.name = f"worker-{os.getpid()}-{index}"
        self.process = ctx.Process(target=worker_main, name=self.name, daemon=False,
                                   args=(config.model_dump(mode="json"), self.name, os.getpid()))

    def start(self) -> None:
        self.process.start()

    def stop(self, timeout: float = 30) -> None:
        if self.process.is_alive():
            self.process.terminate()   # SIGTERM: finishes the current job, then exits
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
