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

Both are applied per association by the request handler of the server class below, which is what
``AE.make_server(server_class=...)`` is meant for.
"""
from __future__ import annotations

import select

from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

CHUNK = 1 << 20
IDLE_WAIT_S = 0.001


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
        view.release()
        return buf


class FastDUL(DULServiceProvider):
    @property
    def _run_loop_delay(self) -> float:
        """Wait for socket data (up to 1 ms) instead of sleeping blindly; the reactor then sleeps 0."""
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


class FastRequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = FastRecvSocket   # same state, faster recv
        assoc.dul.__class__ = FastDUL                  # same state, no blind sleep between PDUs
        return assoc


class FastThreadedAssociationServer(ThreadedAssociationServer):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("request_handler", FastRequestHandler)
        super().__init__(*args, **kwargs)
