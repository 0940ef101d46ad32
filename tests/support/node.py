"""Run `dicom-node serve` as a real process for tests, and small polling helpers."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> Any:
    """Poll until predicate() is truthy; return its value or fail with a message."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}: last value {last!r}")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class NodeProcess:
    """A `dicom-node serve` process with its own folder, config and port."""

    def __init__(self, folder: Path, **overrides):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        base = {
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": self.port},
            "storage": {"root": str(self.folder / "var"), "min_free_disk_mb": 1},
            "studies": {"stable_after_s": 1},
            "workers": {"count": 0},
            "destinations": [],
        }
        self.config = deep_merge(base, overrides)
        self.port = self.config["node"]["port"]
        self.config_path = self.folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.folder / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def ae_title(self) -> str:
        return self.config["node"]["ae_title"]

    def start(self, timeout: float = 60) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                     start_new_session=True)   # its own process group, workers included
        try:
            wait_for(lambda: self.proc.poll() is not None or self._listening(), timeout, what="node to listen")
        except AssertionError:
            self.kill()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited at start:\n{self.log()}")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, check=check, timeout=300)

    def rows(self, sql: str) -> list[dict]:
        """Rows of a query on the node's SQLite database (what an operator could inspect; no PHI is stored)."""
        con = sqlite3.connect(Path(self.config["storage"]["root"]) / "dicom-node.sqlite3")
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql)]
        finally:
            con.close()

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def stop(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        """kill -9 the node and its worker processes at once, like a crash of the machine or container."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def storescu(self, *files: Path | str, extra: tuple[str, ...] = (), calling: str = "STORESCU",
                 called: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = ["storescu", "-aet", calling, "-aec", called or self.ae_title, *extra, "127.0.0.1", str(self.port),
               *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
