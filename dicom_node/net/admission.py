"""Who gets a connection and an association slot, counted by the node itself.

pynetdicom counts every live acceptor thread against ``maximum_associations``: connections still in the
handshake, connections already closed whose thread still waits out ``acse_timeout``, and connections it is
about to reject. So 20 connect/close churners keep a PACS out for half a minute, and 30 simultaneous requests
with a limit of 16 were all refused. Here:

- **Connections per host.** The server's ``process_request`` (socketserver's hook, called on accept) refuses a
  connection when its host (IP address) already holds ``max_connections_per_peer`` open connections, before
  any thread or DUL exists for it. One host cannot take every connection or thread. The refused connection
  goes to the :class:`Refuser`: its A-ASSOCIATE-RQ (after the TLS handshake, on a TLS port), read within
  :data:`REQUEST_WAIT_S`, is answered with an
  A-ASSOCIATE-RJ "local limit exceeded" (transient: a PACS that opens many associations retries instead of
  seeing a network error), then the connection is closed; nothing arrives in time: it is just closed. The
  refuser is one thread with non-blocking sockets, a deadline on each and at most :data:`MAX_REFUSING` of
  them: a client that sends nothing, trickles bytes or never reads holds no slot, no thread and no accept.
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
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dicom_node import audit, metrics

log = logging.getLogger(__name__)

UNLIMITED = 1 << 30  # pynetdicom's maximum_associations: its count is replaced by Admission's

# A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21): result 2 rejected-transient, source 3 DICOM UL service-provider
# (presentation related function), reason 2 local-limit-exceeded; pynetdicom rejects with the same values when
# its own maximum_associations is reached
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
            "connections per host); its association request is rejected transient, local limit exceeded",
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


A_ASSOCIATE_RQ = 0x01
PDU_HEADER = struct.Struct(">BBL")
REQUEST_WAIT_S = 3.0  # most time from accept to the whole A-ASSOCIATE-RQ of a refused connection (and the acse timeout)
LINGER_S = 1.0  # most time the refused peer gets to close first after the RJ (so that it reads the RJ, not a reset)
MAX_REFUSING = 128  # refused connections handled at once; beyond, the next are closed at once


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 0x03, reserved, length 4, reserved, result, source, reason."""
    return PDU_HEADER.pack(0x03, 0, 4) + bytes((0, result, source, reason))


@dataclass(eq=False)
class _Refusal:
    sock: socket.socket
    host: str
    deadline: float
    header: bytearray = field(default_factory=bytearray)  # the first 6 bytes: the PDU header
    received: int = 0  # bytes read so far (the rest of the request is read and dropped)
    answered: bool = False  # the RJ is sent: waiting for the peer to close
    handshaking: bool = False  # a TLS connection whose handshake is not done yet
    events: int = selectors.EVENT_READ  # what the selector waits for (a TLS handshake may want to write)


class Refuser:
    """Answers refused connections with an A-ASSOCIATE-RJ and closes them, in one thread of its own.

    For each connection (non-blocking, registered with one selector): on a TLS connection (an ``ssl.SSLSocket``
    not yet handshaken) complete the TLS handshake first, non-blocking; read the A-ASSOCIATE-RQ (its header,
    then its length in bytes, dropped) within ``wait_s`` of accept; send the RJ (10 bytes: a fresh socket's send
    buffer takes them at once; a send that would block closes the connection); then wait up to ``linger_s``
    for the peer to close first, as an acceptor does after an RJ (PS3.8 state Sta13), so the peer reads the RJ
    rather than a connection reset. Anything else - nothing in time, a PDU that is not an A-ASSOCIATE-RQ, an
    error - closes the connection without an answer. At most ``max_pending`` at once: one more is closed at
    once. The thread starts with the first refusal; :meth:`close` ends it and closes what is left."""

    def __init__(
        self,
        reject: tuple[int, int, int] = LOCAL_LIMIT_EXCEEDED,
        wait_s: float = REQUEST_WAIT_S,
        linger_s: float = LINGER_S,
        max_pending: int = MAX_REFUSING,
        tls_client_allowed: Callable[[ssl.SSLSocket, str], bool] | None = None,
    ):
        self.pdu = reject_pdu(*reject)
        self.tls_client_allowed = tls_client_allowed  # after a TLS handshake: False closes it unanswered
        self.wait_s = wait_s
        self.linger_s = linger_s
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._inbox: list[_Refusal] = []
        self._count = 0  # connections handed over and not yet closed
        self._closed = False
        self._shut_done = False
        self._thread: threading.Thread | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._last_full_warning = 0.0
        self.answered = 0  # RJs sent (read by the tests)

    def refuse(self, sock: socket.socket, host: str) -> None:
        """Take over ``sock`` (the caller forgets it): answer it with the RJ and close it, in the background."""
        with self._lock:
            full = self._closed or self._count >= self.max_pending
            if not full:
                self._count += 1
                tls = isinstance(sock, ssl.SSLSocket)
                self._inbox.append(_Refusal(sock, host, time.monotonic() + self.wait_s, handshaking=tls))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="refuser", daemon=True)
                    self._thread.start()
        if full:
            _close(sock)
            now = time.monotonic()
            if not self._closed and now - self._last_full_warning > 60:
                self._last_full_warning = now
                log.warning(
                    "%d refused connections are being answered already: more are closed without an answer",
                    self.max_pending,
                )
            return
        self._wake()

    def pending(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Stop the thread and close every connection it still holds."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(5)
        else:
            self._shut()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full (a wake is pending anyway) or it is closed
            pass

    def _run(self) -> None:
        try:
            while not self._closed:
                self._take_inbox()
                now = time.monotonic()
                deadlines = [key.data.deadline for key in self._selector.get_map().values() if key.data is not None]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._on_ready(key.data)
                now = time.monotonic()
                for key in list(self._selector.get_map().values()):
                    if key.data is not None and key.data.deadline <= now:
                        self._finish(key.data)
        except Exception:  # a bug here must not leave refused sockets open for ever
            log.exception("the refuser of over-limit connections failed; refused connections are now closed at once")
            with self._lock:
                self._closed = True
        finally:
            self._shut()

    def _take_inbox(self) -> None:
        with self._lock:
            taken, self._inbox = self._inbox, []
        for r in taken:
            try:
                r.sock.setblocking(False)
                self._selector.register(r.sock, selectors.EVENT_READ, r)
            except (OSError, ValueError):
                self._finish(r, registered=False)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _on_ready(self, r: _Refusal) -> None:
        """The connection can be read (or written, during a TLS handshake): go as far as it allows."""
        if r.handshaking and not self._handshake(r):
            return
        while True:  # one read per readiness, more only for decrypted bytes a TLS socket holds (unseen by select)
            try:
                data = r.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except (OSError, ValueError):  # SSLWantWriteError included: no renegotiation for a refusal
                data = b""
            if not data:  # closed by the peer (or an error): done
                self._finish(r)
                return
            if not self._on_data(r, data):
                return
            if not (isinstance(r.sock, ssl.SSLSocket) and r.sock.pending()):
                return

    def _handshake(self, r: _Refusal) -> bool:
        """One step of a TLS handshake: True when it is done (the connection is then read)."""
        try:
            r.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._wait_for(r, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._wait_for(r, selectors.EVENT_WRITE)
            return False
        except (OSError, ValueError):  # a failed handshake, a reset: close, unanswered
            self._finish(r)
            return False
        r.handshaking = False
        if self.tls_client_allowed is not None and not self.tls_client_allowed(r.sock, r.host):  # type: ignore[arg-type]
            self._finish(r)  # a certificate not on the list: no answer, as on a connection within the limit
            return False
        self._wait_for(r, selectors.EVENT_READ)
        return True

    def _wait_for(self, r: _Refusal, events: int) -> None:
        if r.events != events:
            r.events = events
            self._selector.modify(r.sock, events, r)

    def _on_data(self, r: _Refusal, data: bytes) -> bool:
        """Bytes of the request (or after the answer): False when the connection is finished with."""
        if r.answered:
            return True  # after the RJ: whatever still comes is dropped until the peer closes
        r.received += len(data)
        if len(r.header) < PDU_HEADER.size:
            r.header += data[: PDU_HEADER.size - len(r.header)]
            if len(r.header) < PDU_HEADER.size:
                return True
            if r.header[0] != A_ASSOCIATE_RQ:
                self._finish(r)
                return False
        _, _, length = PDU_HEADER.unpack(r.header)
        if r.received < PDU_HEADER.size + length:
            return True  # more of the request to come (before the deadline)
        try:
            sent = r.sock.send(self.pdu)
        except (OSError, ValueError):  # SSLWantWriteError included: a fresh connection takes 10 bytes at once
            sent = 0
        if sent != len(self.pdu):
            self._finish(r)
            return False
        r.answered = True
        r.deadline = time.monotonic() + self.linger_s
        self.answered += 1
        log.debug("A-ASSOCIATE-RJ (local limit exceeded) sent to %s", r.host)
        return True

    def _finish(self, r: _Refusal, registered: bool = True) -> None:
        if registered:
            try:
                self._selector.unregister(r.sock)
            except (KeyError, ValueError, OSError):
                pass
        _close(r.sock)
        with self._lock:
            self._count -= 1

    def _shut(self) -> None:
        """Close every connection still held (registered or not yet), the selector and the wake pair (once)."""
        with self._lock:
            taken, self._inbox = self._inbox, []
            if self._shut_done:
                return
            self._shut_done = True
        for r in taken:
            self._finish(r, registered=False)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._finish(key.data)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
