"""kill -9 in the middle of a transfer: every acknowledged instance survives, and study timers still fire."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from test_ingest import by_sop

from support.dicom_factory import make_cxr
from support.node import wait_for


def test_kill9_during_storescu_loses_no_acknowledged_instance(node_factory, tmp_path):
    node = node_factory(studies={"stable_after_s": 2})
    study = generate_uid()
    files = {}
    for i in range(150):
        p = tmp_path / "in" / f"{i:03d}.dcm"
        files[str(p)] = make_cxr(p, rows=384, cols=384, study_uid=study, modality="CR").SOPInstanceUID
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    acked: list[str] = []
    current = None
    killed = threading.Event()
    for line in proc.stdout:
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(files[current])
            if len(acked) == 40 and not killed.is_set():
                node.kill()
                killed.set()
    proc.wait(60)
    assert killed.is_set(), "storescu finished before the node was killed"
    assert 40 <= len(acked) < 150
    node.start()  # same folder, same config
    rows = by_sop(node)
    for sop in acked:
        assert sop in rows, "an acknowledged instance was lost"
        assert rows[sop]["study_uid"] == study
        ds = pydicom.dcmread(rows[sop]["path"])
        assert ds.SOPInstanceUID == sop and ds.pixel_array.shape == (384, 384)
    assert node.status()["studies"]["total"] == 1
    assert not list(Path(node.config["storage"]["root"], "tmp").glob("*.part"))
    # the study's stable timer was pending at the kill: it fires after restart and queues one job
    assert "re-armed 1 study timers" in node.log()
    st = wait_for(lambda: (s := node.status())["jobs"]["queued"] == 1 and s, 30, what="job after restart")
    assert st["studies"]["receiving"] == 0
    # the rest of the study arrives later: a new job (re-analysis), no image lost
    rest = [f for f, sop in files.items() if sop not in set(acked)]
    r = subprocess.run(
        ["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *rest], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert len(by_sop(node)) == 150
    wait_for(lambda: node.status()["studies"]["receiving"] == 0, 30, what="study stable again")
    # no worker ran yet, so the late instances join the still-queued job (it analyses the whole study)
    assert {r["job_id"] for r in by_sop(node).values()} == {1}
    assert node.status()["jobs"] == {"total": 1, "queued": 1, "running": 0, "done": 0, "failed": 0}
