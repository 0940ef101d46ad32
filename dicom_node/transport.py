"""A faster receive path for pynetdicom's acceptor associations.

Two costs dominate pynetdicom when a large radiograph arrives, and both are fixed here without touching
anything else of pynetdicom's behaviour:

1. ``AssociationSocket.recv`` reads at most 4096 bytes per ``socket.recv`` call and grows a bytearray each
   time (an 8 MB image: ~2000 system calls and reallocations). ``FastRecvSocket`` reads into one
   preallocated buffer with ``recv_into`` in large chunks.
2. The DUL reactor sleeps ``_run_loop_delay`` (1 ms) whenever its event queue is empty, even when the next
   PDU is already waiting on the socket: one 1 ms pause per PDU (~64 per 8 MB image with 128 KB PDUs).
   ``FastDUL`` turns that sleep into a ``select()`` on the socket with the same 1 ms timeout, so it wakes as
   soon as data arrives and still idles at the same low CPU cost.

3. The received data set is streamed into a file (``STORE_RECV_CHUNKED_DATASET``) and must be fsync'd before
   the C-STORE is acknowledged. Writing 8 MB back to disk takes ~15 ms on its own; ``FastDUL`` asks the kernel
   (``sync_file_range``, Linux) to start writing each new megabyte while the rest is still arriving, so the
   final fsync only waits for the tail. Where the call is missing, nothing changes.

4. Small segments wait on Nagle's algorithm and delayed ACKs: our sockets get TCP_NODELAY (``no_delay``, also
   used by the sender), and the receive path acknowledges at once (``quick_ack``), so a sender that keeps
   Nagle on (dcmtk, most PACS) is not stalled ~40 ms per PDU.

All of it is applied per association by the request handler of the server class below, which is what
``AE.make_server(server_class=...)`` is meant for.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import socket

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

CHUNK = 1 << 20
IDLE_WAIT_S = 0.001
WRITEBACK_STEP = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


SYNC_FILE_RANGE = _sync_file_range()


class FastRecvSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = self.socket.recv_into(view[got:], min(CHUNK, nr_bytes - got))
            if n == 0:   # connection closed: return what arrived, as pynetdicom does
                view.release()
                return buf[:got]
            got += n
            quick_ack(self.socket)
        view.release()
        return buf


class FastDUL(DULServiceProvider):
    _writeback: tuple[int, int] = (-1, 0)   # (inode, bytes already handed to the kernel for writing)

    def _start_writeback(self) -> None:
        """Let the kernel start writing the data set received so far (see the module docstring)."""
        message = getattr(self.assoc.dimse, "message", None)
        f = getattr(message, "_data_set_file", None)
        if f is None or SYNC_FILE_RANGE is None or f.closed:
            return
        fd = f.fileno()
        st = os.fstat(fd)
        done = self._writeback[1] if self._writeback[0] == st.st_ino else 0
        if st.st_size - done >= WRITEBACK_STEP:
            SYNC_FILE_RANGE(fd, done, st.st_size - done, _SYNC_FILE_RANGE_WRITE)
            self._writeback = (st.st_ino, st.st_size)

    @property
    def _run_loop_delay(self) -> float:
        """Wait for socket data (up to 1 ms) instead of sleeping blindly; the reactor then sleeps 0."""
        try:
            self._start_writeback()
        except (OSError, ValueError, AttributeError):   # a closed or finished file: nothing to start
            pass
        sock = getattr(self.socket, "socket", None)
        if sock is not None:
            try:
                select.select([sock], [], [], IDLE_WAIT_S)
                return 0.0
            except (OSError, ValueError):   # closed socket: fall back to the plain sleep
                pass
        return IDLE_WAIT_S

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:   # pynetdicom's __init__ sets it; the property decides
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


class FastRequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        no_delay(self.request)
        assoc.dul.socket.__class__ = FastRecvSocket   # same state, faster recv
        assoc.dul.__class__ = FastDUL                  # same state, no blind sleep between PDUs
        return assoc


class FastThreadedAssociationServer(ThreadedAssociationServer):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("request_handler", FastRequestHandler)
        super().__init__(*args, **kwargs)
