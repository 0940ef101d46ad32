"""Receiving into a full disk answers 0xA700, it does not abort the association.

pynetdicom streams every received data set into a ``tempfile.NamedTemporaryFile`` and lets a write error
escape from its reactor thread, which aborts the association: the sender sees a broken connection, not the
"out of resources, try later" that a full disk is. :func:`install` makes those files guarded: a write or flush
that fails because the disk or quota is full is remembered for that file and every later write to it is
dropped, so the transfer runs to its end; the C-STORE handler then asks :func:`full_disk_error` and answers
0xA700 with a reason (and deletes the partial file). Other write errors still raise.

Each receive file is also remembered by the association that created it: :func:`cleanup_receive_files` deletes
what is left of them when the association ends, so no way of breaking off a transfer leaves a file in tmp/.
How the files get into pynetdicom, and to their association, is
:func:`dicom_node.net.pynetdicom_internals.make_receive_files_with`.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from typing import Any

from dicom_node.net.pynetdicom_internals import make_receive_files_with, pop_receive_files

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_failed: dict[str, int] = {}  # file path -> errno of the first failed write
_lock = threading.Lock()
log = logging.getLogger(__name__)


class GuardedWriter:
    """The buffered writer under a NamedTemporaryFile, with full-disk errors caught (see the module)."""

    def __init__(self, real: Any, path: str):
        self._real = real
        self._path = path
        self.failed: int | None = None

    def _guard(self, call, *args):
        if self.failed is not None:
            return None
        try:
            return call(*args)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            self.failed = exc.errno
            with _lock:
                _failed[self._path] = exc.errno
            return None

    def write(self, data) -> int:
        self._guard(self._real.write, data)
        return len(data)

    def flush(self) -> None:
        self._guard(self._real.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _guarded_temporary_file(*args: Any, **kwargs: Any):
    f = tempfile.NamedTemporaryFile(*args, **kwargs)
    f.file = GuardedWriter(f.file, f.name)  # type: ignore[assignment]
    return f


def cleanup_receive_files(assoc) -> int:
    """Delete what is left of the receive files of an association that has ended: a transfer that was aborted,
    reset, released, timed out or refused half way leaves its partial file (pynetdicom removes a file only after
    a complete C-STORE's handler). Returns how many were removed."""
    removed = 0
    for f in pop_receive_files(assoc):
        name = f.name
        try:
            f.close()  # an aborted transfer's file is still open: unlinking alone would not free its space
        except OSError:
            pass
        with _lock:
            _failed.pop(name, None)
        try:
            os.unlink(name)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not remove the partial receive file %s (%s)", os.path.basename(name), exc.strerror)
    if removed:
        log.info("removed %d partial receive file(s) of an association that ended mid-transfer", removed)
    return removed


def install() -> None:
    """Make pynetdicom's receive files guarded (process-wide; the composition root calls it)."""
    make_receive_files_with(_guarded_temporary_file)


def full_disk_error(path: str) -> int | None:
    """The errno with which writing the received file at ``path`` ran out of space, or None; forgets it."""
    with _lock:
        return _failed.pop(str(path), None)
