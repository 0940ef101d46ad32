"""Console login passwords: scrypt hashes from the standard library, and the check of configured hashes.

A password hash looks like ``scrypt$16384$8$1$<salt>$<key>`` (base64); ``dicom-node hash-password`` makes one.
Only hashes are configured, never passwords. A leaf module: the configuration checks ``web.users`` with it
without importing the web side (:mod:`dicom_node.web.auth` holds the session, CSRF and throttle).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # about 50 ms and 16 MB per check: cheap for a login, dear for a guesser


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
