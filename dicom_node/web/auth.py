"""Console logins: the session secret, CSRF tokens and a brake on password guessing (the password hashes are
:mod:`dicom_node.passwords`).

A session is a signed cookie (Starlette's ``SessionMiddleware``) holding the login name, when it expires and the
CSRF token that every POST form must send back.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from dicom_node.errors import ConfigError

FAILURES_ALLOWED, FAILURE_WINDOW_S = 5, 300.0  # per client address, then logins from it wait

MIN_SECRET = 32  # characters of a session-signing key, at least


def session_secret(root: Path) -> str:
    """The key that signs session cookies: ``DICOM_NODE_WEB_SECRET``, else a random key kept (mode 0600) under
    ``storage.root`` so that logins survive a restart of the node. A key shorter than MIN_SECRET characters
    could be guessed: from the environment it is refused; in the file (e.g. left empty by a full disk) it is
    replaced."""
    env = os.environ.get("DICOM_NODE_WEB_SECRET")
    if env:
        if len(env) < MIN_SECRET:
            raise ConfigError(
                f"DICOM_NODE_WEB_SECRET must be at least {MIN_SECRET} characters; make one with: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return env
    path = root / "web-session.key"
    try:
        key = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        key = ""
    if len(key) >= MIN_SECRET:
        return key
    key = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old file or the whole new one, never an empty key
    return key


def csrf_ok(session: dict, sent: str | None) -> bool:
    want = session.get("csrf")
    return bool(want and sent and hmac.compare_digest(str(want), str(sent)))


class LoginThrottle:
    """At most FAILURES_ALLOWED failed logins per client address in FAILURE_WINDOW_S."""

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW_S]
        self._failures[client] = kept
        return kept

    def blocked(self, client: str) -> bool:
        with self._lock:
            return len(self._recent(client, time.monotonic())) >= FAILURES_ALLOWED

    def failed(self, client: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._recent(client, now).append(now)
            if len(self._failures) > 1000:  # forget clients whose failures have all expired
                for other in list(self._failures):
                    if not self._recent(other, now):
                        del self._failures[other]

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
