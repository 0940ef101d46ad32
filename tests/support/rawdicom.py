"""Raw DICOM upper-layer traffic for hostile-client tests: the PDUs a real sender would write, built by hand
(pynetdicom's own PDU classes for the association request), sent over plain sockets so that a test can stop,
stall or garble them anywhere."""

from __future__ import annotations

import socket
import struct
import time

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def associate_rq(called: str, calling: str = "HOSTILE", abstract: str = DX_STORAGE) -> bytes:
    """An A-ASSOCIATE-RQ PDU offering ``abstract`` (context 1) and Verification (context 3)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    contexts = []
    for cid, uid in ((1, abstract), (3, VERIFICATION)):
        cx = build_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
        cx.context_id = cid
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.9.9"
    prim.user_information = [ml, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def p_data(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    """A P-DATA-TF PDU with one PDV item."""
    control = (1 if command else 0) | (2 if last else 0)
    item = struct.pack(">LBB", 2 + len(data), context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def c_store_command(sop_uid: str, sop_class: str = DX_STORAGE, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group length first)."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_uid
    body = encode(cmd, True, True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the node from ``source`` (any 127.x.y.z address works on Linux loopback)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_pdu(s: socket.socket) -> tuple[int, bytes]:
    """One PDU (type, body); (0, b"") when the node closed the connection."""
    head = _read_exact(s, 6)
    if len(head) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", head)
    return pdu_type, _read_exact(s, length)


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            part = s.recv(n - len(buf))
        except ConnectionResetError:
            return buf
        if not part:
            return buf
        buf += part
    return buf


def established(port: int, called: str, source: str = "127.0.0.1", calling: str = "HOSTILE") -> socket.socket:
    """A connection with an accepted association (raises if the node did not accept)."""
    s = connect(port, source)
    s.sendall(associate_rq(called, calling))
    pdu_type, _ = read_pdu(s)
    if pdu_type != 0x02:
        s.close()
        raise AssertionError(f"association not accepted (PDU type 0x{pdu_type:02X})")
    return s


def closed_by_peer(s: socket.socket, within: float) -> float | None:
    """Seconds until the node closed (or reset) the connection, reading and discarding whatever it sends
    (an A-ABORT, say); None if it was still open after ``within`` seconds."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < within:
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
    return None
