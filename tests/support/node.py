"""Run `dicom-node serve` as a real process for tests, and small polling helpers.

The node binds port 0 and the test reads the port it got from its log ("listening as AE on HOST:PORT"): no
port is picked and released first, so no other process can take it in between. A restart of the same node
reuses that port (as a real node keeps its configured one): the PACS in a test knows the node by it.
Status is read in-process through the storage API, as ``dicom-node status`` does, without a CLI process.

A node on the default SQLite database starts from a copy of one template database, migrated once per test
process (:func:`template_database`): the node finds its schema at the head and runs no migration. The migrations
themselves are tested on their own (tests/test_migrations.py) and by every node on PostgreSQL.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dicom_node.config import load_config
from storage import Store

LISTENING = re.compile(r"listening as \S+ on \S+:(\d+)")
WEB = re.compile(r"web console, healthz, readyz, metrics on (http://\S+:\d+)")


@functools.cache
def template_database() -> Path:
    """A SQLite database migrated to the head, made once per test process; nodes start from copies of it."""
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # nothing left in /tmp by the test process
    store = Store(f"sqlite:///{folder / 'template.sqlite3'}", folder / "spool")
    store.close()
    return folder / "template.sqlite3"


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
        base = {
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0},
            "storage": {"root": str(self.folder / "var"), "min_free_disk_mb": 1},
            "studies": {"stable_after_s": 1},
            "workers": {"count": 0},
            "destinations": [],
            "web": {"port": 0},  # /healthz, /readyz, /metrics on a port the OS chooses (see web_port)
        }
        self.config = deep_merge(base, overrides)
        storage = self.config["storage"]
        database = Path(storage["root"]) / "dicom-node.sqlite3"
        if not storage.get("database_url") and not database.exists():  # the default database, not made yet
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template_database(), database)
        self.port: int = self.config["node"]["port"]
        self.config_path = self.folder / "config.yaml"
        self._write_config()
        self.log_path = self.folder / "node.log"
        self.proc: subprocess.Popen | None = None
        self._store: Store | None = None

    def _write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def ae_title(self) -> str:
        return self.config["node"]["ae_title"]

    def start(self, timeout: float = 60) -> None:
        if self.port and self.config["node"]["port"] != self.port:  # a restart: keep the port the PACS knows
            self.config["node"]["port"] = self.port
            self._write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            start_new_session=True,
        )  # its own process group, workers included

        def bound_port() -> int | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited at start:\n{self.log()}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                m = LISTENING.search(f.read().decode(errors="replace"))
            return int(m.group(1)) if m else None

        try:
            self.port = wait_for(bound_port, timeout, interval=0.05, what="node to listen")
        except (AssertionError, RuntimeError):
            self.kill()
            raise

    @property
    def web_url(self) -> str:
        """The base URL of the node's web side (the last one it logged: a restart may bind another port)."""
        found = WEB.findall(self.log())
        if not found:
            raise AssertionError("the node logged no web address")
        return found[-1]

    def log(self, since: int = 0) -> str:
        """The node's log; from ``since`` on (a :meth:`log_mark`): what one test of a shared node caused."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def rows(self, sql: str) -> list[dict]:
        """Rows of a query on the node's SQLite database (what an operator could inspect; no PHI is stored)."""
        return self.rows_of(sql, ())

    def rows_of(self, sql: str, parameters: tuple | list) -> list[dict]:
        """:meth:`rows` of a query with ``?`` parameters. A ``path`` column (the database keeps spool paths
        relative to ``storage.root``) comes back as the file's full path, as ``spool_path`` makes it."""
        root = Path(self.config["storage"]["root"])
        con = sqlite3.connect(root / "dicom-node.sqlite3")
        con.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in con.execute(sql, parameters)]
        finally:
            con.close()
        for r in rows:
            if isinstance(r.get("path"), str):
                r["path"] = str(root / r["path"])
        return rows

    def store(self) -> Store:
        """The node's storage, opened as ``dicom-node status`` opens it (same config file, same code)."""
        if self._store is None:
            cfg = load_config(self.config_path)
            self._store = Store(cfg.storage.resolved_database_url, cfg.storage.root, cfg.storage.min_free_disk_mb)
        return self._store

    def status(self) -> dict:
        """What ``dicom-node status --json`` prints, read in this process (works with the node stopped)."""
        return self.store().status()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def stop(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.close()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        """kill -9 the node and its worker processes at once, like a crash of the machine or container."""
        if self.proc is None:
            self.close()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.close()

    def storescu(
        self,
        *files: Path | str,
        extra: tuple[str, ...] = (),
        calling: str = "STORESCU",
        called: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        cmd = [
            "storescu",
            "-aet",
            calling,
            "-aec",
            called or self.ae_title,
            *extra,
            "127.0.0.1",
            str(self.port),
            *map(str, files),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
