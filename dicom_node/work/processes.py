"""Worker process supervision: ``serve`` runs ``workers.count`` workers as child processes.

Started with 'spawn' (safe with threads and torch); the target is the composition root's ``worker_main``, so
the node process itself never imports torch: only the children load the models.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable


class WorkerProcess:
    def __init__(self, target: Callable[[dict, str, int | None], None], config_data: dict, index: int):
        ctx = multiprocessing.get_context("spawn")
        self.name = f"worker-{os.getpid()}-{index}"
        self.process = ctx.Process(
            target=target, name=self.name, daemon=False, args=(config_data, self.name, os.getpid())
        )

    def start(self) -> None:
        self.process.start()

    def stop(self, timeout: float = 30) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: finishes the current job, then exits
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
