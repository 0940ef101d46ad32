"""End to end with a real PACS: Orthanc auto-routes chest X-rays to the node (Lua rule), the node analyses each
study and sends SR, SC and GSPS back; found through Orthanc's REST API and compared with `dicom-node analyze`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.audit import study_key
from support.dicom_factory import make_cxr
from support.models import make_tiny_models
from support.node import wait_for
from support.orthanc import Orthanc

pytestmark = pytest.mark.slow  # Orthanc with its Python routing plugin as the PACS

FINDING = "121071"  # DCM "Finding"


def content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def sr_findings(sr) -> list[tuple[str, str, tuple[float, float, float, float]]]:
    """(source SOP Instance UID, finding code value, box) for every image region in the SR: a group's own SCOORD,
    or the one its measurement is INFERRED FROM (TID 1501, as the node writes its boxes)."""
    out = []
    for group in content_items(sr):
        children = group.get("ContentSequence", [])
        scoords = [c for c in children if c.ValueType == "SCOORD"] or [
            s for c in children if c.ValueType == "NUM" for s in c.get("ContentSequence", []) if s.ValueType == "SCOORD"
        ]
        codes = [
            c.ConceptCodeSequence[0].CodeValue
            for c in children
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == FINDING
        ]
        if not scoords or not codes:
            continue
        sc = scoords[0]
        assert sc.GraphicType == "POLYLINE"
        xs, ys = [float(v) for v in sc.GraphicData[0::2]], [float(v) for v in sc.GraphicData[1::2]]
        assert (xs[0], ys[0]) == (xs[-1], ys[-1]) and len(xs) == 5, "closed 5-point polyline"
        ref = sc.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        out.append((ref, codes[0], (min(xs), min(ys), max(xs), max(ys))))
    return out


def analyze(files: list[Path], models: dict, out: Path, tmp_path: Path) -> dict[str, dict]:
    """Run `dicom-node analyze` on the same files with the same models: {SOP Instance UID: result JSON}."""
    cfg = tmp_path / "analyze.yaml"
    cfg.write_text(json.dumps({"inference": {"models": models, "fusion": {"max_findings": 5}}}))
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "analyze", *map(str, files), "--output", str(out), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    results = {}
    for f in files:
        sop = pydicom.dcmread(f, force=True, stop_before_pixels=True).SOPInstanceUID
        results[sop] = json.loads((out / f"{f.stem}.json").read_text())
    return results


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e-models")
    clf, det = make_tiny_models(folder, p_abnormal=0.8, detector_logit=-0.5, detector_gain=1e6)
    return {"classifier": str(clf), "detector": str(det)}


@pytest.fixture
def pacs_and_node(tmp_path, node_factory, models):
    """Orthanc routing chest X-rays to a node that sends SR + SC + GSPS back to it."""
    started = []

    def make(node_over: dict | None = None, **orthanc_kw):
        pacs = Orthanc(tmp_path / f"orthanc{len(started)}", **orthanc_kw).start()
        started.append(pacs)
        cfg = dict(
            workers={"count": 1, "job_lease_s": 5},
            inference={"models": models, "fusion": {"max_findings": 5}},
            studies={"stable_after_s": 2},
            destinations=[pacs.as_destination(outputs=("sr", "sc", "gsps"))],
            delivery={"backoff_initial_s": 1, "backoff_max_s": 3, "connect_timeout_s": 3},
        )
        cfg.update(node_over or {})
        node = node_factory(**cfg)
        pacs.route_to_node(node.port)
        return pacs, node

    yield make
    for p in started:
        p.kill()


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list]:
    return {m: pacs.instances_by_modality(study_uid, m) for m in ("SR", "OT", "PR")}


def test_pacs_routes_chest_studies_and_gets_results_back(pacs_and_node, samples_dir, tmp_path, models):
    pacs, node = pacs_and_node()
    study = generate_uid()
    files = [
        samples_dir / "pydicomdata_RG1_J2KI.dcm",
        samples_dir / "fodicom_CR-MONO1-10-chest.dcm",
        make_cxr(tmp_path / "s1.dcm", study_uid=study, rows=320, cols=256) and tmp_path / "s1.dcm",
        make_cxr(tmp_path / "s2.dcm", study_uid=study, view="AP", modality="CR", photometric="MONOCHROME1")
        and tmp_path / "s2.dcm",
    ]
    hand = make_cxr(tmp_path / "hand.dcm", body_part="HAND")
    lateral = make_cxr(tmp_path / "lat.dcm", view="LL")
    r = pacs.storescu(*files, tmp_path / "hand.dcm", tmp_path / "lat.dcm", extra=("-xw",))
    assert r.returncode == 0, r.stderr
    headers = {f: pydicom.dcmread(f, force=True, stop_before_pixels=True) for f in files}
    studies = {h.StudyInstanceUID for h in headers.values()}
    assert len(studies) == 3

    def all_sr_arrived():
        return all(len(pacs.instances_by_modality(s, "SR")) == 1 for s in studies)

    wait_for(all_sr_arrived, 300, interval=1, what="an SR in every chest study")
    wait_for(lambda: node.status()["deliveries"]["pending"] == 0, 60, what="all deliveries done")

    expected = analyze(files, models, tmp_path / "analyze", tmp_path)
    assert any(e["findings"] for e in expected.values()), "the models must find something for this test to bite"
    for study_uid in studies:
        got = results_in(pacs, study_uid)
        sources = {h.SOPInstanceUID for h in headers.values() if h.StudyInstanceUID == study_uid}
        assert len(got["SR"]) == 1 and len(got["OT"]) == len(sources) and len(got["PR"]) == len(sources)
        sr = got["SR"][0]
        assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        evidence = {
            i.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for ser in s.ReferencedSeriesSequence
            for i in ser.ReferencedSOPSequence
        }
        assert evidence == sources
        in_sr = sorted(sr_findings(sr))
        want = sorted(
            (sop, f["code"]["value"], tuple(f["box"]))
            for sop, e in expected.items()
            if sop in sources
            for f in e["findings"]
        )
        assert [(s, c) for s, c, _ in in_sr] == [(s, c) for s, c, _ in want]
        for (_, _, a), (_, _, b) in zip(in_sr, want):
            assert all(abs(x - y) <= 0.5 for x, y in zip(a, b)), (a, b)
        for sc in got["OT"]:
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
            assert sc.BurnedInAnnotation == "YES"
        for pr in got["PR"]:
            assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID in sources
    # the non-chest image is not routed by the PACS rule; the lateral is routed but skipped by the node
    for skipped in (hand, lateral):
        assert [s["Modality"] for s in pacs.series_of_study(skipped.StudyInstanceUID)] == ["DX"]
    wait_for(lambda: "view position LL is not frontal" in node.log(), 30, what="lateral skipped")
    # the audit trail has each job and each delivery, naming studies only by their spool key
    trail = [
        json.loads(line) for line in (Path(node.config["storage"]["root"]) / "audit.jsonl").read_text().splitlines()
    ]
    done = {e["study"] for e in trail if e["event"] == "job_done"}
    assert done == {study_key(s) for s in studies}
    delivered = [e for e in trail if e["event"] == "delivery_done"]
    assert len(delivered) == node.status()["deliveries"]["delivered"] and {e["kind"] for e in delivered} == {
        "sr",
        "sc",
        "gsps",
    }


def test_pacs_down_during_analysis_every_result_arrives_once(pacs_and_node, tmp_path):
    pacs, node = pacs_and_node()
    ds = make_cxr(tmp_path / "a.dcm")
    assert pacs.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["instances"]["total"] == 1, 60, what="routed to the node")
    pacs.stop()
    wait_for(
        lambda: node.status()["deliveries"]["pending"] == 3 and "cannot connect" in node.log(),
        300,
        interval=1,
        what="deliveries failing while the PACS is down",
    )
    wait_for(  # keep it down through several retries
        lambda: min(r["attempts"] for r in node.rows("SELECT attempts FROM deliveries")) >= 3, 120, what="3 attempts"
    )
    pacs.restart()
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 3, 120, interval=1, what="delivered after restart")
    got = results_in(pacs, ds.StudyInstanceUID)
    assert [len(got[m]) for m in ("SR", "OT", "PR")] == [1, 1, 1]


def test_kill9_node_during_job_and_with_pending_deliveries(pacs_and_node, tmp_path):
    pacs, node = pacs_and_node()
    # 1. killed while a job runs: the job is taken over after its lease, results delivered once
    a = make_cxr(tmp_path / "a.dcm", rows=512, cols=512)
    assert pacs.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: "job 1: analysing" in node.log(), 120, interval=0.05, what="job running")
    node.kill()
    node.start()
    wait_for(
        lambda: len(pacs.instances_by_modality(a.StudyInstanceUID, "SR")) == 1, 180, interval=1, what="SR after restart"
    )
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 3, 60, what="all delivered")
    # 2. killed while deliveries are pending (PACS down): the same objects are delivered once after restart
    pacs.stop()
    b = make_cxr(tmp_path / "b.dcm")
    ae_port = node.port
    r = subprocess.run(
        ["storescu", "-aet", "ORTHANC", "-aec", "DICOM_NODE", "127.0.0.1", str(ae_port), str(tmp_path / "b.dcm")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    wait_for(lambda: node.status()["deliveries"]["pending"] == 3, 180, interval=1, what="pending deliveries")
    pending = {
        r["sop_instance_uid"]
        for r in node.rows(
            "SELECT r.sop_instance_uid FROM deliveries d JOIN results r ON r.id = d.result_id WHERE d.state='pending'"
        )
    }
    node.kill()
    pacs.restart()
    node.start()
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 6, 120, interval=1, what="delivered after restart")
    got = results_in(pacs, b.StudyInstanceUID)
    assert {d.SOPInstanceUID for m in got.values() for d in m} == pending
    assert len(results_in(pacs, a.StudyInstanceUID)["SR"]) == 1
    assert node.status()["jobs"] == {"total": 2, "queued": 0, "running": 0, "done": 2, "failed": 0}


def test_outputs_routed_back_by_the_pacs_are_ignored(pacs_and_node, tmp_path):
    pacs, node = pacs_and_node(route_everything=True, skip_node_outputs=False)
    ds = make_cxr(tmp_path / "a.dcm")
    assert pacs.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(
        lambda: node.status()["instances"]["total"] == 4, 300, interval=1, what="the node's 3 outputs routed back to it"
    )
    st = node.status()
    assert st["instances"] == {"total": 4, "eligible": 1, "skipped": 3}
    assert st["studies"]["receiving"] == 0  # the skipped outputs armed no study timer: no second job can follow
    assert st["jobs"]["total"] == 1
    got = results_in(pacs, ds.StudyInstanceUID)
    assert [len(got[m]) for m in ("SR", "OT", "PR")] == [1, 1, 1]


def test_node_down_while_studies_arrive_at_the_pacs_every_study_is_analysed(pacs_and_node, tmp_path):
    """The documented Orthanc example cannot lose a study: with the node stopped, Orthanc's routing jobs fail
    (visibly: failed jobs and the reason in its log) and are resubmitted until the node is back."""
    pacs, node = pacs_and_node()
    first = make_cxr(tmp_path / "first.dcm")
    assert pacs.storescu(tmp_path / "first.dcm").returncode == 0
    wait_for(lambda: node.status()["instances"]["total"] == 1, 120, what="first study routed")
    assert node.stop() == 0  # the node goes down while more studies arrive
    later = [make_cxr(tmp_path / f"later{i}.dcm") for i in range(3)]
    r = pacs.storescu(*(tmp_path / f"later{i}.dcm" for i in range(3)))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: pacs.log().count("to the AI node failed") >= 3, 120, interval=1, what="3 failed routing jobs")
    assert any(j["State"] == "Failure" for j in pacs.jobs())  # visible in Orthanc's jobs
    node.start()
    studies = [first.StudyInstanceUID] + [ds.StudyInstanceUID for ds in later]
    wait_for(
        lambda: all(len(pacs.instances_by_modality(s, "SR")) == 1 for s in studies),
        300,
        interval=1,
        what="an SR in every study",
    )
    st = node.status()
    assert st["instances"] == {"total": 4, "eligible": 4, "skipped": 0}
    assert st["jobs"]["total"] == 4 and st["jobs"]["failed"] == 0
    wait_for(lambda: all(j["State"] == "Success" for j in pacs.jobs()), 60, what="every routing job succeeded")
