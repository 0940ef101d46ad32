"""Crash-safe file writes into the spool folder.

A file is written to ``tmp/``, fsync'd, then hard-linked (never overwriting) into its final place and the
folder fsync'd, so a file that exists under ``spool/`` is always complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from storage.errors import StorageError


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
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.files = self.root / "spool"
        self.results = self.root / "results"
        for d in (self.tmp, self.files, self.results):
            d.mkdir(parents=True, exist_ok=True)

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
        """Remove leftovers of interrupted transfers and writes (never acknowledged, so nothing is lost)."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n
