"""A faster receive path for pynetdicom's acceptor associations.

pynetdicom handles every PDU in Python, one reactor cycle at a time; with an 8 MB radiograph in 64 PDUs that
cost more than the disk. What is changed here, per association, without touching the rest of pynetdicom:

1. Reading. ``AssociationSocket.recv`` reads at most 4096 bytes per call into a growing bytearray (~2000
   system calls per image). ``FastRecvSocket`` reads into preallocated buffers with ``recv_into``.
2. The bulk of a C-STORE data set. pynetdicom decodes each P-DATA-TF into a PDU object and a primitive, runs
   the state machine (DT-2) and the DIMSE decoder, and all that ends in one file write. ``FastDUL`` writes the
   fragments of such a PDU straight from a reused buffer into that same file, and reads the next PDU in the
   same cycle while it is already waiting on the socket. Only plain data-set fragments in state Sta6 take
   this path; commands, the last fragment of a data set and every other PDU take pynetdicom's own.
3. Idle waits. The DUL reactor sleeps 1 ms whenever its event queue is empty, even when the next PDU is
   already waiting; ``FastDUL`` waits in ``select()`` on the socket instead (same 1 ms timeout).
4. Durability. The data set must be fsync'd before the C-STORE is acknowledged, and on these disks the device
   flush is the cost (~2-3 ms per MB; starting writeback early with ``sync_file_range`` does not help).
   ``FastDUL`` flushes the file in the background (``fdatasync`` on a duplicate descriptor, in a small thread
   pool) after each new megabyte while the rest is still arriving, so the handler's own fsync - which still
   decides - mostly has only the tail left.
5. Small segments wait on Nagle's algorithm and delayed ACKs: our sockets get TCP_NODELAY (``no_delay``, also
   used by the sender), and the receive path acknowledges at once (``quick_ack``), so a sender that keeps
   Nagle on (dcmtk, most PACS) is not stalled ~40 ms per PDU.

All of it is applied per association by :class:`FastRequestHandler`, which :func:`engage_fast_path` installs
as the request handler of a server started with pynetdicom's public ``AE.start_server``. The handler gives an
association's DUL and socket the faster subclasses below (same state, other methods) only when they are exactly
the pynetdicom classes they were written against; with any other pynetdicom (the dependency is pinned to one
minor range) the association keeps pynetdicom's own path, which is always correct. :data:`STATS` counts what
took which path; ``tests/test_transport.py`` fails if the fast path is not taken, and checks the fallback.
``bench/ingest.py`` measures the effect.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from dicom_node import audit
from dicom_node.net.admission import Admission
from dicom_node.net.spoolfile import cleanup_receive_files
from dicom_node.net.tls import peer_names

LOGGER = logging.getLogger("pynetdicom.dul")  # the DUL's own messages keep their logger
log = logging.getLogger(__name__)
CHUNK = 1 << 20
BATCH_BYTES = 4 << 20  # most data-set bytes taken per reactor cycle while more is waiting
MAX_PREALLOCATED = 1 << 26  # larger PDUs are read as they arrive, not allocated up front
IDLE_WAIT_S = 0.001
GONE_POLL_S = 0.05  # how often a waiting acceptor looks whether its connection is gone
FLUSH_STEP = 1 << 20


class FastPathStats:
    """Process-wide counters: associations given the fast path or left on pynetdicom's, and the data-set bytes
    written by the direct path. Read by the tests; cheap enough to keep on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.engaged = 0  # associations that got FastDUL / FastRecvSocket
        self.fallback = 0  # associations left entirely on pynetdicom's path (unexpected internals)
        self.direct_bytes = 0  # data-set bytes written straight from the socket buffer to the spool file

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"engaged": self.engaged, "fallback": self.fallback, "direct_bytes": self.direct_bytes}


STATS = FastPathStats()

# Shared by all associations; each has at most one flush in flight. Threads wait on the disk, not the GIL.
_FLUSHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="early-flush")


def _flush_dup(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError:  # the handler's own fsync decides; this is only a head start
        pass
    finally:
        os.close(fd)


def start_flush(path) -> None:
    """Start flushing a received file now, in the background, so that the disk works while the C-STORE
    handler reads the header; the handler's own fsync still decides (and then has little left to wait for)."""
    try:
        _FLUSHER.submit(_flush_dup, os.open(path, os.O_RDONLY))
    except (OSError, RuntimeError):  # no such file (the handler reports it) or shutting down
        pass


class FastRecvSocket(AssociationSocket):
    gone = False  # the peer closed the connection, or sent nothing for longer than the timeout allows

    def _read_timeout(self) -> float | None:
        """How long one read may wait for the peer: ``network_timeout`` once the association is established,
        ``acse_timeout`` before (a request that stalls half way)."""
        assoc = self._assoc
        return assoc.network_timeout if assoc.is_established else assoc.acse_timeout

    def recv_into(self, view: memoryview, ack: bool = True) -> int:
        """Fill ``view``; returns the number of bytes read (fewer only when the peer closed the connection).
        ``ack``: acknowledge at once after each read (see ``quick_ack``); a caller reading many PDUs in a row
        does that once at the end. A peer that sends nothing for the read timeout raises TimeoutError: the
        DUL then treats the connection as closed (Evt17) instead of waiting for ever inside a PDU."""
        got, want = 0, len(view)
        sock = cast(socket.socket, self.socket)  # set by pynetdicom before any read
        timeout = self._read_timeout()
        while got < want:
            if timeout is not None and not select.select([sock], [], [], timeout)[0]:
                self.gone = True
                log.warning(
                    "network timeout: no data from %s for %g s inside a PDU; closing the connection",
                    self._peer_host(),
                    timeout,
                )
                raise TimeoutError(f"no data for {timeout:g} s")
            n = sock.recv_into(view[got:], min(CHUNK, want - got))
            if n == 0:
                self.gone = True
                break
            got += n
            if ack:
                quick_ack(sock)
        return got

    def _peer_host(self) -> str:
        try:
            return str(cast(socket.socket, self.socket).getpeername()[0])
        except (OSError, AttributeError, IndexError):
            return "the peer"

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PREALLOCATED:  # a PDU length is the peer's claim: grow with what really arrives
            buf = bytearray()
            while len(buf) < nr_bytes:
                part = self.recv(min(MAX_PREALLOCATED, nr_bytes - len(buf)))
                buf += part
                if not part:
                    break
            return buf
        buf = bytearray(nr_bytes)
        got = self.recv_into(memoryview(buf))
        return buf if got == nr_bytes else buf[:got]  # short: connection closed, as pynetdicom returns it


_PDU_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
P_DATA_TF = 0x04


def _dataset_fragments(body: memoryview) -> list[memoryview] | None:
    """The data of every PDV item of a P-DATA-TF body when all are data-set fragments that are not the last
    of their message; None otherwise (a command, a last fragment, or anything malformed)."""
    out, pos, end = [], 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        (length,) = _ITEM_LENGTH.unpack_from(body, pos)
        control = body[pos + 5]
        if length < 2 or pos + 4 + length > end or control & 0x03:
            return None
        out.append(body[pos + 6 : pos + 4 + length])
        pos += 4 + length
    return out or None


class FastDUL(DULServiceProvider):
    _flushed: tuple[int, int] = (-1, 0)  # (inode, file size at the last early flush)
    _flushing: Future | None = None
    _pdu_buffer: bytearray | None = None

    @property
    def _fast_socket(self) -> FastRecvSocket:
        return cast(FastRecvSocket, self.socket)  # FastRequestHandler gives every FastDUL a FastRecvSocket

    def _streaming_file(self):
        """The open file a C-STORE data set is being streamed into, when nothing received is still waiting to
        be processed (so writing the next fragment now keeps the order); else None. Anything unexpected in
        pynetdicom's internals (another version) also gives None: pynetdicom's own path then does the work."""
        try:
            if self.state_machine.current_state != "Sta6" or not self.event_queue.empty() or not self._recv_pdu.empty():
                return None
            f = getattr(getattr(self.assoc.dimse, "message", None), "_data_set_file", None)
            if f is None or f.closed or self.assoc.get_handlers(evt.EVT_DATA_RECV):
                return None
            if not callable(getattr(f.file, "write", None)):  # the buffered writer pynetdicom writes through
                return None
            return f
        except AttributeError:
            return None

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU reader, with a direct path for the bulk of a streamed C-STORE data set.

        A P-DATA-TF whose items are all data-set fragments (not the last one) of the C-STORE being written to a
        file goes straight from one reused buffer into that file: in state Sta6 pynetdicom's own handling of it
        (decode, P-DATA primitive, DT-2, DIMSE decode) does exactly that write and nothing else. While the next
        PDU is already waiting on the socket it is read in the same call (up to BATCH_BYTES), sparing a
        reactor cycle per PDU. Everything else - commands, the last fragment, other PDUs, anything malformed -
        takes pynetdicom's path unchanged, in order."""
        f = self._streaming_file()
        if f is None:
            return super()._read_pdu_data()
        sock = cast(socket.socket, self._fast_socket.socket)
        header = bytearray(6)
        header_view = memoryview(header)
        raw = f.file  # the buffered writer under pynetdicom's NamedTemporaryFile, as pynetdicom writes to it
        written = 0
        try:
            while True:
                if not self._recv_exact(header_view):
                    return
                pdu_type, _, length = _PDU_HEADER.unpack(header)
                if pdu_type != P_DATA_TF or length > MAX_PREALLOCATED:
                    return self._finish_read(header, pdu_length=length)
                if self._pdu_buffer is None or len(self._pdu_buffer) < length:
                    self._pdu_buffer = bytearray(length)
                body = memoryview(self._pdu_buffer)[:length]
                if not self._recv_exact(body):
                    return
                fragments = _dataset_fragments(body)
                if fragments is None:
                    return self._decode_and_queue(header + body)
                for data in fragments:
                    raw.write(data)
                    written += len(data)
                raw.flush()
                if written >= BATCH_BYTES or not select.select([sock], [], [], 0)[0]:
                    return
                if written >= FLUSH_STEP:
                    self._early_flush()
        finally:
            quick_ack(sock)
            if written:
                STATS.add(direct_bytes=written)

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):
        """pynetdicom's, except that a wait (the acceptor waits ``acse_timeout`` for the A-ASSOCIATE-RQ) ends
        as soon as the connection is gone: a connection that closed at once no longer holds its thread."""
        if not wait or timeout is None:
            return super().receive_pdu(wait, timeout)
        deadline = time.monotonic() + timeout
        while True:
            got = super().receive_pdu(True, max(0.0, min(GONE_POLL_S, deadline - time.monotonic())))
            if got is not None or time.monotonic() >= deadline:
                return got
            sock = self.socket
            if sock is None or sock.socket is None or getattr(sock, "gone", False) or not self.is_alive():
                return super().receive_pdu(False)

    def _recv_exact(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; on a closed connection or an error queue Evt17 and return False."""
        try:
            got = self._fast_socket.recv_into(view, ack=False)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return False
        if got != len(view):
            LOGGER.error(f"The received PDU is shorter than expected ({got} of {len(view)} bytes received)")
            self.event_queue.put("Evt17")
            return False
        return True

    def _finish_read(self, header: bytearray, pdu_length: int) -> None:
        """Continue pynetdicom's reader after the 6-byte header (any PDU but a bulk data-set P-DATA-TF)."""
        if header[0] not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOGGER.error(f"Unknown PDU type received '0x{header[0]:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = self._fast_socket.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            LOGGER.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of {6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return
        self._decode_and_queue(header + body)

    def _decode_and_queue(self, bytestream: bytearray) -> None:
        try:
            pdu, event = self._decode_pdu(bytestream)
            self.event_queue.put(event)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _early_flush(self) -> None:
        """Flush the data set received so far in the background (see the module docstring). Never raises: it
        is only a head start, on the reactor's thread."""
        if self._flushing is not None and not self._flushing.done():
            return
        try:
            f = getattr(getattr(self.assoc.dimse, "message", None), "_data_set_file", None)
            if f is None or f.closed:
                return
            fd = f.fileno()
            st = os.fstat(fd)
            done = self._flushed[1] if self._flushed[0] == st.st_ino else 0
            if st.st_size - done >= FLUSH_STEP:
                # a duplicate descriptor stays valid even if pynetdicom closes the file meanwhile
                self._flushing = _FLUSHER.submit(_flush_dup, os.dup(fd))
                self._flushed = (st.st_ino, st.st_size)
        except (OSError, ValueError, AttributeError, RuntimeError):  # closed file, executor shut down: skip
            pass

    def _is_transport_event(self) -> bool:
        """Read one PDU (pynetdicom); then give the disk a head start on what has arrived so far."""
        got = super()._is_transport_event()
        if got:
            self._early_flush()
        return got

    @property
    def _run_loop_delay(self) -> float:
        """Wait for socket data (up to 1 ms) instead of sleeping blindly; the reactor then sleeps 0."""
        sock = getattr(self.socket, "socket", None)
        if sock is not None:
            try:
                select.select([sock], [], [], IDLE_WAIT_S)
                return 0.0
            except (OSError, ValueError):  # closed socket: fall back to the plain sleep
                pass
        return IDLE_WAIT_S

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:  # pynetdicom's __init__ sets it; the property decides
        pass


def no_delay(sock) -> None:
    """TCP_NODELAY: a DIMSE response or request is small and followed by a wait for the peer; with Nagle's
    algorithm and delayed ACKs it can sit ~40 ms in the kernel first."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(sock) -> None:
    """Acknowledge at once instead of delaying the ACK (Linux resets this after each read, so it is renewed).

    Senders that keep Nagle's algorithm on (dcmtk's storescu, most PACS) hold back the last small segment of
    each PDU until the previous one is acknowledged; with a delayed ACK that is a ~40 ms stall per PDU."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def rejection_result(assoc) -> int | None:
    """The A-ASSOCIATE-RJ result of a failed association request (1 permanent, 2 transient), or None.

    pynetdicom 3.0 has a race: when the peer rejects and closes the connection at once (dcmtk and most PACS
    do), the requesting thread can find the socket closed before it reads the queued rejection, and it then
    reports an abort. The rejection is still in the DUL's queue, so look there too."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        return int(assoc.acceptor.primitive.result)
    queued = list(getattr(assoc.dul.to_user_queue, "queue", ()))
    for primitive in queued:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return int(primitive.result)
    return 0x01 if assoc.is_rejected else None


@dataclass(frozen=True)
class TLSAccept:
    """How the TLS listener finishes a connection in its own thread: the handshake within
    ``handshake_timeout_s``, then reads bounded by ``read_timeout_s``; ``allowed_names``: when not empty, the
    client certificate must carry one of these names (CN, DNS or IP)."""

    handshake_timeout_s: float
    read_timeout_s: float
    allowed_names: frozenset[str] = frozenset()


def defer_tls_handshake(server: AssociationServer, accept: TLSAccept) -> None:
    """pynetdicom wraps an accepted socket and completes the TLS handshake in the server's only accepting thread:
    one client that connects and says nothing stops every other TLS client. Here the wrapping happens there, the
    handshake in the connection's thread (:meth:`FastRequestHandler.handle`)."""
    ctx = cast(ssl.SSLContext, server.ssl_context)

    def get_request():
        client, address = cast(socket.socket, server.socket).accept()
        return ctx.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    server.get_request = get_request  # type: ignore[method-assign]
    server.tls_accept = accept  # type: ignore[attr-defined]


class FastRequestHandler(RequestHandler):
    _handed_over = False  # the association's thread now gives the connection back when it ends

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._tls_handshake():
                admission = getattr(self.server, "admission", None)
                if admission is not None:
                    admission.finished(None, self.client_address[0])
                self.server.shutdown_request(self.request)
                return
            assoc = self._create_association()  # pynetdicom's RequestHandler.handle, step by step
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            self._handed_over = True  # from here its thread gives the connection back when it ends
        except BaseException:
            admission = getattr(self.server, "admission", None)
            if admission is not None and not self._handed_over:
                admission.finished(None, self.client_address[0])
            raise

    def _tls_handshake(self) -> bool:
        """Complete the TLS handshake (bounded), check the client's names; False: the connection is refused."""
        accept: TLSAccept = getattr(self.server, "tls_accept", TLSAccept(30.0, 120.0))
        sock = cast(ssl.SSLSocket, self.request)
        host = self.client_address[0]
        try:
            sock.settimeout(accept.handshake_timeout_s)
            sock.do_handshake()
            sock.settimeout(accept.read_timeout_s)  # stalls inside a PDU end the connection (see FastRecvSocket)
        except (OSError, ssl.SSLError) as exc:
            reason = f"TLS handshake failed ({type(exc).__name__}: {getattr(exc, 'reason', None) or 'timeout'})"
            log.warning("connection from %s refused: %s", host, reason)
            audit.event("connection_refused", peer=host, reason=reason)
            return False
        if accept.allowed_names:
            names = peer_names(sock)
            if not names & accept.allowed_names:
                reason = f"client certificate {sorted(names)} not in node.tls.allowed_client_names"
                log.warning("connection from %s refused: %s", host, reason)
                audit.event("connection_refused", peer=host, reason=reason)
                return False
        return True

    def _create_association(self):
        assoc = super()._create_association()
        no_delay(self.request)
        _on_thread_end(assoc, getattr(self.server, "admission", None), self.client_address[0])
        _guard_state_machine(assoc, self.client_address[0])
        # Swap in the subclasses only over the exact classes they extend: another pynetdicom, or someone else's
        # subclass, keeps pynetdicom's own path. TLS connections keep it too: the fast path selects on the raw
        # socket, which cannot see what the TLS layer has already decrypted.
        if isinstance(self.request, ssl.SSLSocket):
            pass
        elif type(assoc.dul) is DULServiceProvider and type(assoc.dul.socket) is AssociationSocket:
            assoc.dul.socket.__class__ = FastRecvSocket  # same state, faster recv
            assoc.dul.__class__ = FastDUL  # same state, no blind sleep between PDUs
            STATS.add(engaged=1)
        else:
            log.warning(
                "fast receive path not engaged: unexpected pynetdicom internals (%s, %s)",
                type(assoc.dul).__name__,
                type(assoc.dul.socket).__name__,
            )
            STATS.add(fallback=1)
        return assoc


def _guard_state_machine(assoc, host: str) -> None:
    """An exception in a state-machine action (pynetdicom decoding a garbage command set, say) escapes the DUL's
    thread and kills it with a traceback. Instead: log what failed (type only: a message may quote the data),
    send an A-ABORT and end this association, as pynetdicom does for an exception in the rest of its reactor."""
    machine = assoc.dul.state_machine
    do_action = machine.do_action

    def guarded(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:  # noqa: BLE001 - the peer's bytes made pynetdicom fail: end this association only
            log.warning(
                "association with %s aborted: its %s could not be processed (%s in %s)",
                host,
                "DIMSE message" if event == "Evt10" else f"PDU ({event})",
                type(exc).__name__,
                _raising_function(exc),
            )
            _hard_abort(assoc)

    machine.do_action = guarded


def _raising_function(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name if tb is not None else "?"


def _hard_abort(assoc) -> None:
    """A-ABORT (service provider, reason not specified) and stop both reactors (pynetdicom's own way out of an
    exception in its DUL reactor)."""
    from pynetdicom.pdu import A_ABORT_RQ

    dul = assoc.dul
    try:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        if dul.socket is not None:
            dul.socket.send(pdu.encode())
    except Exception:  # noqa: BLE001 - the connection may be gone already; the reactors stop anyway
        pass
    assoc.is_aborted = True
    assoc.is_established = False
    assoc._kill = True
    dul._kill_thread = True


def _on_thread_end(assoc, admission: Admission | None, host: str) -> None:
    """When the association's thread ends, however it ends: delete what is left of its receive files and give
    its connection and slot back to ``admission``."""
    run = assoc.run

    def run_then_clean_up() -> None:
        try:
            run()
        finally:
            cleanup_receive_files(assoc)
            if admission is not None:
                admission.finished(assoc, host)

    assoc.run = run_then_clean_up  # Thread.start() calls self.run(): the instance attribute wins


def engage_fast_path(server: AssociationServer, admission: Admission | None = None) -> None:
    """Serve the server's next associations with :class:`FastRequestHandler` (``RequestHandlerClass`` is the
    standard ``socketserver`` attribute that names the per-connection handler); with ``admission``, connections
    and association slots are counted by it (:mod:`dicom_node.net.admission`)."""
    server.RequestHandlerClass = FastRequestHandler
    if admission is not None:
        server.admission = admission  # type: ignore[attr-defined]
        # socketserver's hook, called on accept: False closes the connection before a thread exists for it
        server.verify_request = lambda request, client_address: admission.connection_opened(  # type: ignore[method-assign]
            client_address[0]
        )
