"""Deterministic UIDs of the ``2.25.<integer>`` form, derived from digests instead of drawn at random.

The same inputs always give the same UID: encoding the same result twice gives the same document, and the
same model file the same Device UID (see :mod:`dicom_node.outputs.equipment`).
"""

from __future__ import annotations

import hashlib

__all__ = ["uid_from_hex", "derived_uid"]


def uid_from_hex(hex_digest: str) -> str:
    """``2.25.<int of the first 32 hex digits>`` (128 bits: at most 39 digits, within the 64 of a UID)."""
    return "2.25." + str(int(hex_digest[:32], 16))


def derived_uid(base_uid: str, *parts: object) -> str:
    """A deterministic UID from an output's SOP Instance UID and a purpose (tracking UIDs, ...)."""
    joined = "\n".join([str(base_uid), *map(str, parts)])
    return uid_from_hex(hashlib.sha256(joined.encode()).hexdigest())
