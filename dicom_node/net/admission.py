"""Who gets a connection and an association slot, counted by the node itself.

pynetdicom counts every live acceptor thread against ``maximum_associations``: connections still in the
handshake, connections already closed whose thread still waits out ``acse_timeout``, and connections it is
about to reject. So 20 connect/close churners keep a PACS out for half a minute, and 30 simultaneous requests
with a limit of 16 were all refused. Here:

- **Connections per host.** ``verify_request`` (socketserver's hook, called on accept) refuses a connection
  when its host (IP address) already holds ``max_connections_per_peer`` open connections: it is closed at once,
  before any thread or DUL exists for it. One host cannot take every connection or thread.
- **Association slots.** A slot is taken when an A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``), never before,
  and refused with "local limit exceeded" (transient, so the sender retries) when all ``max_associations``
  are taken. pynetdicom's own count is switched off (see :data:`UNLIMITED`).
- **Release.** Both are given back when the association's thread ends, however it ends (release, abort,
  reset, timeout, rejection): :meth:`Admission.finished`, called by the request handler that wraps the thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger(__name__)

UNLIMITED = 1 << 30  # pynetdicom's maximum_associations: its count is replaced by Admission's

# A-ASSOCIATE-RJ: rejected transient, DUL service provider (presentation related), local limit exceeded
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


class Admission:
    """Counts open connections per host and held association slots (thread-safe)."""

    def __init__(self, max_associations: int, max_connections_per_peer: int):
        self.max_associations = max_associations
        self.max_connections_per_peer = max_connections_per_peer
        self._lock = threading.Lock()
        self._connections: Counter[str] = Counter()
        self._slots: set[int] = set()  # id() of the associations holding a slot

    def connection_opened(self, host: str) -> bool:
        """A new TCP connection from ``host``: True to serve it, False to close it (over the per-host limit)."""
        with self._lock:
            if self._connections[host] >= self.max_connections_per_peer:
                held = self._connections[host]
            else:
                self._connections[host] += 1
                return True
        log.warning(
            "connection from %s refused: it already has %d open connections (node.max_connections_per_peer: "
            "connections per host)",
            host,
            held,
        )
        return False

    def take_slot(self, assoc) -> bool:
        """An association request arrived: True when a slot was free (and is now held by ``assoc``)."""
        with self._lock:
            if len(self._slots) >= self.max_associations:
                return False
            self._slots.add(id(assoc))
            return True

    def finished(self, assoc, host: str) -> None:
        """The association's thread has ended: give back its connection and its slot, if it held one."""
        with self._lock:
            self._slots.discard(id(assoc))
            self._connections[host] -= 1
            if self._connections[host] <= 0:
                del self._connections[host]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"associations": len(self._slots), "connections": sum(self._connections.values())}

    def on_requested(self, event) -> None:
        """``EVT_REQUESTED`` handler: take a slot or reject "local limit exceeded" (transient)."""
        assoc = event.assoc
        if self.take_slot(assoc):
            return
        log.warning(
            "association from %s (%s) rejected: all %d association slots are in use (node.max_associations)",
            assoc.requestor.ae_title,
            assoc.requestor.address,
            self.max_associations,
        )
        assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
        assoc.kill()  # as pynetdicom does after its own rejections: the RJ is sent before the socket closes
