"""Supervised workers and a start that fails fast, with the real node process: models that do not load stop
check-config and serve with the reason; a worker killed with SIGKILL shows "dead", is restarted, and the study
queued meanwhile is still analysed; status reports workers and the age of the oldest queued job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.dicom_factory import make_cxr
from support.node import NodeProcess, wait_for

pytestmark = pytest.mark.slow  # worker processes load models


def test_models_that_do_not_load_stop_check_config_and_serve(tmp_path, models):
    missing = tmp_path / "nowhere" / "classifier.pt"
    node = NodeProcess(
        tmp_path / "node", workers={"count": 1}, inference={"models": {**models, "classifier": str(missing)}}
    )
    check = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 2 and "classifier.pt" in check.stdout + check.stderr
    assert "configuration OK" not in check.stdout
    with pytest.raises(RuntimeError, match="node exited at start"):
        node.start(timeout=120)
    assert node.proc.returncode == 1
    log = node.log()
    assert "worker cannot start" in log and "classifier.pt" in log and "listening as" not in log
    good = NodeProcess(tmp_path / "good", workers={"count": 1}, inference={"models": models})
    ok = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(good.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "models OK: classifier" in ok.stdout and "detector" in ok.stdout


def test_a_killed_worker_is_restarted_and_the_study_queued_meanwhile_is_analysed(node_factory, tmp_path, models):
    node = node_factory(workers={"count": 1, "job_lease_s": 60}, inference={"models": models})
    alive = wait_for(
        lambda: [r for r in node.rows("SELECT * FROM workers") if r["state"] == "alive"], 30, what="a heartbeat"
    )
    pid = alive[0]["pid"]
    assert "classifier" in alive[0]["models"] and node.status()["workers"]["alive"] == 1
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    wait_for(lambda: node.status()["workers"]["dead"] == 1, 10, what='"dead" in status')
    make_cxr(tmp_path / "a.dcm")
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] == 1, 120, what="the study analysed by the restarted worker")
    st = node.status()
    assert st["workers"] == {"alive": 1, "stale": 0, "dead": 0} and st["oldest_queued_job_age_s"] is None
    (row,) = node.rows("SELECT * FROM workers")
    assert row["pid"] != pid and row["deaths"] == 1 and row["last_exit"] == "killed by SIGKILL"
    log = node.log()
    assert "died (killed by SIGKILL); restarting it in 1 s" in log and "restarted" in log
    trail = (Path(node.config["storage"]["root"]) / "audit.jsonl").read_text().splitlines()
    assert any(json.loads(line)["event"] == "worker_died" for line in trail)
    out = node.cli("status").stdout
    assert "workers     alive=1" in out and "oldest queued job: -" in out


def test_a_worker_batches_queued_studies_and_a_bad_one_fails_alone(node_factory, tmp_path, models):
    """workers.jobs_per_batch: a worker takes up to that many queued studies at once and runs their images
    through the networks together; each study gets its own result, and a study whose only image cannot be
    decoded fails alone."""
    node = node_factory(
        workers={"count": 0, "jobs_per_batch": 4}, inference={"models": models}, studies={"stable_after_s": 0.2}
    )
    make_cxr(tmp_path / "a.dcm")
    bad = make_cxr(rows=64, cols=64)
    bad.PixelData = bad.PixelData[:100]  # truncated: the header is fine, the pixels cannot be decoded
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    c = make_cxr(tmp_path / "c1.dcm")
    make_cxr(tmp_path / "c2.dcm", study_uid=c.StudyInstanceUID)
    for files in (["a.dcm"], ["bad.dcm"], ["c1.dcm", "c2.dcm"]):
        assert node.storescu(*(tmp_path / f for f in files)).returncode == 0
    wait_for(lambda: node.status()["jobs"]["queued"] == 3, 30, what="three studies queued")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "worker", "--config", str(node.config_path)], stdout=log, stderr=log
    )
    try:
        wait_for(lambda: node.status()["jobs"]["queued"] + node.status()["jobs"]["running"] == 0, 120, what="done")
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    jobs = node.rows("SELECT study_uid, state, reason, worker, started_at, finished_at FROM jobs ORDER BY id")
    assert [j["state"] for j in jobs] == ["done", "failed", "done"]
    assert "PixelDataError" in jobs[1]["reason"] and jobs[1]["study_uid"] == bad.StudyInstanceUID
    assert len({j["worker"] for j in jobs}) == 1
    assert max(j["started_at"] for j in jobs) < min(j["finished_at"] for j in jobs)  # claimed together
    text = (tmp_path / "worker.log").read_text()
    assert text.count("analysing") == 3 and text.index("analysing 2 image(s)") < text.index("done in")
    assert len(node.rows("SELECT id FROM image_results")) == 3  # a's image and c's two
