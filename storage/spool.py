"""Crash-safe file writes into the spool folder.

A file is written to ``tmp/``, fsync'd, then hard-linked (never overwriting) into its final place and the
folder fsync'd, so a file that exists under ``spool/`` is always complete.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from storage.errors import StorageError

log = logging.getLogger(__name__)

TMP_FOLDER_IDLE_S = 600.0  # an empty tmp/<owner>/ nobody touched for this long is a gone process's: removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name(uid: str) -> str:
    """A filesystem-safe, fixed-length name for a UID (UIDs come from the network: never trust them)."""
    return hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


class Spool:
    """The folder ``storage.root``: ``spool/`` (received instances), ``results/`` (result objects) and ``tmp/``.

    Several hosts may share one spool (a shared file system, mounted anywhere): the database holds every path
    relative to the root (:meth:`relative`, :meth:`resolve`), and each process writes its partial files in a
    folder of its own, ``tmp/<owner>/`` (the serve instance's or the worker's name), so that a process starting
    up removes its own leftovers and never another host's transfer in progress."""

    def __init__(self, root: Path, owner: str = ""):
        self.root = Path(root)
        self.tmp_root = self.root / "tmp"
        self.owner = _safe_owner(owner)
        self.tmp = self.tmp_root / self.owner if self.owner else self.tmp_root
        self.files = self.root / "spool"
        self.results = self.root / "results"
        for d in (self.files, self.results, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if self.owner:
            self.keep_tmp()

    def keep_tmp(self) -> None:
        """Mark this process's ``tmp/<owner>/`` as in use (its time set to now; made again if it is gone): at start
        and at every heartbeat, so that a leader's :meth:`clean_tmp_of` never removes the folder of a process that
        runs, however stale its heartbeat row (a worker restarted under the same name, a database that was away).
        Never raises: a spool that cannot be reached is reported by the writes that need it."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            os.utime(self.tmp)
        except OSError as exc:
            log.warning("tmp folder %s not kept: %s", self.tmp, exc.strerror)

    def relative(self, path: Path) -> str:
        """How the database keeps a spool file's path: relative to the root, the same on every host."""
        return Path(path).relative_to(self.root).as_posix()

    def resolve(self, stored: str) -> Path:
        """A path as the database keeps it, on this host (an absolute one, from before 0.7's migration, as is)."""
        return self.root / stored

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def instance_path(self, study_uid: str, sop_uid: str) -> Path:
        s = _name(study_uid)
        return self.files / s[:2] / s / f"{_name(sop_uid)}.dcm"

    def result_path(self, study_uid: str, sop_uid: str, suffix: str = ".dcm") -> Path:
        s = _name(study_uid)
        return self.results / s[:2] / s / f"{_name(sop_uid)}{suffix}"

    def write_temp(self, data: bytes | memoryview) -> Path:
        """Write bytes to a new fsync'd temp file and return its path."""
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write spool file: {exc.strerror}") from exc
        return Path(name)

    def place(self, temp: Path, final: Path, *, replace: bool = False) -> bool:
        """Move a temp file to ``final``. Returns False when ``final`` already exists and ``replace`` is off
        (the temp file is then left for the caller to discard)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            if replace:
                os.replace(temp, final)
            else:
                os.link(temp, final)  # atomic, fails if the name exists
                os.unlink(temp)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot place spool file: {exc.strerror}") from exc
        _fsync_dir(final.parent)
        return True

    def adopt(self, path: Path, final: Path) -> bool:
        """Make a complete file written by someone else (the DICOM receiver) durable at ``final``.

        The file is fsync'd and hard-linked (never overwriting; the caller's name stays theirs to delete).
        Returns False when ``final`` already exists. Falls back to a copy across filesystems."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StorageError(f"cannot store received file: {exc.strerror}") from exc
            temp = self.tmp / f"{final.name}.{os.getpid()}.part"
            shutil.copyfile(path, temp)
            with open(temp, "rb+") as fh:
                os.fsync(fh.fileno())
            return self.place(temp, final)
        _fsync_dir(final.parent)
        return True

    def write_file(self, data: bytes, final: Path) -> Path:
        """Durably write ``data`` at ``final`` (replacing any earlier file of the same name)."""
        self.place(self.write_temp(data), final, replace=True)
        return final

    def discard(self, temp: Path) -> None:
        temp.unlink(missing_ok=True)

    def clean_tmp(self) -> int:
        """Remove this process's leftovers of interrupted transfers and writes (never acknowledged, so nothing is
        lost): the files in its own ``tmp/<owner>/`` folder."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def clean_tmp_of(self, live_owners: set[str], min_age_s: float) -> int:
        """Remove the partial files of processes that are gone (a host lost mid-transfer: never acknowledged):
        files under ``tmp/<owner>/`` for owners not in ``live_owners``, untouched for ``min_age_s``; the folder
        goes too once empty and untouched for :data:`TMP_FOLDER_IDLE_S` (a running process touches its own at
        every heartbeat: :meth:`keep_tmp`); likewise files in ``tmp/`` itself (a command's, or written before
        owners existed). Returns how many files were removed."""
        n, now = 0, time.time()
        live = {_safe_owner(o) for o in live_owners}

        def remove_old(p: Path) -> int:
            try:
                if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                    p.unlink()
                    return 1
            except FileNotFoundError:
                pass
            return 0

        for entry in self.tmp_root.iterdir():
            if not entry.is_dir():
                n += remove_old(entry)
                continue
            if entry.name in live or entry == self.tmp:
                continue
            n += sum(remove_old(p) for p in entry.iterdir())
            try:
                if now - entry.stat().st_mtime >= max(min_age_s, TMP_FOLDER_IDLE_S):  # no process keeps it
                    entry.rmdir()
            except OSError:  # not empty: files of a transfer still being written, or too young
                pass
        return n


def _safe_owner(owner: str) -> str:
    """A folder name from an instance or worker name (letters, digits, ``._-``; anything else becomes ``_``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in owner)[:64].lstrip(".")
