"""Hostile and broken clients against the real node process, with raw sockets on loopback: connections that
close at once, stall in the handshake or inside a PDU, hold every slot from one host, or send garbage; and
every way a transfer can end leaves no partial file in tmp/ and no unreferenced file in the spool."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from support.dicom_factory import make_cxr
from support.node import NodeProcess, wait_for
from support.rawdicom import (
    associate_rq,
    c_store_command,
    closed_by_peer,
    connect,
    established,
    p_data,
    read_pdu,
)
from support.scu import send_file


@pytest.fixture(scope="module")
def one_slot_node(tmp_path_factory):
    """A node with a single association slot, shared by the tests that end or break their one association: each
    gets the slot back (which it checks) and none of them stores anything."""
    node = NodeProcess(tmp_path_factory.mktemp("one-slot"), node={"max_associations": 1})
    node.start()
    yield node
    node.kill()


A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)
A_RELEASE_RQ = struct.pack(">BBLL", 0x05, 0, 4, 0)


def echo(node, source: str = "127.0.0.1", calling: str = "PROBE") -> bool:
    """A C-ECHO with pynetdicom from ``source`` as ``calling``: True when the association was accepted and answered."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return ok


def tmp_files(node) -> list[Path]:
    """The files in the spool's tmp/, in its per-process folders (tmp/<owner>/) too."""
    return sorted(p for p in (Path(node.config["storage"]["root"]) / "tmp").rglob("*") if p.is_file())


def spool_files(node) -> set[str]:
    return {str(p) for p in (Path(node.config["storage"]["root"]) / "spool").rglob("*") if p.is_file()}


def referenced(node) -> set[str]:
    return {r["path"] for r in node.rows("SELECT path FROM instances")}


def start_store(node, source: str = "127.0.0.1", fragment: int = 8192) -> socket.socket:
    """An association with a C-STORE command and the first data-set fragment sent: the node has a partial
    file in tmp/ from here on."""
    s = established(node.port, node.ae_title, source)
    s.sendall(p_data(1, c_store_command(generate_uid()), command=True, last=True))
    s.sendall(p_data(1, b"\0" * fragment, command=False, last=False))
    wait_for(lambda: tmp_files(node), 5, what="the partial file")
    return s


def test_connections_that_close_at_once_free_their_slots_at_once(node_factory):
    node = node_factory(node={"max_associations": 2})
    for _ in range(30):
        connect(node.port).close()
    t0 = time.monotonic()
    wait_for(lambda: echo(node), 3, interval=0.1, what="a slot after 30 connect/close churners")
    assert time.monotonic() - t0 < 3
    assert echo(node) and echo(node)


def test_a_stalled_handshake_is_closed_and_never_takes_a_slot(node_factory):
    node = node_factory(node={"max_associations": 2, "acse_timeout_s": 2})
    rq = associate_rq(node.ae_title)
    stalled = []
    for _ in range(2):
        s = connect(node.port, "127.0.0.2")
        s.sendall(rq[:30])  # the first 30 bytes, then nothing
        stalled.append(s)
    assert echo(node) and echo(node)  # neither holds an association slot
    for s in stalled:
        waited = closed_by_peer(s, 6)
        assert waited is not None, "a connection stalled in the handshake was never closed"
    assert node.proc.poll() is None


def test_one_host_cannot_take_every_connection(node_factory):
    node = node_factory(node={"max_associations": 4, "max_connections_per_peer": 2})
    held = [connect(node.port, "127.0.0.3") for _ in range(2)]
    extra = connect(node.port, "127.0.0.3")
    assert closed_by_peer(extra, 5) is not None  # over the per-host limit, sending nothing: closed (REQUEST_WAIT_S)
    assert echo(node, "127.0.0.1")  # another host still gets in
    for s in held:
        s.close()
    wait_for(lambda: echo(node, "127.0.0.3"), 3, interval=0.1, what="the host's connections to be counted free")
    assert "127.0.0.3" in node.log() and "connections per host" in node.log()


LOCAL_LIMIT_EXCEEDED_RJ = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit


def test_associations_over_the_per_host_limit_are_rejected_transient_and_the_node_serves_on(node_factory):
    """30 associations at once from one host with the defaults (8 connections per host, 16 slots): 8 are
    served, the 22 others get an A-ASSOCIATE-RJ a sender retries (not a closed connection), pynetdicom and dcmtk
    alike.

    What each requestor received is taken from pynetdicom's ``EVT_PDU_RECV``, not from ``is_rejected``: when the
    RJ arrives and pynetdicom's own reactor closes the connection (AE-4) before its requesting thread has
    checked that the connection opened, pynetdicom 3.0 reports the association as aborted with the RJ unread
    in its queue (a race inside the client, seen about once in 30 on two cores)."""
    node = node_factory()
    start = threading.Barrier(30)

    def associate(_):
        answers: list = []
        ae = AE(ae_title="BUSYPACS")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 10
        start.wait(10)
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title=node.ae_title,
            evt_handlers=[(evt.EVT_PDU_RECV, lambda event: answers.append(event.pdu))],
        )
        return assoc, answers

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(associate, range(30)))
    held = [a for a, _ in results if a.is_established]
    rejections = [
        (pdu.result, pdu.source, pdu.reason_diagnostic)
        for a, answers in results
        if not a.is_established
        for pdu in answers
        if isinstance(pdu, A_ASSOCIATE_RJ)
    ]
    try:
        assert len(held) == 8 and len(rejections) == 22, (len(held), rejections)
        assert set(rejections) == {LOCAL_LIMIT_EXCEEDED_RJ}, rejections
        assert all(a.send_c_echo().Status == 0x0000 for a in held)  # the 8 are served meanwhile
        res = subprocess.run(
            ["echoscu", "-to", "5", "-ta", "5", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    finally:
        for a in held:
            a.release()
    wait_for(lambda: echo(node), 3, interval=0.1, what="the host's connections back")
    assert all(echo(node) for _ in range(3)) and node.proc.poll() is None
    assert node.log().count("connections per host") >= 23


def test_slow_clients_over_the_per_host_limit_hold_nothing(node_factory):
    """Over-limit connections that send nothing, trickle their request or never read the answer take no slot,
    no per-host count and no accept: others are served at once, and each is closed within about a second."""
    node = node_factory(node={"max_associations": 2, "max_connections_per_peer": 2})
    rq = associate_rq(node.ae_title)
    held = [connect(node.port, "127.0.0.5") for _ in range(2)]  # the host's 2 connections, silent
    opened = time.monotonic()
    silent = [connect(node.port, "127.0.0.5") for _ in range(5)]
    trickling = [connect(node.port, "127.0.0.5") for _ in range(5)]
    for s in trickling:
        s.sendall(rq[:3])
    deaf = connect(node.port, "127.0.0.5")  # sends its request, does not read the answer for now
    deaf.sendall(rq)
    deaf_sent = time.monotonic()
    t0 = time.monotonic()
    assert echo(node, "127.0.0.1") and echo(node, "127.0.0.1")  # both slots free: the refused hold none
    assert time.monotonic() - t0 < 1.5
    for s in trickling:
        s.sendall(rq[3:6])
    for s in held:
        s.close()
    wait_for(lambda: echo(node, "127.0.0.5"), 3, interval=0.1, what="the host served again")
    for s in silent + trickling:
        assert closed_by_peer(s, 6) is not None, "an over-limit connection was never closed"
    assert time.monotonic() - opened < 7
    time.sleep(max(0.0, deaf_sent + 2.5 - time.monotonic()))  # past the node's linger after its answer
    assert read_pdu(deaf) == (0x03, bytes((0, *LOCAL_LIMIT_EXCEEDED_RJ)))  # the rejection waited for it
    assert read_pdu(deaf) == (0, b"")  # then the node's close, no reset: the request had been read
    assert node.proc.poll() is None


def test_simultaneous_requests_get_exactly_the_configured_number_of_slots(node_factory):
    node = node_factory(node={"max_associations": 16, "max_connections_per_peer": 30})
    rq = associate_rq(node.ae_title)
    socks = [connect(node.port) for _ in range(30)]
    for s in socks:
        s.sendall(rq)
    answers = [read_pdu(s)[0] for s in socks]
    assert answers.count(0x02) == 16 and answers.count(0x03) == 14, answers
    for s in socks:
        s.close()
    wait_for(lambda: echo(node), 3, interval=0.1, what="slots back after the 30 closed")


def test_a_c_store_that_stalls_inside_a_pdu_is_closed_and_leaves_nothing(node_factory):
    node = node_factory(node={"max_associations": 1, "network_timeout_s": 2})
    s = start_store(node)
    s.sendall(struct.pack(">BBL", 0x04, 0, 65536) + b"\0" * 1024)  # a PDU of 64 KB, 1 KB of it sent
    waited = closed_by_peer(s, 8)
    assert waited is not None, "a C-STORE stalled inside a PDU was never closed"
    wait_for(lambda: not tmp_files(node), 3, what="tmp/ to be empty")
    wait_for(lambda: echo(node), 3, interval=0.1, what="the slot back")
    assert "network timeout" in node.log().lower()


@pytest.mark.parametrize("ending", ["abort", "reset", "release", "close"])
def test_a_transfer_that_ends_half_way_leaves_no_partial_file(one_slot_node, ending):
    node = one_slot_node
    s = start_store(node)
    if ending == "abort":
        s.sendall(A_ABORT)
    elif ending == "release":
        s.sendall(A_RELEASE_RQ)
    elif ending == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    s.close()
    wait_for(lambda: not tmp_files(node), 5, what=f"tmp/ to be empty after a {ending}")
    assert not spool_files(node)
    wait_for(lambda: echo(node), 3, interval=0.1, what="the slot back")


def test_refused_and_duplicate_instances_leave_no_file_behind(shared_node, tmp_path):
    node = shared_node
    before = len(referenced(node))
    ds = make_cxr(tmp_path / "a.dcm", rows=32, cols=32)
    assert send_file(node, tmp_path / "a.dcm").Status == 0x0000
    # the same SOP Instance UID in another study: acknowledged (stored once), no second file
    other = make_cxr(rows=32, cols=32, sop_uid=ds.SOPInstanceUID)
    other.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert other.StudyInstanceUID != ds.StudyInstanceUID
    assert send_file(node, tmp_path / "b.dcm").Status == 0x0000
    # refused: the data set's UID differs from the command's
    bad = make_cxr(tmp_path / "c.dcm", rows=32, cols=32)
    raw = (tmp_path / "c.dcm").read_bytes()
    (tmp_path / "c.dcm").write_bytes(
        raw.replace(
            bad.SOPInstanceUID.encode(),
            bad.SOPInstanceUID[:-1].encode() + (b"1" if bad.SOPInstanceUID[-1] != "1" else b"2"),
            1,
        )
    )
    assert send_file(node, tmp_path / "c.dcm").Status == 0xA900
    assert not tmp_files(node)
    assert spool_files(node) == referenced(node) and len(referenced(node)) == before + 1


def test_a_restart_after_a_crash_sweeps_partial_and_unreferenced_files(node_factory, tmp_path):
    node = node_factory()
    make_cxr(tmp_path / "a.dcm", rows=32, cols=32)
    assert send_file(node, tmp_path / "a.dcm").Status == 0x0000
    s = start_store(node)  # a transfer in flight when the machine dies
    node.kill()
    s.close()
    kept = referenced(node)
    root = Path(node.config["storage"]["root"])
    orphan = root / "spool" / "ab" / "1.2.3.4.5" / "9.9.9.dcm"  # placed, never committed (crash in between)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 100)
    assert tmp_files(node)
    node.start()
    assert not tmp_files(node)
    assert spool_files(node) == kept and all(os.path.exists(p) for p in kept)
    assert "unreferenced" in node.log()
    assert (root / "orphans" / "spool" / "ab" / "1.2.3.4.5" / "9.9.9.dcm").is_file()  # set aside, not deleted


def test_a_garbage_command_set_ends_that_association_only(one_slot_node):
    node = one_slot_node
    mark = node.log_mark()
    s = established(node.port, node.ae_title)
    s.sendall(p_data(1, b"\x07\x00\x99\x00garbage garbage garbage", command=True, last=True))
    assert closed_by_peer(s, 5) is not None
    wait_for(lambda: echo(node), 3, interval=0.1, what="the slot back")
    assert node.proc.poll() is None
    log = node.log(mark)
    assert "Exception in thread" not in log  # no reactor thread died
    assert "DIMSE message could not be processed" in log
    assert "has no attribute" not in log  # pynetdicom's own exception messages are withheld (may quote data)


def _deflated_file(path: Path, pixel_bytes: int, rows: int, cols: int) -> Path:
    """A DX file in Deflated Explicit VR Little Endian whose Pixel Data holds ``pixel_bytes`` zero bytes,
    written (and deflated) in pieces: a 600 MB image costs the test 600 kB."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_cxr(rows=32, cols=32)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(packer.compress(body.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)))
        zeros = b"\0" * (1 << 20)
        for _ in range(pixel_bytes >> 20):
            f.write(packer.compress(zeros))
        f.write(packer.compress(b"\0" * (pixel_bytes % (1 << 20))) + packer.flush())
    return path


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _send_deflated(node, path: Path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return send_file(node, path, [DeflatedExplicitVRLittleEndian])


def test_a_deflate_bomb_is_refused_with_bounded_memory(node_factory, tmp_path):
    node = node_factory(node={"max_inflated_mb": 256})
    bomb = _deflated_file(tmp_path / "bomb.dcm", 18000 * 18000 * 2, 18000, 18000)  # 648 MB of pixels
    assert bomb.stat().st_size < 2 << 20
    ok = _deflated_file(tmp_path / "ok.dcm", 256 * 256 * 2, 256, 256)
    assert _send_deflated(node, ok).Status == 0x0000  # a deflated image of ordinary size is stored
    before = _peak_rss_mb(node.proc.pid)
    status = _send_deflated(node, bomb)
    assert status.Status == 0xC210 and "inflates beyond 256 MB" in status.ErrorComment
    assert _peak_rss_mb(node.proc.pid) - before < 100  # the node's peak memory barely moved
    assert "node.max_inflated_mb" in node.log()
    assert not tmp_files(node) and node.status()["instances"]["total"] == 1


def test_a_data_set_shorter_than_its_own_lengths_is_refused_naming_the_element(shared_node, tmp_path):
    node = shared_node
    stored, mark = spool_files(node), node.log_mark()
    make_cxr(tmp_path / "a.dcm", rows=64, cols=64)
    raw = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[:-3000])  # the transfer stopped inside the pixel data
    status = send_file(node, tmp_path / "cut.dcm")
    assert status.Status == 0xC210 and "ends inside PixelData" in status.ErrorComment
    assert not tmp_files(node) and spool_files(node) == stored
    assert "ends inside PixelData" in node.log(mark)


@pytest.mark.slow  # check-config loads the shipped models
def test_a_calling_ae_is_accepted_only_from_its_own_host(node_factory):
    node = node_factory(node={"allowed_peers": [{"ae_title": "PACS", "hosts": ["127.0.0.2", "127.0.1.0/24"]}]})

    assert echo(node, "127.0.0.2", "PACS") and echo(node, "127.0.1.7", "PACS")
    assert not echo(node, "127.0.0.1", "PACS")  # a known AE title on the wrong host
    assert not echo(node, "127.0.0.2", "OTHER")  # an unknown AE title on a known host
    log = node.log()
    assert "PACS (127.0.0.1) rejected" in log and "node.allowed_peers" in log
    bad = node.folder / "bad.yaml"
    bad.write_text("node:\n  allowed_peers:\n    - ae_title: PACS\n      hosts: [pacs.example]\n")
    out = node.cli("check-config", check=False)
    assert out.returncode == 0
    res = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "not an IP address or network" in res.stdout + res.stderr


@pytest.mark.parametrize("vr", [b"lo", b"\x01\x02"])
def test_an_invalid_vr_after_the_uids_is_refused_naming_the_element(shared_node, tmp_path, vr):
    """pydicom reads an element whose VR is not two capital letters as implicit VR and goes on misreading the
    rest: the data set then seemed to end before its Pixel Data, and was stored as "no pixel data"."""
    node = shared_node
    stored, mark = spool_files(node), node.log_mark()
    ds = make_cxr(tmp_path / "good.dcm", rows=64, cols=64)
    raw = (tmp_path / "good.dcm").read_bytes()
    study_id = b"\x20\x00\x10\x00SH"  # (0020,0010) Study ID, after the Study and Series Instance UIDs
    assert raw.count(study_id) == 1 and raw.index(study_id) > raw.index(ds.SeriesInstanceUID.encode())
    (tmp_path / "bad.dcm").write_bytes(raw.replace(study_id, study_id[:4] + vr))
    status = send_file(node, tmp_path / "bad.dcm")  # the file's bytes as they are
    shown = f"'{vr.decode()}'" if vr.isalpha() else f"0x{vr.hex()}"
    assert status.Status == 0xC210, hex(status.Status)
    assert status.ErrorComment == f"dataset cannot be decoded: bad VR {shown} in (0020,0010) StudyID"
    assert not tmp_files(node) and spool_files(node) == stored
    assert not node.rows_of("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,))
    assert not node.rows_of("SELECT 1 FROM studies WHERE study_uid = ?", (ds.StudyInstanceUID,))
    assert not node.rows_of("SELECT 1 FROM jobs WHERE study_uid = ?", (ds.StudyInstanceUID,))
    assert "(0020,0010) StudyID" in node.log(mark) and "no pixel data" not in node.log(mark)
    assert send_file(node, tmp_path / "good.dcm").Status == 0x0000  # the same image, well formed, is stored
