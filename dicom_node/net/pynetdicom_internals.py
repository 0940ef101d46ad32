"""Everything dicom-node does to pynetdicom that pynetdicom's public API cannot do: the one place to re-read when
pynetdicom changes.

Checked against pynetdicom 3.0.4 (``pyproject.toml`` pins ``pynetdicom>=3.0,<3.1``). :func:`check_version`
refuses to start the listener with any other minor version, with a message that says so, rather than let these
pieces misbehave. Each piece says what it changes, why the public API cannot do it, and which pynetdicom
internals it relies on; ``docs/pynetdicom-upstream-request.md`` is the upstream change that would remove it.

- :class:`AcceptorRequestHandler` (a ``request_handler`` for ``AE.make_server``, which is public) overrides
  ``RequestHandler._create_association`` to give each association the pieces below.
- :class:`FastRecvSocket`, :class:`FastDUL`: the fast receive path (:mod:`dicom_node.net.fastpath`) and the
  bounded reads (:mod:`dicom_node.net.guards`), put into an association by swapping the ``__class__`` of its
  socket and DUL.
- :func:`_guard_state_machine` (wraps ``StateMachine.do_action``), :func:`_on_thread_end` (wraps
  ``Association.run``).
- :func:`make_receive_files_with` (replaces ``dimse_messages.NamedTemporaryFile``), :func:`rejection_result`
  (reads ``DULServiceProvider.to_user_queue``).

Done with public API instead, in :mod:`dicom_node.net.acceptor`: the server (``AE.make_server`` with
``server_class`` and ``request_handler``), its ``get_request`` (TLS handshake off the accepting thread, TCP_NODELAY)
and ``process_request`` (connections per host, the over-limit ones answered by
:class:`dicom_node.net.admission.Refuser`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import dimse_messages, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.errors import DicomNodeError
from dicom_node.net.fastpath import (
    BATCH_BYTES,
    FLUSH_STEP,
    P_DATA_TF,
    PDU_HEADER,
    STATS,
    EarlyFlush,
    data_waiting,
    dataset_fragments,
    idle_wait,
    quick_ack,
)
from dicom_node.net.guards import (
    MAX_PREALLOCATED,
    log_action_failure,
    recv_claimed,
    recv_into_bounded,
    wait_unless_gone,
)
from dicom_node.net.tls import TLSAccept, finish_handshake

LOGGER = logging.getLogger("pynetdicom.dul")  # the DUL's own messages keep their logger
log = logging.getLogger(__name__)

CHECKED_VERSION = "3.0.4"
CHECKED_RANGE = (3, 0)  # major.minor: the pin in pyproject.toml


def check_version(version: str = pynetdicom.__version__) -> None:
    """Refuse to go on with a pynetdicom outside the range this module was checked against."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) != CHECKED_RANGE:
        raise DicomNodeError(
            f"pynetdicom {version} is installed, but dicom_node/net/pynetdicom_internals.py extends pynetdicom's "
            f"internals as they are in {CHECKED_VERSION} (pyproject.toml pins pynetdicom>=3.0,<3.1): install "
            f"pynetdicom 3.0.x, or re-check that module against {version} and run tests/test_transport.py, "
            "tests/test_hostile.py and tests/test_tls.py"
        )


class AcceptorRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a bounded TLS handshake first and the pieces below in each association.

    Public API of pynetdicom 3.0.4 cannot: the association, its DUL and its socket are made inside the private
    ``RequestHandler._create_association``; ``handle`` repeats pynetdicom's three steps around it. The server
    (:class:`dicom_node.net.acceptor.AcceptorServer`) supplies ``tls_accept`` and ``connection_ended``."""

    _handed_over = False  # the association's thread now gives the connection back when it ends

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._tls_handshake():
                self._connection_ended(None)
                self.server.shutdown_request(self.request)
                return
            assoc = self._create_association()  # pynetdicom's RequestHandler.handle, step by step
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            self._handed_over = True  # from here its thread gives the connection back when it ends
        except BaseException:
            if not self._handed_over:
                self._connection_ended(None)
            raise

    def _connection_ended(self, assoc) -> None:
        ended = getattr(self.server, "connection_ended", None)
        if ended is not None:
            ended(assoc, self.client_address[0])

    def _tls_handshake(self) -> bool:
        accept = getattr(self.server, "tls_accept", None) or TLSAccept(30.0, 120.0)
        return finish_handshake(cast(ssl.SSLSocket, self.request), accept, self.client_address[0])

    def _create_association(self):
        assoc = super()._create_association()
        _on_thread_end(assoc, self._connection_ended)
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


class FastRecvSocket(AssociationSocket):
    """``AssociationSocket`` whose ``recv`` reads into preallocated buffers with ``recv_into`` (pynetdicom: 4096
    bytes per call into a growing bytearray), and waits at most the association's timeout for the next bytes
    (pynetdicom: for ever inside a PDU). Adds ``recv_into`` (for :class:`FastDUL`) and ``gone``.

    Public API of pynetdicom 3.0.4 cannot: pynetdicom makes the socket object itself (no socket class or read
    timeout option), so the handler swaps its ``__class__``; relies on ``.socket`` being the connected socket."""

    gone = False  # the peer closed the connection, or sent nothing for longer than the timeout allows

    def _read_timeout(self) -> float | None:
        """``network_timeout`` once the association is established, ``acse_timeout`` before (a request that
        stalls half way)."""
        assoc = self.assoc
        return assoc.network_timeout if assoc.is_established else assoc.acse_timeout

    def recv_into(self, view: memoryview, ack: bool = True) -> int:
        """Fill ``view`` (:func:`dicom_node.net.guards.recv_into_bounded`). A peer that sends nothing for the
        read timeout raises TimeoutError: the DUL then treats the connection as closed (Evt17)."""
        try:
            got = recv_into_bounded(cast(socket.socket, self.socket), view, self._read_timeout(), ack)
        except TimeoutError:
            self.gone = True
            raise
        if got < len(view):
            self.gone = True
        return got

    def recv(self, nr_bytes: int) -> bytearray:
        grown = recv_claimed(self.recv, nr_bytes)
        if grown is not None:
            return grown
        buf = bytearray(nr_bytes)
        got = self.recv_into(memoryview(buf))
        return buf if got == nr_bytes else buf[:got]  # short: connection closed, as pynetdicom returns it


class FastDUL(DULServiceProvider):
    """``DULServiceProvider`` with the fast receive path (:mod:`dicom_node.net.fastpath`, points 2-4) and a wait
    for the association request that ends when the connection is gone.

    Public API of pynetdicom 3.0.4 cannot: the DUL is pynetdicom's internal reactor, made by
    ``Association.__init__`` (no DUL class option, no hook per received PDU, no setting for the idle sleep), so
    the handler swaps its ``__class__``. Overrides ``_read_pdu_data``, ``_is_transport_event``,
    ``_run_loop_delay`` and ``receive_pdu``; relies on ``state_machine.current_state``, ``event_queue``,
    ``_recv_pdu``, ``_decode_pdu`` and ``assoc.dimse.message._data_set_file`` (the file a C-STORE data set streams
    into with ``_config.STORE_RECV_CHUNKED_DATASET``, whose ``.file`` pynetdicom writes through)."""

    _early: EarlyFlush | None = None
    _pdu_buffer: bytearray | None = None

    @property
    def _fast_socket(self) -> FastRecvSocket:
        return cast(FastRecvSocket, self.socket)  # AcceptorRequestHandler gives every FastDUL a FastRecvSocket

    def _data_set_file(self) -> Any:
        return getattr(getattr(self.assoc.dimse, "message", None), "_data_set_file", None)

    def _streaming_file(self):
        """The open file a C-STORE data set is being streamed into, when nothing received is still waiting to
        be processed (so writing the next fragment now keeps the order); else None. Anything unexpected in
        pynetdicom's internals (another version) also gives None: pynetdicom's own path then does the work."""
        try:
            if self.state_machine.current_state != "Sta6" or not self.event_queue.empty() or not self._recv_pdu.empty():
                return None
            f = self._data_set_file()
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
                pdu_type, _, length = PDU_HEADER.unpack(header)
                if pdu_type != P_DATA_TF or length > MAX_PREALLOCATED:
                    return self._finish_read(header, pdu_length=length)
                if self._pdu_buffer is None or len(self._pdu_buffer) < length:
                    self._pdu_buffer = bytearray(length)
                body = memoryview(self._pdu_buffer)[:length]
                if not self._recv_exact(body):
                    return
                fragments = dataset_fragments(body)
                if fragments is None:
                    return self._decode_and_queue(header + body)
                for data in fragments:
                    raw.write(data)
                    written += len(data)
                raw.flush()
                if written >= BATCH_BYTES or not data_waiting(sock):
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
        return wait_unless_gone(super().receive_pdu, self._connection_gone, timeout)

    def _connection_gone(self) -> bool:
        sock = self.socket
        return sock is None or sock.socket is None or getattr(sock, "gone", False) or not self.is_alive()

    def _recv_exact(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; on a closed connection or an error queue Evt17 and return False."""
        try:
            got = self._fast_socket.recv_into(view, ack=False)
        except (OSError, TimeoutError) as exc:
            return self._connection_lost(exc)
        if got != len(view):
            return self._connection_lost(None, f"{got} of {len(view)}")
        return True

    def _connection_lost(self, exc: BaseException | None, got_of: str = "") -> bool:
        """pynetdicom's messages for a PDU that ended early (``exc``) or short (``got_of``), and Evt17."""
        if exc is not None:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
        else:
            LOGGER.error(f"The received PDU is shorter than expected ({got_of} bytes received)")
        self.event_queue.put("Evt17")
        return False

    def _finish_read(self, header: bytearray, pdu_length: int) -> None:
        """Continue pynetdicom's reader after the 6-byte header (any PDU but a bulk data-set P-DATA-TF)."""
        if header[0] not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOGGER.error(f"Unknown PDU type received '0x{header[0]:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = self._fast_socket.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            self._connection_lost(exc)
            return
        if len(body) != pdu_length:
            self._connection_lost(None, f"{6 + len(body)} of {6 + pdu_length}")
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
        """Flush the data set received so far in the background (:class:`dicom_node.net.fastpath.EarlyFlush`)."""
        if self._early is None:
            self._early = EarlyFlush()
        if self._early.busy():
            return
        try:
            f = self._data_set_file()
        except AttributeError:
            return
        self._early.after_new_data(f)

    def _is_transport_event(self) -> bool:
        """Read one PDU (pynetdicom); then give the disk a head start on what has arrived so far."""
        got = super()._is_transport_event()
        if got:
            self._early_flush()
        return got

    @property
    def _run_loop_delay(self) -> float:
        """Wait for socket data (up to 1 ms) instead of sleeping blindly; the reactor then sleeps 0."""
        return idle_wait(getattr(self.socket, "socket", None))

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:  # pynetdicom's __init__ sets it; the property decides
        pass


def _guard_state_machine(assoc, host: str) -> None:
    """An exception in a state-machine action (pynetdicom decoding a garbage command set, say) escapes the DUL's
    thread and kills it with a traceback. Instead: log what failed (:func:`dicom_node.net.guards.log_action_failure`),
    send an A-ABORT and end this association, as pynetdicom does for an exception in the rest of its reactor.

    Public API of pynetdicom 3.0.4 cannot: ``run_reactor`` calls ``state_machine.do_action`` outside its try
    block and offers no hook; the instance's ``do_action`` is wrapped."""
    machine = assoc.dul.state_machine
    do_action = machine.do_action

    def guarded(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:  # noqa: BLE001 - the peer's bytes made pynetdicom fail: end this association only
            log_action_failure(host, event, exc)
            _hard_abort(assoc)

    machine.do_action = guarded


def _hard_abort(assoc) -> None:
    """A-ABORT (service provider, reason not specified) and stop both reactors: pynetdicom's own way out of an
    exception in its DUL reactor (``run_reactor``), which sets the same private flags (``_kill``,
    ``_kill_thread``). ``Association.abort`` cannot: it goes through the state machine that has just failed, and
    when blocking it waits for the DUL thread this runs in."""
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


def _on_thread_end(assoc, ended: Callable[[Any], None]) -> None:
    """``ended(assoc)`` when the association's thread ends, however it ends (released, aborted, timed out, an
    exception): the server deletes what is left of its receive files and gives its connection and slot back.

    Public API of pynetdicom 3.0.4 cannot: no event is triggered on every way out of an acceptor's thread
    (EVT_CONN_CLOSE is not, when a reactor dies or is killed). ``Thread.start`` calls ``self.run()``: the
    instance attribute set here wins."""
    run = assoc.run

    def run_then_clean_up() -> None:
        try:
            run()
        finally:
            ended(assoc)

    assoc.run = run_then_clean_up


_RECEIVE_FILES = "_dicom_node_receive_files"  # attribute of an Association: the receive files its DUL created


def make_receive_files_with(factory: Callable[..., Any]) -> None:
    """Have pynetdicom create its receive files (C-STORE data sets streamed to disk with
    ``_config.STORE_RECV_CHUNKED_DATASET``) with ``factory`` (``tempfile.NamedTemporaryFile``'s arguments), and
    remember each by the association whose DUL thread created it (:func:`pop_receive_files`). Process-wide.

    Public API of pynetdicom 3.0.4 cannot: the only settings are ``STORE_RECV_CHUNKED_DATASET`` and
    ``tempfile.tempdir``; ``dimse_messages`` calls its module-level ``NamedTemporaryFile`` (replaced here) in the
    DUL thread, whose ``assoc`` attribute names the association."""

    def create(*args: Any, **kwargs: Any) -> Any:
        f = factory(*args, **kwargs)
        assoc = getattr(threading.current_thread(), "assoc", None)
        if assoc is not None:
            files = assoc.__dict__.setdefault(_RECEIVE_FILES, [])
            if len(files) >= 64:  # a long association: forget the files pynetdicom already removed
                files[:] = [g for g in files if os.path.exists(g.name)]
            files.append(f)
        return f

    dimse_messages.NamedTemporaryFile = create


def pop_receive_files(assoc) -> list[Any]:
    """The receive files the association's DUL created (see :func:`make_receive_files_with`), forgotten."""
    return assoc.__dict__.pop(_RECEIVE_FILES, [])


def rejection_result(assoc) -> int | None:
    """The A-ASSOCIATE-RJ result of a failed association request (1 permanent, 2 transient), or None.

    pynetdicom 3.0 has a race: when the peer rejects and closes the connection at once (dcmtk and most PACS
    do), the requesting thread can find the socket closed before it reads the queued rejection, and it then
    reports an abort. The rejection is still in the DUL's queue (``to_user_queue``, internal), so look there
    too. Public API of pynetdicom 3.0.4 cannot: ``assoc.is_rejected`` is the very flag the race leaves unset."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        return int(assoc.acceptor.primitive.result)
    queued = list(getattr(assoc.dul.to_user_queue, "queue", ()))
    for primitive in queued:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return int(primitive.result)
    return 0x01 if assoc.is_rejected else None
