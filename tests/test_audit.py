"""The audit trail of the real node: one JSON line per association, stored or refused instance, refused
connection; nothing that names the patient or the study; rotated at its size limit. (Jobs and deliveries are
checked in the end-to-end test with Orthanc, where they happen.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.audit import study_key
from support.dicom_factory import make_cxr
from support.node import wait_for
from support.rawdicom import closed_by_peer, connect
from support.scu import send_file


def trail(node) -> list[dict]:
    root = Path(node.config["storage"]["root"])
    lines = []
    for f in sorted(root.glob("audit.jsonl*"), reverse=True):
        lines += [json.loads(line) for line in f.read_text().splitlines()]
    return lines


def test_the_audit_trail_records_who_sent_what_and_who_was_turned_away(node_factory, tmp_path):
    node = node_factory(node={"max_connections_per_peer": 2})
    canary = {"patient_name": "CANARY^AUDIT", "patient_id": "CANARYAUDIT77"}
    ds = make_cxr(tmp_path / "a.dcm", rows=32, cols=32, **canary)
    assert send_file(node, tmp_path / "a.dcm").Status == 0x0000
    bad = make_cxr(tmp_path / "b.dcm", rows=32, cols=32, **canary)
    raw = (tmp_path / "b.dcm").read_bytes()
    uid = bad.SOPInstanceUID
    (tmp_path / "b.dcm").write_bytes(
        raw.replace(uid.encode(), (uid[:-1] + ("1" if uid[-1] != "1" else "2")).encode(), 1)
    )
    assert send_file(node, tmp_path / "b.dcm").Status == 0xA900
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", node.port, ae_title="WRONG_AE").is_established
    held = [connect(node.port, "127.0.0.4") for _ in range(2)]
    extra = connect(node.port, "127.0.0.4")
    assert closed_by_peer(extra, 5) is not None
    for s in held:
        s.close()

    wait_for(lambda: any(e["event"] == "connection_refused" for e in trail(node)), 5, what="the refusal line")
    events = trail(node)
    kinds = [e["event"] for e in events]
    assert kinds.count("association_accepted") == 2 and kinds.count("association_rejected") == 1
    stored = next(e for e in events if e["event"] == "instance_stored")
    assert stored["calling_ae"] == "PYSCU" and stored["peer"] == "127.0.0.1" and not stored["duplicate"]
    assert stored["study"] == study_key(ds.StudyInstanceUID) and stored["bytes"] > 0
    assert stored["sop_class"] == "Digital X-Ray Image Storage - For Presentation"
    refused = next(e for e in events if e["event"] == "instance_refused")
    assert refused["status"] == "0xA900" and "differs from the command" in refused["reason"]
    rejected = next(e for e in events if e["event"] == "association_rejected")
    assert rejected["calling_ae"] == "PROBE" and rejected["reason"] == "called AE title not recognised"
    assert next(e for e in events if e["event"] == "connection_refused")["peer"] == "127.0.0.4"
    assert all(e["ts"].endswith("+00:00") and isinstance(e["pid"], int) for e in events)
    text = "".join(f.read_text() for f in Path(node.config["storage"]["root"]).glob("audit.jsonl*"))
    for secret in ("CANARY", ds.StudyInstanceUID, ds.SOPInstanceUID, ds.SeriesInstanceUID):
        assert secret not in text


def test_the_audit_trail_rotates_and_keeps_whole_lines(node_factory, tmp_path):
    node = node_factory(logging={"audit_max_mb": 0.002, "audit_backups": 2})
    for i in range(12):
        make_cxr(tmp_path / f"{i}.dcm", rows=32, cols=32)
        assert send_file(node, tmp_path / f"{i}.dcm").Status == 0x0000
    root = Path(node.config["storage"]["root"])
    files = sorted(p.name for p in root.glob("audit.jsonl*"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # the oldest beyond 2 backups dropped
    for f in root.glob("audit.jsonl*"):
        assert f.stat().st_size < 4000
        for line in f.read_text().splitlines():
            json.loads(line)


def test_processes_sharing_one_trail_rotate_it_once_per_limit(tmp_path):
    """``serve`` and its workers, or a standalone ``dicom-node worker``, append to one instance's file, and each may
    rotate it: three processes writing at once leave every kept file whole, each old one full (rotated once, past
    the limit; a second rotation by another process would have left a small one) and none far beyond the limit."""
    path = tmp_path / "audit-host-a.jsonl"
    limit = 4000
    script = (
        "import sys, time\nfrom dicom_node import audit\n"
        "audit.configure(sys.argv[1], int(sys.argv[2]), 3)\n"
        "time.sleep(max(0.0, float(sys.argv[4]) - time.time()))\n"  # all three start writing together
        "for i in range(500):\n    audit.event('probe', n=i, writer=sys.argv[3])\n"
    )
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(limit), str(k), start]) for k in range(3)]
    assert all(p.wait(60) == 0 for p in procs)
    names = sorted(p.name for p in tmp_path.glob("audit-host-a.jsonl*"))
    backups = [f"{path.name}.{i}" for i in (1, 2, 3)]
    assert names in ([path.name, *backups], backups), names  # no current file when the last line rotated it
    for i in (1, 2, 3):
        size = path.with_name(f"{path.name}.{i}").stat().st_size
        assert limit < size < limit + 3 * 200, (i, size)  # full, and at most a line per process beyond
    for f in tmp_path.glob("audit-host-a.jsonl*"):
        assert all(json.loads(line)["event"] == "probe" for line in f.read_text().splitlines())
