"""Console logins: password hashes (scrypt, from the standard library), the session secret, CSRF tokens and a
brake on password guessing.

A password hash looks like ``scrypt$16384$8$1$<salt>$<key>`` (base64); ``dicom-node hash-password`` makes one.
Only hashes are configured, never passwords. A session is a signed cookie (Starlette's ``SessionMiddleware``)
holding the login name, when it expires and the CSRF token that every POST form must send back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from dicom_node.errors import ConfigError

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # about 50 ms and 16 MB per check: cheap for a login, dear for a guesser
FAILURES_ALLOWED, FAILURE_WINDOW_S = 5, 300.0  # per client address, then logins from it wait

MIN_SECRET = 32  # characters of a session-signing key, at least


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


def check_hash(hashed: str) -> str | None:
    """What is wrong with a configured hash, or None."""
    parts = hashed.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return "not a password hash made by `dicom-node hash-password` (scrypt$N$r$p$salt$key)"
    try:
        n, r, p = (int(x) for x in parts[1:4])
        base64.b64decode(parts[4], validate=True)
        base64.b64decode(parts[5], validate=True)
    except ValueError:
        return "malformed password hash"
    if n < 2**10 or n & (n - 1) or r < 1 or p < 1:
        return "password hash parameters out of range"
    return None


def verify_password(password: str, hashed: str) -> bool:
    if check_hash(hashed):
        return False
    _, n, r, p, salt, key = hashed.split("$")
    want = base64.b64decode(key)
    got = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(want), maxmem=2**26
    )
    return hmac.compare_digest(got, want)


def parse_users(text: str) -> dict[str, str]:
    """``name:hash,name:hash`` (DICOM_NODE_WEB_USERS) -> {name: hash}; a malformed entry is a ValueError."""
    users: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, hashed = entry.partition(":")
        if not sep or not name:
            raise ValueError("DICOM_NODE_WEB_USERS: expected name:hash[,name:hash...]")
        problem = check_hash(hashed)
        if problem:
            raise ValueError(f"DICOM_NODE_WEB_USERS: user {name!r}: {problem}")
        users[name] = hashed
    return users


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
