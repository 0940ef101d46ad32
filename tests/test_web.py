"""The node's web side, against the real process: /healthz, /readyz (not ready while no worker lives, ready again
once the supervisor restarted it) and /metrics, parsed with prometheus_client's own parser, agreeing with
``dicom-node status --json`` after real studies."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.dicom_factory import make_cxr
from support.node import wait_for

pytestmark = pytest.mark.slow  # a worker process loads models


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_readiness_and_metrics_agree_with_status(node_factory, tmp_path, models):
    node = node_factory(workers={"count": 1}, inference={"models": models}, studies={"stable_after_s": 0.5})
    base = node.web_url
    assert get(f"{base}/healthz") == (200, "ok\n")
    wait_for(lambda: get(f"{base}/readyz")[0] == 200, 30, what="ready")
    ready = json.loads(get(f"{base}/readyz")[1])
    assert ready == {
        "ready": True,
        "checks": {"database": "ok", "spool": "ok", "disk": "ok", "workers": "ok"},
        "instance": node.rows("SELECT name FROM nodes")[0]["name"],
        "role": "leader",
    }

    for i in range(2):
        make_cxr(tmp_path / f"{i}.dcm")
    assert node.storescu(tmp_path / "0.dcm", tmp_path / "1.dcm", calling="MODALITY").returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] >= 1 and node.status()["jobs"]["queued"] == 0, 120, what="done")
    status = json.loads(node.cli("status", "--json").stdout)
    m = samples(get(f"{base}/metrics")[1])
    assert m[("dicom_node_cstore_total", (("calling_ae", "MODALITY"), ("status", "0x0000")))] == 2
    assert m[("dicom_node_received_bytes_total", ())] > 2 * 256 * 256 * 2
    assert m[("dicom_node_associations_total", (("result", "accepted"),))] >= 1
    for state in ("queued", "running", "done", "failed"):
        assert m[("dicom_node_jobs", (("state", state),))] == status["jobs"][state]
    assert m[("dicom_node_instances", (("state", "eligible"),))] == status["instances"]["eligible"] == 2
    assert m[("dicom_node_workers", (("state", "alive"),))] == 1
    assert m[("dicom_node_job_pipeline_seconds_count", ())] == status["jobs"]["done"]
    assert m[("dicom_node_job_seconds_count", ())] == status["jobs"]["done"]
    assert m[("dicom_node_job_seconds_sum", ())] >= m[("dicom_node_job_pipeline_seconds_sum", ())] > 0
    assert m[("dicom_node_disk_free_bytes", ())] > 0
    found = node.rows("SELECT label, COUNT(*) AS n FROM findings GROUP BY label")
    assert found, "the tiny detector boxes something"
    assert {r["label"]: r["n"] for r in found} == {
        dict(labels)["finding"]: v for (name, labels), v in m.items() if name == "dicom_node_findings"
    }

    # a worker killed with SIGKILL: not ready (and "dead") until the supervisor has restarted it
    (row,) = node.rows("SELECT pid FROM workers")
    os.kill(row["pid"], signal.SIGKILL)
    code, body = wait_for(lambda: (r := get(f"{base}/readyz"))[0] == 503 and r, 10, what="not ready")
    assert json.loads(body)["checks"]["workers"] == "no live worker with loaded models"
    assert samples(get(f"{base}/metrics")[1])[("dicom_node_workers", (("state", "dead"),))] == 1
    wait_for(lambda: get(f"{base}/readyz")[0] == 200, 60, what="ready again after the restart")
