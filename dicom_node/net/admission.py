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
- **Calling AE bound to its host.** With ``node.allowed_peers``, a calling AE title must be listed and call
  from one of its hosts or networks; otherwise the request is rejected permanent "calling AE title not
  recognised" and logged with the AE title and address (:class:`PeerPolicy`).
- **Release.** Both are given back when the association's thread ends, however it ends (release, abort,
  reset, timeout, rejection): :meth:`Admission.finished`, called by the request handler that wraps the thread.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Iterable

from dicom_node import audit, metrics

log = logging.getLogger(__name__)

UNLIMITED = 1 << 30  # pynetdicom's maximum_associations: its count is replaced by Admission's

# A-ASSOCIATE-RJ: rejected transient, DUL service provider (presentation related), local limit exceeded
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
# A-ASSOCIATE-RJ: rejected permanent, DUL service user, calling AE title not recognised
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)


class PeerPolicy:
    """``node.allowed_peers``: which hosts each calling AE title may call from. Empty: everyone."""

    def __init__(self, peers: Iterable[tuple[str, Iterable[str]]] = ()):
        self.peers = {ae: [ipaddress.ip_network(h, strict=False) for h in hosts] for ae, hosts in peers}

    def allows(self, ae_title: str, address: str) -> bool:
        if not self.peers:
            return True
        networks = self.peers.get(ae_title.strip())
        if networks is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks)


class Admission:
    """Counts open connections per host and held association slots (thread-safe)."""

    def __init__(self, max_associations: int, max_connections_per_peer: int, peers: PeerPolicy | None = None):
        self.max_associations = max_associations
        self.peers = peers or PeerPolicy()
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
        audit.event("connection_refused", peer=host, reason=f"{held} open connections (node.max_connections_per_peer)")
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
        """``EVT_REQUESTED`` handler: refuse a calling AE outside ``allowed_peers`` (permanent), then take a slot
        or reject "local limit exceeded" (transient)."""
        assoc = event.assoc
        ae_title, address = _calling_ae(assoc), assoc.requestor.address
        if not self.peers.allows(ae_title, address):
            log.warning(
                "association from %s (%s) rejected: that calling AE title may not call from this host "
                "(node.allowed_peers)",
                ae_title,
                address,
            )
            metrics.ASSOCIATIONS.labels("rejected").inc()
            audit.event("association_rejected", peer=address, calling_ae=ae_title, reason="not allowed from this host")
            assoc.acse.send_reject(*CALLING_AE_NOT_RECOGNISED)
            assoc.kill()
            return
        if self.take_slot(assoc):
            return
        log.warning(
            "association from %s (%s) rejected: all %d association slots are in use (node.max_associations)",
            ae_title,
            address,
            self.max_associations,
        )
        metrics.ASSOCIATIONS.labels("rejected").inc()
        audit.event("association_rejected", peer=address, calling_ae=ae_title, reason="all association slots in use")
        assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
        assoc.kill()  # as pynetdicom does after its own rejections: the RJ is sent before the socket closes


def _calling_ae(assoc) -> str:
    """The calling AE title of the request (pynetdicom fills ``requestor.ae_title`` only after negotiation)."""
    primitive = assoc.requestor.primitive
    title = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or ""
    return (title.decode("ascii", "replace") if isinstance(title, bytes) else str(title)).strip()
