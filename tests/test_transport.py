"""The fast receive path (dicom_node/net/fastpath.py, pynetdicom_internals.py) is really taken, and pynetdicom's
own path still works when it is not: a node in this process (the composition root's Node, bound to port 0),
dcmtk's storescu as the sender.

pynetdicom is pinned to one minor range because the fast path extends its internals; with another version
these tests say at once whether the fast path still engages (first test) and whether the fallback is correct."""

from __future__ import annotations

import subprocess
import tempfile

import numpy as np
import pydicom
import pytest
from pynetdicom import _config as pynetdicom_config

from dicom_node.app import Node
from dicom_node.config import parse_config
from dicom_node.net import pynetdicom_internals as transport
from support.dicom_factory import make_cxr


@pytest.fixture
def node_in_process(tmp_path, monkeypatch):
    """A Node in this process; the process-wide settings it makes are undone after the test."""
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", pynetdicom_config.STORE_RECV_CHUNKED_DATASET)
    cfg = parse_config(
        {
            "node": {"host": "127.0.0.1", "port": 0},
            "storage": {"root": str(tmp_path / "var"), "min_free_disk_mb": 1},
            "workers": {"count": 0},
            "studies": {"stable_after_s": 60},
            "web": {"enabled": False},
        },
        tmp_path,
    )
    node = Node(cfg)
    assert node.start() == node.port > 0  # the port the OS chose
    yield node
    node.stop()


def send_and_check(node: Node, tmp_path, size: int) -> int:
    """storescu one random 16-bit image of size x size; returns its data set's size in bytes after checking
    that the spool holds exactly what was sent."""
    pixels = np.random.default_rng(size).integers(0, 4096, (size, size), dtype=np.uint16)
    ds = make_cxr(tmp_path / "sent.dcm", rows=size, cols=size, pixels=pixels)
    r = subprocess.run(
        ["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), str(tmp_path / "sent.dcm")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "Failed" not in r.stdout + r.stderr, r.stderr
    got = pydicom.dcmread(node.store.spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID))
    assert got.PixelData == ds.PixelData and got == ds
    return len(ds.PixelData)


def test_fast_path_engages_and_writes_the_bulk_of_the_data_set(node_in_process, tmp_path):
    before = transport.STATS.snapshot()
    n = send_and_check(node_in_process, tmp_path, 1024)  # 2 MB in 16 KB PDUs (storescu's default)
    after = transport.STATS.snapshot()
    assert after["engaged"] - before["engaged"] == 1
    assert after["fallback"] == before["fallback"]
    # every P-DATA but the command and the last fragment goes straight from the socket to the spool file
    assert after["direct_bytes"] - before["direct_bytes"] > 0.9 * n


def test_unexpected_pynetdicom_internals_fall_back_to_pynetdicoms_path(node_in_process, tmp_path, monkeypatch):
    class OtherDUL:  # stands for "not the class the fast path was written against"
        pass

    monkeypatch.setattr(transport, "DULServiceProvider", OtherDUL)
    before = transport.STATS.snapshot()
    send_and_check(node_in_process, tmp_path, 1024)
    after = transport.STATS.snapshot()
    assert after["fallback"] - before["fallback"] == 1
    assert after["engaged"] == before["engaged"] and after["direct_bytes"] == before["direct_bytes"]
