"""Silent destinations (issue 20): results are made, kept and shown, never sent; a destination switched to live sends
new results only, and held ones only when an operator releases them. The PACS is dcmtk's storescp, the node a real
`serve` process with a worker and tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import free_port, wait_for


def destination(port: int, mode: str | None) -> dict:
    d = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "outputs": ["sr", "sc"]}
    if mode is not None:
        d["mode"] = mode
    return d


def send_study(node, folder) -> str:
    study = generate_uid()
    make_cxr(folder / f"{study}.dcm", study_uid=study)
    assert node.storescu(folder / f"{study}.dcm").returncode == 0
    return study


def deliveries_of(node, study: str) -> list[dict]:
    return node.rows_of(
        "SELECT d.state, d.destination FROM deliveries d JOIN results r ON r.id = d.result_id WHERE r.study_uid = ?",
        [study],
    )


def restart_with(node, mode: str) -> None:
    node.stop()
    node.config["destinations"] = [destination(node.config["destinations"][0]["port"], mode)]
    node._write_config()
    node.start()


@pytest.mark.slow  # a worker process loads models
def test_a_destination_without_a_mode_is_silent_and_going_live_sends_only_new_results(node_factory, models, tmp_path):
    scp = DcmtkStoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(
            workers={"count": 1},
            inference={"models": models},
            destinations=[destination(scp.port, None)],
            delivery={"backoff_initial_s": 0.5, "connect_timeout_s": 3},
        )
        assert "destination pacs is silent" in node.log()
        old = send_study(node, tmp_path)
        wait_for(lambda: len(deliveries_of(node, old)) == 2, 120, what="the silent study's results")
        assert {d["state"] for d in deliveries_of(node, old)} == {"held"}
        assert node.status()["deliveries"]["held"] == 2
        assert node.rows_of("SELECT COUNT(*) AS n FROM image_results WHERE study_uid = ?", [old])[0]["n"] == 1

        restart_with(node, "live")
        new = send_study(node, tmp_path)
        wait_for(lambda: len(scp.received()) == 2, 120, what="the new study's SR and SC at the PACS")
        assert {d.StudyInstanceUID for d in scp.received()} == {new}
        assert {d["state"] for d in deliveries_of(node, old)} == {"held"}  # made while silent: still held

        bad = node.cli("release", "pacs", check=False)  # which held ones? the operator must say
        assert bad.returncode == 2 and "--all, --since DATE or --study-uid UID" in bad.stderr
        assert node.cli("release", "nowhere", "--all", check=False).returncode == 2
        out = node.cli("release", "pacs", "--study-uid", old)
        assert "queued 2 held deliveries to pacs" in out.stdout
        wait_for(lambda: len(scp.received()) == 4, 60, what="the released results")
        assert sorted(d.StudyInstanceUID for d in scp.received()).count(old) == 2
    finally:
        scp.stop()


@pytest.mark.slow  # a worker process loads models
def test_switching_a_live_destination_to_silent_holds_what_was_still_waiting(node_factory, models, tmp_path):
    scp = DcmtkStoreSCP(tmp_path / "pacs", port=free_port())  # not started yet: deliveries wait for a retry
    node = node_factory(
        workers={"count": 1},
        inference={"models": models},
        destinations=[destination(scp.port, "live")],
        delivery={"backoff_initial_s": 0.5, "backoff_max_s": 1, "connect_timeout_s": 2},
    )
    study = send_study(node, tmp_path)
    wait_for(lambda: len(deliveries_of(node, study)) == 2, 120, what="the study's deliveries")
    assert {d["state"] for d in deliveries_of(node, study)} == {"pending"}
    restart_with(node, "silent")
    scp.start()
    try:
        wait_for(lambda: {d["state"] for d in deliveries_of(node, study)} == {"held"}, 30, what="held deliveries")
        assert "pending deliveries held" in node.log()
        assert scp.received() == []
        release = node.cli("release", "pacs", "--all", check=False)  # to a silent destination: refused
        assert release.returncode == 2 and "is silent" in release.stderr
    finally:
        scp.stop()


@pytest.mark.slow  # check-config loads the models as a worker does
def test_check_config_names_silent_destinations_and_warns_of_a_live_one_without_site_validation(tmp_path, models):
    from inference.site_validation import model_file_facts
    from storage import Store

    def check(mode: str) -> str:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "storage": {"root": str(tmp_path / "var")},
                    "inference": {"models": models},
                    "destinations": [destination(4343, mode)],
                }
            )
        )
        r = subprocess.run(
            [sys.executable, "-m", "dicom_node", "check-config", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "destination pacs: silent (results kept and shown in the console, not sent" in check("silent")
    assert "WARNING: destination pacs is live, but these model files have no site validation" in check("live")
    store = Store(f"sqlite:///{tmp_path / 'var' / 'dicom-node.sqlite3'}", tmp_path / "var")
    try:
        store.record_validation(
            classifier_sha256=model_file_facts(Path(models["classifier"]))["sha256"],
            detector_sha256=model_file_facts(Path(models["detector"]))["sha256"],
            n=41,
            positives=20,
        )
    finally:
        store.close()
    out = check("live")
    assert "WARNING" not in out and "destination pacs: live; models site-validated" in out and "n=41" in out
