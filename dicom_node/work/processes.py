"""Worker process supervision: ``serve`` runs ``workers.count`` workers as child processes.

Started with 'spawn' (safe with threads and torch); the target is the composition root's ``worker_main``, so
the node process itself never imports torch: only the children load the models. Each child reports once on
``ready`` (a queue shared by all): ``("ready", name, models)`` when its models are loaded, ``("failed", name,
reason)`` when it cannot start. :meth:`WorkerProcess.restart` starts a fresh process under the same name (the
supervisor in :mod:`dicom_node.app` does it, with backoff, when one dies).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any


class WorkerProcess:
    def __init__(
        self, target: Callable[..., None], config_data: dict, index: int, ready: Any = None, prefix: str = "worker"
    ):
        self.target = target
        self.config_data = config_data
        self.ready = ready
        self.name = f"{prefix[:40]}-worker-{os.getpid()}-{index}"  # unique across hosts sharing a database
        self.started_at = 0.0
        self.deaths_in_a_row = 0  # consecutive deaths soon after a start: the backoff grows with them
        self.restart_at: float | None = None  # when the supervisor restarts it (None: not scheduled)
        self.process = self._new()

    def _new(self):
        ctx = multiprocessing.get_context("spawn")
        return ctx.Process(
            target=self.target,
            name=self.name,
            daemon=False,
            args=(self.config_data, self.name, os.getpid(), self.ready),
        )

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.process.start()

    def restart(self) -> None:
        self.process = self._new()
        self.restart_at = None
        self.start()

    def exit_reason(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def stop(self, timeout: float = 30) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: finishes the current job, then exits
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
