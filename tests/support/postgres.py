"""A throwaway PostgreSQL server for the storage tests: its own data folder, a free port on 127.0.0.1.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<version>/bin``); nothing of
the system cluster is used. PostgreSQL refuses to run as root, so when the tests run as root (as CI does)
the server runs as the ``postgres`` user the package creates. Each test gets a database of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from support.node import free_port, wait_for


def find_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    USER = "dicomnode"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.folder / "data"
        self.proc: subprocess.Popen | None = None
        self._as = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-2000:]}")

    listen: tuple[str, ...] = ()  # addresses to listen on besides 127.0.0.1
    settings: tuple[str, ...] = ()  # more "-c name=value" server settings
    hba: tuple[str, ...] = ()  # more pg_hba.conf lines

    def start(self) -> "PostgresServer":
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.USER, "-A", "trust", "--no-sync", "-E", "UTF8"
        )
        if self.hba:
            with open(self.data / "pg_hba.conf", "a") as fh:
                fh.writelines(f"{line}\n" for line in self.hba)
        settings = [f"listen_addresses={','.join(('127.0.0.1', *self.listen))}", *self.settings]
        self.proc = subprocess.Popen(
            [
                *self._as,
                str(self.bindir / "postgres"),
                *("-D", str(self.data), "-p", str(self.port)),
                *("-c", f"unix_socket_directories={self.folder}"),
                *(arg for setting in settings for arg in ("-c", setting)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: (
                self.proc.poll() is not None
                or subprocess.run(
                    [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
                ).returncode
                == 0
            ),
            60,
            what="PostgreSQL to accept connections",
        )
        if self.proc.poll() is not None:
            raise RuntimeError("PostgreSQL exited at start-up")
        return self

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        r = subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"createdb failed: {r.stderr}")
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w")
                self.proc.wait(30)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
