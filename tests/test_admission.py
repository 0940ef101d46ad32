"""The refuser of over-limit connections (:class:`dicom_node.net.admission.Refuser`) in this process, on socket
pairs: what it answers, when it closes, and that slow or flooding peers cost it nothing unbounded. The same
against the real node, with pynetdicom and dcmtk clients: tests/test_hostile.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dicom_node.net.admission import LOCAL_LIMIT_EXCEEDED, Refuser, reject_pdu
from support.node import wait_for
from support.rawdicom import associate_rq

RJ = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"  # PS3.8 Table 9-21: transient, service-provider (presentation), 2


@pytest.fixture
def refuser():
    r = Refuser(wait_s=0.3, linger_s=0.3, max_pending=4)
    yield r
    r.close()


def pair(refuser: Refuser) -> socket.socket:
    """A connection handed to ``refuser``; returns the peer's end."""
    ours, peer = socket.socketpair()
    peer.settimeout(3)
    refuser.refuse(ours, "127.0.0.9")
    return peer


def read_until_closed(peer: socket.socket) -> tuple[bytes, float]:
    """Everything the refuser sent before it closed, and how long that took."""
    t0, got = time.monotonic(), b""
    while part := peer.recv(4096):
        got += part
    return got, time.monotonic() - t0


def test_the_rejection_pdu_is_the_one_of_ps3_8():
    assert reject_pdu(*LOCAL_LIMIT_EXCEEDED) == RJ


def test_a_request_is_answered_at_once_and_let_go_once_the_peer_closes():
    refuser = Refuser(wait_s=10, linger_s=10)
    try:
        peer = pair(refuser)
        rq = associate_rq("DICOM_NODE")
        peer.sendall(rq[:4])  # in parts, as TCP may deliver it
        time.sleep(0.05)
        peer.sendall(rq[4:])
        assert peer.recv(64) == RJ
        peer.close()  # as a requestor does on a rejection: let go at once, not after the linger
        wait_for(lambda: refuser.pending() == 0, 3, interval=0.01, what="the connection let go")
        assert refuser.answered == 1
    finally:
        refuser.close()


def test_a_peer_that_does_not_close_after_the_answer_is_closed_after_the_linger(refuser):
    peer = pair(refuser)
    peer.sendall(associate_rq("DICOM_NODE"))
    got, waited = read_until_closed(peer)
    assert got == RJ and 0.2 < waited < 2.0
    wait_for(lambda: refuser.pending() == 0, 1, interval=0.01)


@pytest.mark.parametrize("sends", ["nothing", "trickle"])
def test_no_request_in_time_no_answer(refuser, sends):
    peer = pair(refuser)
    t0 = time.monotonic()
    if sends == "trickle":  # a byte every 50 ms: never the whole request before the deadline
        rq = associate_rq("DICOM_NODE")

        def trickle():
            for i in range(20):
                try:
                    peer.send(rq[i : i + 1])
                except OSError:
                    return
                time.sleep(0.05)

        threading.Thread(target=trickle, daemon=True).start()
    got, _ = read_until_closed(peer)
    waited = time.monotonic() - t0
    assert got == b"" and 0.25 < waited < 2.0, waited  # closed at the deadline (0.3 s), unanswered
    wait_for(lambda: refuser.pending() == 0, 1, interval=0.01)
    assert refuser.answered == 0


def test_a_pdu_other_than_a_request_is_closed_at_once_unanswered():
    refuser = Refuser(wait_s=10)
    try:
        peer = pair(refuser)
        peer.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT
        got, waited = read_until_closed(peer)
        assert got == b"" and waited < 5
        assert refuser.answered == 0
    finally:
        refuser.close()


def test_a_flood_is_bounded_and_takes_one_thread(refuser):
    peers = [pair(refuser) for _ in range(20)]
    assert refuser.pending() == 4  # max_pending: the other 16 were closed at once
    assert [t.name for t in threading.enumerate()].count("refuser") == 1
    closed_at_once = 0
    for p in peers[4:]:
        p.settimeout(0.1)
        closed_at_once += p.recv(64) == b""
    assert closed_at_once == 16
    for p in peers[:4]:
        p.sendall(associate_rq("DICOM_NODE"))
        assert p.recv(64) == RJ
        p.close()
    wait_for(lambda: refuser.pending() == 0, 1, interval=0.01)
    again = pair(refuser)  # room again
    again.sendall(associate_rq("DICOM_NODE"))
    assert again.recv(64) == RJ


def test_close_lets_go_of_everything(refuser):
    peers = [pair(refuser) for _ in range(3)]
    refuser.close()
    for p in peers:
        assert read_until_closed(p)[0] == b""
    assert refuser.pending() == 0
    late = pair(refuser)  # after close: closed at once
    assert late.recv(64) == b""
