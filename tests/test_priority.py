"""Study priority (issue 21, triage): the rules that make a study urgent, the queues that analyse and deliver
urgent studies first, the sender's request read at ingest, the URGENT flag in the Secondary Capture and the GSPS,
the console and the time-to-flag histogram. The end-to-end test: an urgent study sent behind 20 routine ones is
analysed before them."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import Config, PriorityConfig, parse_config
from dicom_node.errors import ConfigError
from dicom_node.ingest.store_handler import requested_priority
from dicom_node.outputs.captions import BANNER_TEXT, banner_text, urgent_comment
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.sc import BANNER_RGB, build_sc, render_overlay
from dicom_node.passwords import hash_password
from dicom_node.work.priority import ROUTINE, URGENT, study_priority
from inference.types import FINDING_CLASSES, Finding, Prediction
from storage.base import utcnow
from storage.ingest import InstanceMeta
from storage.jobs import ResultSpec
from storage.states import QueuePriority
from support.dicom_factory import make_cxr
from support.node import NodeProcess, wait_for
from support.provenance import IDENTITY, MODELS


def yellow(rgb: np.ndarray, band: int) -> int:
    """Yellow pixels (text anti-aliased on red included) in the banner: URGENT's colour; white text and the red
    background are not."""
    top = rgb[:band].astype(int)
    return int(((top[..., 0] > 200) & (top[..., 1] > 150) & (top[..., 2] < 100)).sum())


PASSWORD = "correct horse battery"


def finding(label: str, score: float, rows: int = 256, cols: int = 256) -> Finding:
    box = (0.3 * cols, 0.3 * rows, 0.6 * cols, 0.7 * rows)
    return Finding(FINDING_CLASSES.index(label), label, score, box, score)


def prediction(*findings: Finding, p_no_finding: float = 0.3, size: int = 256) -> Prediction:
    return Prediction(1.0 - p_no_finding, p_no_finding, tuple(findings), "soft", MODELS, (size, size))


# --- the rules ---------------------------------------------------------------------------------------------
def test_a_finding_over_its_floor_makes_a_study_urgent_and_says_why():
    rules = PriorityConfig()  # defaults: Pneumothorax 0.5, Pleural effusion 0.6; P(abnormal) off; requests count
    got = study_priority(rules, [prediction(finding("Pneumothorax", 0.72), finding("Cardiomegaly", 0.95))])
    assert got.level == URGENT and got.urgent
    assert got.reasons == ("suspected Pneumothorax (0.72)",)  # Cardiomegaly has no floor
    assert got.text() == "urgent: suspected Pneumothorax (0.72)"
    # the strongest of each class once, strongest first, over all images of the study
    two = study_priority(
        rules,
        [
            prediction(finding("Pleural effusion", 0.61), finding("Pneumothorax", 0.55)),
            prediction(finding("Pleural effusion", 0.9)),
        ],
    )
    assert two.reasons == ("suspected Pleural effusion (0.90)", "suspected Pneumothorax (0.55)")


def test_below_the_floors_or_unanalysable_a_study_is_routine():
    rules = PriorityConfig()
    below = study_priority(rules, [prediction(finding("Pneumothorax", 0.49), finding("Pleural effusion", 0.59))])
    assert below.level == ROUTINE and below.reasons == () and below.text() == "routine"
    blank = Prediction.unanalysable("blank image", "soft", MODELS, (256, 256))
    assert study_priority(rules, [blank]).level == ROUTINE
    assert study_priority(rules, []).level == ROUTINE
    # P(abnormal) counts only once a floor is set; it is the SR's P(abnormal), 1 - P(no finding)
    sure = prediction(p_no_finding=0.05)
    assert study_priority(rules, [sure]).level == ROUTINE
    assert study_priority(PriorityConfig(p_abnormal=0.9), [sure]).reasons == ("P(abnormal) 0.95",)
    assert study_priority(PriorityConfig(p_abnormal=0.96), [sure]).level == ROUTINE
    assert study_priority(PriorityConfig(p_abnormal=0.5), [blank]).level == ROUTINE


def test_the_senders_request_counts_unless_switched_off():
    normal = prediction(p_no_finding=0.9)
    asked = study_priority(PriorityConfig(), [normal], requested="STAT")
    assert asked.urgent and asked.reasons == ("sender priority STAT",)
    assert study_priority(PriorityConfig(sender_request=False), [normal], requested="STAT").level == ROUTINE
    both = study_priority(PriorityConfig(), [prediction(finding("Pneumothorax", 0.8))], requested="HIGH")
    assert both.reasons == ("suspected Pneumothorax (0.80)", "sender priority HIGH")


def test_the_priority_section_is_checked():
    cfg = parse_config({"priority": {"findings": {"Pneumothorax": 0.4}, "p_abnormal": 0.9}}, Path("."))
    assert cfg.priority.findings == {"Pneumothorax": 0.4} and cfg.priority.p_abnormal == 0.9
    assert Config().priority.findings == {"Pneumothorax": 0.5, "Pleural effusion": 0.6}
    with pytest.raises(ConfigError, match="Pneumothrax"):
        parse_config({"priority": {"findings": {"Pneumothrax": 0.5}}}, Path("."))
    with pytest.raises(ConfigError, match="priority.findings"):
        parse_config({"priority": {"findings": {"Pneumothorax": 1.5}}}, Path("."))
    with pytest.raises(ConfigError, match="priority.p_abnormal"):
        parse_config({"priority": {"p_abnormal": -0.1}}, Path("."))


# --- the sender's request, read at ingest ------------------------------------------------------------------
def test_the_request_is_read_from_the_header_and_the_c_store_priority():
    assert requested_priority(make_cxr(), 0) == ""
    assert requested_priority(make_cxr(RequestedProcedurePriority="STAT"), 0) == "STAT"
    assert requested_priority(make_cxr(RequestedProcedurePriority="ROUTINE"), 2) == ""
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedurePriority = "stat"
    assert requested_priority(make_cxr(RequestAttributesSequence=[item]), 0) == "STAT"
    assert requested_priority(make_cxr(), 1) == "HIGH"  # the C-STORE request's Priority: 1 = HIGH
    assert requested_priority(make_cxr(RequestedProcedurePriority="STAT"), 1) == "STAT, HIGH"


def test_a_c_store_with_priority_high_queues_its_study_urgent(node_factory, tmp_path):
    node = node_factory(studies={"stable_after_s": 0.2})
    make_cxr(tmp_path / "routine.dcm")
    high = make_cxr(tmp_path / "high.dcm")
    assert node.storescu(tmp_path / "routine.dcm").returncode == 0
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(tmp_path / "high.dcm"), priority=1).Status == 0
    assoc.release()
    wait_for(lambda: node.status()["jobs"]["queued"] == 2, 30, what="two studies queued")
    rows = node.rows(
        "SELECT i.study_uid, i.requested_priority, j.priority FROM instances i JOIN jobs j ON j.id = i.job_id"
    )
    got = {r["study_uid"]: (r["requested_priority"], r["priority"]) for r in rows}
    assert got[high.StudyInstanceUID] == ("HIGH", QueuePriority.URGENT)
    assert len(got) == 2 and sorted(got.values())[0] == ("", QueuePriority.ROUTINE)


# --- the queues --------------------------------------------------------------------------------------------
def meta(sop: str, study: str, requested: str = "") -> InstanceMeta:
    return InstanceMeta(
        sop, study, f"{study}.9", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR", "CHEST", "PA", "TEST",
        True, None, requested_priority=requested,
    )  # fmt: skip


def result(sop: str) -> ResultSpec:
    return ResultSpec("sr", sop, "1.2.840.10008.5.1.4.1.1.88.34", "9.9", None, b"DICM" * 10, ("pacs",))


def test_urgent_jobs_are_claimed_first_and_their_results_delivered_first(store):
    later = utcnow() + timedelta(seconds=1)
    for n in range(3):
        store.add_instance(b"x" * 100, meta(f"1.{n}.1", f"1.{n}"), stable_after_s=0)
        store.study_stable(f"1.{n}", later)
    store.add_instance(b"x" * 100, meta("2.1", "2", requested="STAT"), stable_after_s=0)
    urgent_job = store.study_stable("2", later)
    first = store.claim_job("w", 60)
    assert first.id == urgent_job and first.study_uid == "2" and first.requested == "STAT"
    second = store.claim_job("w", 60)
    assert second.study_uid == "1.0" and second.requested == ""  # then the routine ones, oldest first
    store.finish_job(second.id, "w", [result("7.1")])  # routine: its queued priority
    store.finish_job(first.id, "w", [result("7.2")], priority=QueuePriority.URGENT, priority_reasons="sender STAT")
    due = store.due_deliveries(now=utcnow() + timedelta(seconds=5))
    assert [d.sop_instance_uid for d in due] == ["7.2", "7.1"]  # the urgent one first, although made later
    assert [d.priority for d in due] == [QueuePriority.URGENT, QueuePriority.ROUTINE]
    flags = store.recent_time_to_flag(3600)
    assert sorted(p for p, _ in flags) == [QueuePriority.URGENT, QueuePriority.ROUTINE]
    assert all(0 <= s < 60 for _, s in flags)
    # the final priority of a routine-queued job found urgent by its findings
    third = store.claim_job("w", 60)
    store.finish_job(third.id, "w", [result("7.3")], priority=QueuePriority.URGENT, priority_reasons="x")
    assert store.due_deliveries(now=utcnow() + timedelta(seconds=5))[1].sop_instance_uid == "7.3"
    # an operator's re-analysis is no new flag: not counted in the time to flag
    store.reanalyze("1.0")
    again = store.claim_job("w", 60)
    while again.study_uid != "1.0":
        store.finish_job(again.id, "w", [])
        again = store.claim_job("w", 60)
    store.finish_job(again.id, "w", [])
    assert len(store.recent_time_to_flag(3600)) == 4


def test_new_urgent_images_make_a_queued_job_urgent(store):
    later = utcnow() + timedelta(seconds=1)
    store.add_instance(b"x" * 100, meta("3.1", "3"), stable_after_s=0)
    store.add_instance(b"x" * 100, meta("1.1", "1"), stable_after_s=0)
    store.study_stable("3", later)
    job = store.study_stable("1", later)  # queued after 3
    store.add_instance(b"x" * 100, meta("1.2", "1", requested="STAT"), stable_after_s=0)
    assert store.study_stable("1", later) == job  # absorbed by the queued job, which becomes urgent
    store.add_instance(b"x" * 100, meta("4.1", "4"), stable_after_s=0)
    store.study_stable("4", later)
    assert store.claim_job("w", 60).study_uid == "1"


# --- the outputs -------------------------------------------------------------------------------------------
def test_the_urgent_banner_and_the_header_say_urgent(tmp_path):
    assert banner_text() == banner_text(ROUTINE, ("x",)) == BANNER_TEXT
    urgent = banner_text(URGENT, ("suspected Pneumothorax (0.72)",))
    assert urgent == f"URGENT - suspected Pneumothorax (0.72) - {BANNER_TEXT}"
    assert banner_text(URGENT).startswith("URGENT - ")
    assert urgent_comment(ROUTINE, ()) is None
    assert urgent_comment(URGENT, ("a", "b")) == "URGENT: a; b"

    pred = prediction(finding("Pneumothorax", 0.72))
    img = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    routine_rgb, band = render_overlay(img, pred)
    urgent_rgb, band2 = render_overlay(img, pred, priority=URGENT, reasons=("suspected Pneumothorax (0.72)",))
    assert band == band2  # the same geometry: boxes stay where they were
    assert yellow(routine_rgb, band) == 0 and yellow(urgent_rgb, band) > 50  # URGENT in yellow on the red banner
    assert (urgent_rgb[:band] == BANNER_RGB).all(axis=2).mean() > 0.4
    assert (routine_rgb[band:] == urgent_rgb[band:]).all()  # only the banner differs

    src = make_cxr()
    kw = dict(series_uid=generate_uid(), sop_uid=generate_uid(), series_number=9002, instance_number=1)
    why = ("suspected Pneumothorax (0.72)",)
    sc = build_sc(src, img, pred, identity=IDENTITY, priority=URGENT, priority_reasons=why, **kw)
    assert sc.ImageComments == "URGENT: suspected Pneumothorax (0.72)"
    assert yellow(sc.pixel_array, band) > 50
    assert "ImageComments" not in build_sc(src, img, pred, identity=IDENTITY, **kw)
    pr = build_gsps(src, pred, identity=IDENTITY, priority=URGENT, priority_reasons=("sender priority STAT",), **kw)
    texts = [t.UnformattedTextValue for a in pr.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    assert any(t.startswith(f"URGENT - sender priority STAT - {BANNER_TEXT}: ") for t in texts), texts
    routine = build_gsps(src, pred, identity=IDENTITY, **kw)
    texts = [t.UnformattedTextValue for a in routine.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    assert not any("URGENT" in t for t in texts)


# --- end to end --------------------------------------------------------------------------------------------
def console_page(base: str, path: str) -> str:
    """A console page, logged in as alice."""
    with urllib.request.urlopen(f"{base}/login", timeout=10) as r:
        cookie = r.headers["Set-Cookie"].split(";")[0]
        token = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    form = urllib.parse.urlencode({"username": "alice", "password": PASSWORD, "csrf": token}).encode()
    req = urllib.request.Request(f"{base}/login", data=form, method="POST", headers={"Cookie": cookie})
    try:
        urllib.request.build_opener(NoRedirect).open(req, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 303, e.code
        cookie = e.headers["set-cookie"].split(";")[0]
    req = urllib.request.Request(f"{base}{path}", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def run_worker(node: NodeProcess, log: Path, until) -> None:
    """``dicom-node worker`` (one process) until ``until()`` holds."""
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker", "--config", str(node.config_path)], stdout=out, stderr=out
        )
        try:
            wait_for(until, 300, interval=0.5, what="the worker to analyse the queued studies")
        finally:
            worker.terminate()
            worker.wait(30)


@pytest.mark.slow  # a worker process loads models
def test_an_urgent_study_sent_behind_20_routine_ones_is_analysed_before_them(node_factory, tmp_path, models):
    node = node_factory(
        workers={"count": 0},  # the worker is stopped while the studies arrive
        inference={"models": models},
        studies={"stable_after_s": 0.3},
        # the request alone decides here: the tiny models' random boxes must not make a routine study urgent
        priority={"findings": {}, "p_abnormal": None, "sender_request": True},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "outputs": ["sr", "sc", "gsps"]}
        ],  # silent: results are made and held, never sent
        web={"users": {"alice": hash_password(PASSWORD)}},
    )
    routine = [make_cxr(tmp_path / f"r{n:02d}.dcm", patient_id=f"R{n}") for n in range(20)]
    assert node.storescu(*(tmp_path / f"r{n:02d}.dcm" for n in range(20))).returncode == 0
    wait_for(lambda: node.status()["jobs"]["queued"] == 20, 60, what="20 routine studies queued")
    urgent = make_cxr(tmp_path / "stat.dcm", patient_id="STAT-PATIENT", RequestedProcedurePriority="STAT")
    assert node.storescu(tmp_path / "stat.dcm").returncode == 0
    wait_for(lambda: node.status()["jobs"]["queued"] == 21, 60, what="the urgent study queued behind them")
    shown = node.cli("status")
    assert "urgent queued: 1" in shown.stdout and node.status()["urgent_queued_jobs"] == 1, shown.stdout
    assert 'data-queue="urgent">1<' in console_page(node.web_url, "/")  # the overview's queue card

    run_worker(node, tmp_path / "worker.log", lambda: node.status()["jobs"]["done"] == 21)
    jobs = node.rows("SELECT id, study_uid, priority, priority_reasons, started_at, finished_at FROM jobs")
    by_study = {j["study_uid"]: j for j in jobs}
    first = by_study[urgent.StudyInstanceUID]
    others = [by_study[r.StudyInstanceUID] for r in routine]
    assert first["id"] == max(j["id"] for j in jobs)  # queued last ...
    assert first["finished_at"] <= min(j["started_at"] for j in others)  # ... analysed before all of them
    assert first["priority"] == QueuePriority.URGENT and first["priority_reasons"] == "sender priority STAT"
    assert {(j["priority"], j["priority_reasons"]) for j in others} == {(QueuePriority.ROUTINE, None)}

    # the Secondary Capture of the urgent study says URGENT (banner pixels and header); a routine one does not
    def sc_of(study_uid: str) -> pydicom.Dataset:
        (row,) = node.rows_of("SELECT path FROM results WHERE kind = 'sc' AND study_uid = ?", (study_uid,))
        return pydicom.dcmread(row["path"])

    sc = sc_of(urgent.StudyInstanceUID)
    assert sc.ImageComments == "URGENT: sender priority STAT"
    band = (sc.Rows - 256) // 2
    assert yellow(sc.pixel_array, band) > 50
    plain = sc_of(routine[0].StudyInstanceUID)
    assert "ImageComments" not in plain and yellow(plain.pixel_array, band) == 0
    # the held deliveries of the urgent study are first in line
    prio = node.rows("SELECT r.study_uid, d.priority FROM deliveries d JOIN results r ON r.id = d.result_id")
    assert {p["priority"] for p in prio if p["study_uid"] == urgent.StudyInstanceUID} == {QueuePriority.URGENT}
    assert {p["priority"] for p in prio if p["study_uid"] != urgent.StudyInstanceUID} == {QueuePriority.ROUTINE}

    # the console shows the priority on the study's page and in the list; /metrics has the time to flag
    base = node.web_url
    page = console_page(base, f"/studies/{urgent.StudyInstanceUID}")
    assert re.search(r'id="study-priority"[^>]*>\s*<strong[^>]*>URGENT</strong>: sender priority STAT', page), page
    assert "routine" in console_page(base, f"/studies/{routine[0].StudyInstanceUID}")
    listing = console_page(base, "/studies")
    assert listing.count("URGENT") == 1
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'dicom_node_time_to_flag_seconds_count{priority="urgent"} 1.0' in metrics
    assert 'dicom_node_time_to_flag_seconds_count{priority="routine"} 20.0' in metrics


@pytest.mark.slow  # a worker process loads models
def test_a_study_the_rules_find_urgent_is_flagged_in_its_outputs(node_factory, tmp_path, models):
    """The findings' side: the tiny classifier says P(abnormal) 0.8 for every image; a floor of 0.5 makes the
    study urgent after its analysis (it was queued routine), and the outputs and the console say why."""
    node = node_factory(
        workers={"count": 1},
        inference={"models": models},
        studies={"stable_after_s": 0.3},
        priority={"findings": {}, "p_abnormal": 0.5},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "outputs": ["sc", "gsps"]}],
    )
    study = make_cxr(tmp_path / "a.dcm")
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] == 1, 300, interval=0.5, what="the study analysed")
    (job,) = node.rows("SELECT priority, priority_reasons FROM jobs")
    assert job["priority"] == QueuePriority.URGENT and re.fullmatch(r"P\(abnormal\) 0\.\d\d", job["priority_reasons"])
    (sc,) = node.rows("SELECT path FROM results WHERE kind = 'sc'")
    assert pydicom.dcmread(sc["path"]).ImageComments == f"URGENT: {job['priority_reasons']}"
    (pr,) = node.rows("SELECT path FROM results WHERE kind = 'gsps'")
    text = str(pydicom.dcmread(pr["path"]).GraphicAnnotationSequence[0].TextObjectSequence[-1].UnformattedTextValue)
    assert text.startswith(f"URGENT - {job['priority_reasons']} - {BANNER_TEXT}")
    assert study.StudyInstanceUID
