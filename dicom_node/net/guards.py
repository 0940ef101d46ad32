"""Guards of the receive path against peers that stall, lie or send garbage: bounded reads and limits.

- :func:`recv_into_bounded`: a read that waits at most the association's timeout for the next bytes (a peer that
  stops half way through a PDU would otherwise hold its thread for ever);
- :func:`recv_claimed`: a PDU length is the peer's claim; beyond :data:`MAX_PREALLOCATED` the buffer grows with
  what really arrives instead of being allocated up front;
- :func:`wait_unless_gone`: a wait for the peer's first PDU that ends as soon as the connection is gone;
- :func:`log_action_failure`: what is logged when the peer's bytes make a state-machine action fail (the type
  and the place only: a message may quote the data).

The pieces that hook these into pynetdicom's acceptor are in :mod:`dicom_node.net.pynetdicom_internals`; the
limits on connections and associations are :mod:`dicom_node.net.admission`'s, the bounded TLS handshake
:mod:`dicom_node.net.tls`'s.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from dicom_node.net.fastpath import CHUNK, quick_ack

log = logging.getLogger(__name__)

MAX_PREALLOCATED = 1 << 26  # larger PDUs are read as they arrive, not allocated up front
GONE_POLL_S = 0.05  # how often a waiting acceptor looks whether its connection is gone

T = TypeVar("T")


def peer_host(sock: socket.socket | None) -> str:
    try:
        return str(sock.getpeername()[0])  # type: ignore[union-attr]
    except (OSError, AttributeError, IndexError):
        return "the peer"


def recv_into_bounded(sock: socket.socket, view: memoryview, timeout: float | None, ack: bool = True) -> int:
    """Fill ``view``; returns the number of bytes read (fewer only when the peer closed the connection).
    ``ack``: acknowledge at once after each read (see :func:`~dicom_node.net.fastpath.quick_ack`); a caller
    reading many PDUs in a row does that once at the end. A peer that sends nothing for ``timeout`` seconds
    raises TimeoutError (logged here)."""
    got, want = 0, len(view)
    while got < want:
        if timeout is not None and not select.select([sock], [], [], timeout)[0]:
            log.warning(
                "network timeout: no data from %s for %g s inside a PDU; closing the connection",
                peer_host(sock),
                timeout,
            )
            raise TimeoutError(f"no data for {timeout:g} s")
        n = sock.recv_into(view[got:], min(CHUNK, want - got))
        if n == 0:
            break
        got += n
        if ack:
            quick_ack(sock)
    return got


def recv_claimed(recv: Callable[[int], bytearray], nr_bytes: int) -> bytearray | None:
    """``nr_bytes`` read with ``recv`` in parts of at most :data:`MAX_PREALLOCATED` (short: the connection
    closed) when the claim is larger than that; None when it is not (the caller allocates it at once)."""
    if nr_bytes <= MAX_PREALLOCATED:
        return None
    buf = bytearray()
    while len(buf) < nr_bytes:
        part = recv(min(MAX_PREALLOCATED, nr_bytes - len(buf)))
        buf += part
        if not part:
            break
    return buf


def wait_unless_gone(
    get: Callable[[bool, float | None], T | None], gone: Callable[[], bool], timeout: float
) -> T | None:
    """``get(True, t)`` until it returns something or ``timeout`` has passed, but in steps of
    :data:`GONE_POLL_S`, ending with a last ``get(False, None)`` as soon as ``gone()``: a connection that closed
    at once no longer holds its thread for the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = get(True, max(0.0, min(GONE_POLL_S, deadline - time.monotonic())))
        if got is not None or time.monotonic() >= deadline:
            return got
        if gone():
            return get(False, None)


def raising_function(exc: BaseException) -> str:
    """The name of the function an exception was raised in (its innermost frame)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name if tb is not None else "?"


def log_action_failure(host: str, event: str, exc: BaseException) -> None:
    """A state-machine action failed on what ``host`` sent (``event``: the DUL event it was handling)."""
    log.warning(
        "association with %s aborted: its %s could not be processed (%s in %s)",
        host,
        "DIMSE message" if event == "Evt10" else f"PDU ({event})",
        type(exc).__name__,
        raising_function(exc),
    )
