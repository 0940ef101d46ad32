"""The audit trail: one JSON line per security-relevant event, without patient data, in a file that rotates.

Events (``event`` field) and what each line carries besides ``ts`` (UTC, ISO 8601) and ``pid``:

==========================  =================================================================================
``connection_refused``      ``peer``, ``reason`` (over ``node.max_connections_per_peer``)
``association_accepted``    ``peer``, ``calling_ae``, ``called_ae``
``association_rejected``    ``peer``, ``calling_ae``, ``reason``
``instance_stored``         ``peer``, ``calling_ae``, ``sop_class``, ``study``, ``bytes``, ``duplicate``,
                            ``eligible``
``instance_refused``        ``peer``, ``calling_ae``, ``sop_class``, ``status``, ``reason``
``job_done`` / ``job_failed``  ``job``, ``study``, ``results`` / ``reason``
``delivery_done`` / ``delivery_failed``  ``delivery``, ``destination``, ``kind``, ``error`` (failed)
``purge``                   ``studies``, ``instances``, ``results``, ``bytes``, ``reason``
``worker_died``             ``worker``, ``reason`` (exit code or signal), ``jobs`` (taken over)
``console_login``           ``peer``, ``user``, ``result`` (ok, failed, throttled)
``console_reanalyse``       ``user``, ``study``, ``job``
``console_retry``           ``user``, ``delivery``
``console_analyse``         ``user``, ``files`` (how many were uploaded; nothing of them is kept)
``console_verdict``         ``user``, ``study``, ``verdict`` (agree, disagree, missed), ``label`` (the ground truth)
``console_validate``        ``user``, ``validation`` (its id), ``n`` (studies)
==========================  =================================================================================

``study`` is :func:`study_key`: the first 16 hex digits of the SHA-1 of the Study Instance UID - the name of
the study's folder in the spool, so an operator can find it, while the line itself names no UID. Reasons are
the node's own texts (never a library's exception message).

Every process of the node (``serve``, its workers, ``dicom-node worker``) appends whole lines with ``O_APPEND``
(atomic for lines of this size on a local filesystem), opening the file for each line. Whichever process sees
the file beyond ``logging.audit_max_mb`` rotates it (keeping ``logging.audit_backups``), under an exclusive
``flock`` on ``.<name>.lock`` beside it and after checking the size again, so processes sharing one file rotate
it once; the next line of each opens the new file. :func:`configure` is called by the
composition root; until then :func:`event` does nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {"path": None, "max_bytes": 0, "backups": 0}


def configure(path: str | os.PathLike | None, max_bytes: int = 0, backups: int = 0) -> None:
    """Write the trail to ``path`` (None: nowhere), rotated beyond ``max_bytes`` (0: never; see the module)."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        _state.update(path=Path(path) if path else None, max_bytes=max_bytes, backups=backups)


def study_key(study_uid: str) -> str:
    return hashlib.sha1(study_uid.encode("utf-8", "replace")).hexdigest()[:16]


def event(name: str, **fields) -> None:
    """Append one line; never raises (an audit file that cannot be written is logged, once per failure)."""
    path = _state["path"]
    if path is None:
        return
    line = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": name, "pid": os.getpid(), **fields}
    data = (json.dumps(line, default=str, ensure_ascii=False) + "\n").encode("utf-8")
    with _lock:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if _state["max_bytes"] and size > _state["max_bytes"]:
                _rotate_if_over(path, _state["max_bytes"], _state["backups"])
        except OSError as exc:
            log.error("audit trail %s cannot be written (%s)", path, exc.strerror)


def _rotate_if_over(path: Path, max_bytes: int, backups: int) -> None:
    """Rotate ``path`` if it is still beyond ``max_bytes`` once this process holds the rotation lock (another
    process of the node may have rotated it meanwhile)."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.stat().st_size > max_bytes:
                _rotate(path, backups)
        except FileNotFoundError:
            pass  # rotated away with no backups kept, by another process


def _rotate(path: Path, backups: int) -> None:
    """audit.jsonl -> audit.jsonl.1 -> ... -> audit.jsonl.N (the oldest is dropped)."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))
