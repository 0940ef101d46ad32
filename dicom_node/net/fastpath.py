"""The fast receive path: what makes a C-STORE of an 8 MB radiograph cost less than its disk write.

pynetdicom handles every PDU in Python, one reactor cycle at a time; with an 8 MB radiograph in 64 PDUs that
cost more than the disk. What the acceptor does differently, per association:

1. Reading. ``AssociationSocket.recv`` reads at most 4096 bytes per call into a growing bytearray (~2000
   system calls per image). The fast socket reads into preallocated buffers with ``recv_into``
   (:func:`dicom_node.net.guards.recv_into_bounded`).
2. The bulk of a C-STORE data set. pynetdicom decodes each P-DATA-TF into a PDU object and a primitive, runs
   the state machine (DT-2) and the DIMSE decoder, and all that ends in one file write. The fast DUL writes the
   fragments of such a PDU (:func:`dataset_fragments`) straight from a reused buffer into that same file, and
   reads the next PDU in the same cycle while it is already waiting on the socket (up to :data:`BATCH_BYTES`).
   Only plain data-set fragments in state Sta6 take this path; commands, the last fragment of a data set and
   every other PDU take pynetdicom's own.
3. Idle waits. The DUL reactor sleeps 1 ms whenever its event queue is empty, even when the next PDU is
   already waiting; the fast DUL waits in ``select()`` on the socket instead (:func:`idle_wait`, same 1 ms).
4. Durability. The data set must be fsync'd before the C-STORE is acknowledged, and on these disks the device
   flush is the cost (~2-3 ms per MB; starting writeback early with ``sync_file_range`` does not help).
   :class:`EarlyFlush` flushes the file in the background (``fdatasync`` on a duplicate descriptor, in a small
   thread pool) after each new megabyte while the rest is still arriving, so the handler's own fsync - which
   still decides - mostly has only the tail left (:func:`start_flush` is the handler's own head start).
5. Small segments wait on Nagle's algorithm and delayed ACKs: our sockets get TCP_NODELAY (:func:`no_delay`,
   also used by the sender), and the receive path acknowledges at once (:func:`quick_ack`), so a sender that
   keeps Nagle on (dcmtk, most PACS) is not stalled ~40 ms per PDU.

This module holds the parts that need nothing of pynetdicom. The subclasses that put them into an association
(``FastDUL``, ``FastRecvSocket``) extend pynetdicom's internals and live, with every other such piece, in
:mod:`dicom_node.net.pynetdicom_internals`. :data:`STATS` counts what took which path;
``tests/test_transport.py`` fails if the fast path is not taken, and checks the fallback. ``bench/ingest.py``
measures the effect.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

CHUNK = 1 << 20  # most bytes asked of one recv_into call
BATCH_BYTES = 4 << 20  # most data-set bytes taken per reactor cycle while more is waiting
IDLE_WAIT_S = 0.001
FLUSH_STEP = 1 << 20

PDU_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
P_DATA_TF = 0x04


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


class EarlyFlush:
    """One association's background flushes of the data set it is receiving: at most one in flight, one per
    :data:`FLUSH_STEP` new bytes of the same file."""

    def __init__(self) -> None:
        self._flushed: tuple[int, int] = (-1, 0)  # (inode, file size at the last early flush)
        self._flushing: Future | None = None

    def busy(self) -> bool:
        return self._flushing is not None and not self._flushing.done()

    def after_new_data(self, f: Any) -> None:
        """Flush the open file ``f`` in the background when a step has arrived since the last flush. Never
        raises: it is only a head start, on the reactor's thread."""
        try:
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


def dataset_fragments(body: memoryview) -> list[memoryview] | None:
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


def data_waiting(sock: socket.socket) -> bool:
    """Whether the next bytes are already there (no wait)."""
    return bool(select.select([sock], [], [], 0)[0])


def idle_wait(sock: socket.socket | None) -> float:
    """Wait for socket data (up to :data:`IDLE_WAIT_S`) instead of sleeping blindly; returns how long the
    reactor should still sleep (0, or the plain sleep when there is no socket to wait on)."""
    if sock is not None:
        try:
            select.select([sock], [], [], IDLE_WAIT_S)
            return 0.0
        except (OSError, ValueError):  # closed socket: fall back to the plain sleep
            pass
    return IDLE_WAIT_S


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
