"""Drift watch (issue 20, part 5): PSI and the flagged-rate ratio per device against the site validation's reference.

- the rule by hand (:mod:`inference.drift`): PSI, its chance limit at small n, the flag rate at the operating point
  in force, "not enough studies", a device without a reference of its own;
- the store's live studies (:mod:`storage.drift`): retrospective studies, the validation period and another model
  pair's results left out; the metrics and the console's Drift page on them;
- the Prometheus alert rule, with promtool (when installed);
- end to end, on real radiographs: a ``serve`` process with the shipped classifier analyses a reference period
  from devices A and B, ``dicom-node validate`` records it, then new films come from A unchanged and from B with a
  strong sharpening (a new detector's edge enhancement): ``/metrics`` alerts for B and not for A.

How the sizes were chosen (README, "Drift watch"): the shipped classifier's raw P on nih-matched films, drawn as
here (balanced, disjoint reference and current), 200 draws per case: 40 current studies against 50 reference
studies give a PSI limit of 0.84; unchanged films stay far below it (99th percentile about 0.5), the sharpening used
here far above (1st percentile about 1.2).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.drift import DriftRule, drift_status, flag_ratio, psi, psi_limit, raw_threshold
from storage import Store
from storage.base import utcnow
from storage.db import BackfillRun, BackfillStudy, ImageResult, Instance, Job, Study, Validation
from support.node import wait_for

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CLASSIFIER = ROOT / "models" / "classifier.pt"
RULES = ROOT / "docs" / "prometheus"


def sharpen(sigma: float = 4.0, amount: float = 3.0) -> Callable[[np.ndarray], np.ndarray]:
    """An unsharp mask on 8-bit pixels (a device's edge enhancement): pixels + amount * (pixels - blurred)."""

    def apply(pixels: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), sigma)
        return np.clip(pixels + amount * (pixels - blurred), 0, 255).astype(np.uint8)

    return apply


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---- the rule -------------------------------------------------------------------------------------------------
def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.beta(5, 2, 2000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert psi(rng.beta(5, 2, 2000), ref) < 0.02  # another sample of the same
    shifted = np.clip(ref + 0.1, 0, 1)
    assert psi(shifted, ref) > 0.25
    # every current value above the reference's top quintile: one bin holds all of it (smoothed by half a study)
    one_bin = psi(np.full(40, 0.999), ref, bins=5)
    c = np.array([0.5, 0.5, 0.5, 0.5, 40.5]) / 42.5
    r = (np.full(5, 400) + 0.5) / 2002.5
    assert one_bin == pytest.approx(float(np.sum((c - r) * np.log(c / r))), rel=1e-3)


def test_psi_limit_is_the_alert_level_at_large_n_and_higher_at_small_n():
    assert psi_limit(1000, 1000, 5, 0.25) == 0.25
    small = psi_limit(40, 50, 5, 0.25)
    # (1/40 + 1/50) x the 99.9th percentile of a chi-square with 4 degrees of freedom (18.47)
    assert small == pytest.approx(18.47 * (1 / 40 + 1 / 50), rel=0.02)
    assert psi_limit(40, 40, 5, 0.25) > small > psi_limit(100, 100, 5, 0.25)


def test_raw_threshold_is_recovered_from_raw_and_calibrated_p():
    t = 0.7
    for p_raw in (0.1, 0.5, 0.7, 0.95):
        z = np.log(p_raw / (1 - p_raw)) - np.log(t / (1 - t))
        assert raw_threshold(p_raw, float(1 / (1 + np.exp(-z)))) == pytest.approx(t)
    assert flag_ratio(0, 40, 0.0, 40) == pytest.approx(1.0)  # smoothed: no division by zero


def _cases(p_raw: np.ndarray, threshold: float = 0.7) -> list[tuple[float, float]]:
    z = np.log(p_raw / (1 - p_raw)) - np.log(threshold / (1 - threshold))
    return [(float(p), float(1 / (1 + np.exp(-zz)))) for p, zz in zip(p_raw, z)]


def test_drift_status_by_device():
    rng = np.random.default_rng(1)
    ref_a, ref_b = rng.beta(5, 2, 60), rng.beta(5, 2, 60)
    reference = {"A": list(ref_a), "B": list(ref_b), "*": [*ref_a, *ref_b]}
    rule = DriftRule(min_studies=30, min_reference=50)
    current = {
        "A": _cases(rng.beta(5, 2, 40)),  # the same kind of films
        "B": _cases(rng.beta(12, 1.2, 40)),  # far more abnormal-looking
        "C": _cases(rng.beta(5, 2, 40)),  # a new device: compared with all validated studies
        "D": _cases(rng.beta(5, 2, 10)),  # too few studies for a verdict
        "E": _cases(rng.beta(2, 5, 40)),  # looks normal: flagged far less often
    }
    st = drift_status(current, reference, rule)
    assert not st["A"].alert and st["A"].verdict == "ok" and st["A"].reference == "A"
    assert st["B"].alert and st["B"].psi > st["B"].psi_limit and "PSI" in st["B"].verdict
    assert st["C"].reference == "*" and st["C"].reference_n == 120 and not st["C"].alert
    assert not st["D"].alert and st["D"].psi is None and st["D"].verdict == "not enough studies (10 < 30)"
    assert st["E"].alert and st["E"].ratio < rule.flag_ratio_low and "flag rate ratio" in st["E"].verdict
    flagged_a = sum(1 for _, p in current["A"] if p >= 0.5) / 40
    assert st["A"].flag_rate == pytest.approx(flagged_a)
    assert st["A"].reference_flag_rate == pytest.approx(float(np.mean(ref_a >= 0.7)))
    # a device of the reference without live studies is listed, without a verdict
    assert drift_status({}, reference, rule)["A"].n == 0


# ---- the store, the metrics and the console -------------------------------------------------------------------
CLF, DET = "4f2a9c1b" + "0" * 56, "a1b2c3d4" + "0" * 56
MODELS = "classifier resnet18 0.2.0 (4f2a9c1b); detector yolov8s 0.3.0 (a1b2c3d4)"


def _add_study(store: Store, uid: str, device: tuple[str, str, str], at: datetime, p_raw: float, **kw) -> None:
    z = np.log(p_raw / (1 - p_raw)) - np.log(0.7 / 0.3)
    p_cal = float(1 / (1 + np.exp(-z)))
    with store._session.begin() as s:
        s.add(Study(study_uid=uid, first_received_at=at, last_received_at=at, stable_due_at=None))
        job = Job(study_uid=uid, state="done", created_at=at, finished_at=at, models=kw.get("models", MODELS))
        s.add(job)
        s.flush()
        s.add(
            Instance(
                sop_instance_uid=uid + ".1",
                study_uid=uid,
                series_uid=uid + ".0",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                manufacturer=device[0],
                model_name=device[1],
                station_name=device[2],
                size_bytes=1,
                path="-",
                received_at=at,
                eligible=True,
                job_id=job.id,
            )
        )
        s.add(
            ImageResult(
                job_id=job.id,
                study_uid=uid,
                sop_instance_uid=uid + ".1",
                p_abnormal=p_cal,
                p_raw=p_raw,
                abnormal=p_cal >= 0.5,
            )
        )


def test_store_reads_live_studies_and_metrics_export_the_verdict(tmp_path):
    from dicom_node.config import parse_config
    from dicom_node.web.drift import DriftWatch
    from dicom_node.web.metrics import DriftCollector

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "spool")
    try:
        a, b = ("Acme Medical", "DR-1000", "ROOM-A"), ("Other", "DX-9", "ROOM-B")
        now = utcnow().replace(microsecond=0)
        rng = np.random.default_rng(2)
        end = now - timedelta(days=20)
        ref = {"*": [], "Acme Medical DR-1000 @ ROOM-A": [], "Other DX-9 @ ROOM-B": []}
        for i in range(40):  # the validation period
            for dev, label in ((a, "Acme Medical DR-1000 @ ROOM-A"), (b, "Other DX-9 @ ROOM-B")):
                p = float(rng.beta(5, 2))
                _add_study(store, f"1.2.3.{i}.{dev[2]}", dev, end - timedelta(hours=i + 1), p)
                ref[label].append(p)
                ref["*"].append(p)
        with store._session.begin() as s:
            s.add(
                Validation(
                    created_at=end + timedelta(hours=1),
                    classifier_sha256=CLF,
                    detector_sha256=DET,
                    period_start=end - timedelta(days=3),
                    period_end=end,
                    n=80,
                    positives=40,
                    details=json.dumps({"reference": ref}),
                )
            )
        for i in range(35):  # live, over 18 days (3 or 4 ISO weeks): A as before, B shifted
            _add_study(store, f"1.2.4.{i}.A", a, end + timedelta(hours=12 * i + 1), float(rng.beta(5, 2)))
            _add_study(store, f"1.2.4.{i}.B", b, end + timedelta(hours=12 * i + 1), float(rng.beta(14, 1.1)))
        # left out: a study a backfill pulled, a result of another model pair
        _add_study(store, "1.2.5.1", b, now - timedelta(hours=1), 0.01)
        with store._session.begin() as s:
            s.add(BackfillRun(id=1, created_at=now, state="done", query="{}"))
            s.flush()
            s.add(BackfillStudy(study_uid="1.2.5.1", run_id=1, state="moved", next_attempt_at=now, created_at=now))
        _add_study(store, "1.2.5.2", b, now - timedelta(hours=1), 0.01, models=MODELS.replace("4f2a9c1b", "ffffffff"))

        reference = store.drift_reference(CLF.upper(), DET)
        assert reference is not None and reference.live_since == end and len(reference.values["*"]) == 80
        assert store.drift_reference("0" * 64, DET) is None
        assert len(store.drift_window(7, reference.live_since, CLF, DET)["Other DX-9 @ ROOM-B"]) == 9  # its last 7 days
        live = store.drift_window(30, reference.live_since, CLF, DET)
        assert {dev: len(rows) for dev, rows in live.items()} == {
            "Acme Medical DR-1000 @ ROOM-A": 35,
            "Other DX-9 @ ROOM-B": 35,
        }
        assert len(store.drift_window(30, None, CLF, DET)["Other DX-9 @ ROOM-B"]) == 35 + 40  # with the period
        weeks = store.live_by_week(now - timedelta(days=30), CLF, DET, reference.live_since)
        assert sum(len(r) for w in weeks.values() for r in w.values()) == 70

        cfg = parse_config({"drift": {"cache_s": 0, "window_days": 30}}, tmp_path)
        watch = DriftWatch(cfg, store)
        watch.model_pair = lambda: (CLF, DET)  # type: ignore[method-assign]
        report = watch.current()
        assert report.devices["Other DX-9 @ ROOM-B"].alert
        assert not report.devices["Acme Medical DR-1000 @ ROOM-A"].alert
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(DriftCollector(watch))
        m = metric_samples(generate_latest(registry).decode())
        assert m[("dicom_node_drift_reference", ())] == 1
        assert m[("dicom_node_drift_alert", (("device", "Other DX-9 @ ROOM-B"),))] == 1
        assert m[("dicom_node_drift_alert", (("device", "Acme Medical DR-1000 @ ROOM-A"),))] == 0
        assert m[("dicom_node_drift_studies", (("device", "Other DX-9 @ ROOM-B"),))] == 35
        assert m[("dicom_node_drift_psi", (("device", "Other DX-9 @ ROOM-B"),))] > 1
        limit_b = report.devices["Other DX-9 @ ROOM-B"].psi_limit
        assert m[("dicom_node_drift_psi_limit", (("device", "Other DX-9 @ ROOM-B"),))] == pytest.approx(limit_b)
        assert ("dicom_node_drift_flag_rate_ratio", (("device", "Acme Medical DR-1000 @ ROOM-A"),)) in m

        # the console's page: a table of the window and two inline SVG charts, nothing loaded from elsewhere
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.sessions import SessionMiddleware
        from starlette.testclient import TestClient

        from dicom_node.passwords import hash_password
        from dicom_node.web.console import Console

        drift = {"cache_s": 0, "window_days": 30, "min_studies": 5}  # weekly points need 5 studies a week
        cfg = parse_config({"drift": drift, "web": {"users": {"op": hash_password("pw")}}}, tmp_path)
        console = Console(cfg, store, lambda: None)  # type: ignore[arg-type,return-value]
        console.drift.model_pair = lambda: (CLF, DET)  # type: ignore[method-assign]
        app = Starlette(routes=console.routes(), middleware=[Middleware(SessionMiddleware, secret_key="x")])
        with TestClient(app) as client:
            page = client.get("/login")
            csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
            client.post("/login", data={"username": "op", "password": "pw", "csrf": csrf})
            html = client.get("/drift").text
        assert 'href="/drift" class="here"' in html
        assert html.count("<svg") == 2 and "<polyline" in html and "<script" not in html
        assert 'data-device="Other DX-9 @ ROOM-B" class="bad"' in html and "ALERT" in html
        assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    finally:
        store.close()


def test_metrics_say_there_is_no_reference_without_a_validation(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from dicom_node.config import parse_config
    from dicom_node.web.drift import DriftWatch
    from dicom_node.web.metrics import DriftCollector

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "spool")
    try:
        watch = DriftWatch(parse_config({}, tmp_path), store)
        watch.model_pair = lambda: (CLF, DET)  # type: ignore[method-assign]
        registry = CollectorRegistry()
        registry.register(DriftCollector(watch))
        m = metric_samples(generate_latest(registry).decode())
        assert m[("dicom_node_drift_reference", ())] == 0
        assert not [k for k in m if k[0] != "dicom_node_drift_reference" and k[0].startswith("dicom_node_drift")]
    finally:
        store.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: apt-get install prometheus) absent")
def test_alert_rule_file_checks_and_its_unit_tests_pass():
    for args in (["check", "rules", "dicom-node-alerts.yml"], ["test", "rules", "dicom-node-alerts.test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


# ---- end to end on real radiographs ---------------------------------------------------------------------------
N_REF = 50  # reference studies per device
N_LIVE = 40  # live studies per device (drift.min_studies)
DEVICE_A = ("Acme Medical", "DR-1000", "XR-ROOM-A")
DEVICE_B = ("Other Imaging", "DX-9", "XR-ROOM-B")


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED_CLASSIFIER.is_file(), reason="the shipped classifier is not in models/")
def test_drift_alert_fires_for_the_changed_device_only(node_factory, tmp_path):
    from support.models import make_tiny_models
    from support.real_studies import DATA, make_real_studies, write_labels
    from support.scu import send_file

    if not (DATA / "labels.csv").is_file():
        pytest.skip(f"{DATA} is absent")
    _, detector = make_tiny_models(tmp_path / "models")  # drift is about P(abnormal): a tiny detector saves CPU
    node = node_factory(
        workers={"count": 1},
        inference={"models": {"classifier": str(SHIPPED_CLASSIFIER), "detector": str(detector)}},
        studies={"stable_after_s": 0.5},
        drift={"min_studies": N_LIVE, "cache_s": 0},
    )

    def send_and_wait(studies) -> None:
        done_before = node.status()["jobs"]["done"]
        for st in studies:
            assert send_file(node, st.path).Status == 0
        wait_for(
            lambda: (
                node.status()["jobs"]["done"] >= done_before + len(studies) and node.status()["jobs"]["queued"] == 0
            ),
            300,
            what=f"{len(studies)} studies analysed",
        )

    def metrics() -> dict:
        with urllib.request.urlopen(f"{node.web_url}/metrics", timeout=30) as r:
            return metric_samples(r.read().decode())

    # the validation period: devices A and B, films as they are, with the site's labels
    reference = make_real_studies(
        tmp_path / "ref", 2 * N_REF, split=None, devices=[DEVICE_A, DEVICE_B], accession_prefix="REF"
    )
    send_and_wait(reference)
    assert metrics()[("dicom_node_drift_reference", ())] == 0  # no validation yet: nothing judged
    node.cli("ground-truth", "import", str(write_labels(reference, tmp_path / "labels.csv")))
    node.cli("validate", "--report", str(tmp_path / "report"), "--write-calibration", str(tmp_path / "cal.json"))

    # live: new films (disjoint from the reference's) from A unchanged, and from B after a strong sharpening
    offset = N_REF
    live_a = make_real_studies(
        tmp_path / "a", N_LIVE, split=None, offset=offset, devices=[DEVICE_A], accession_prefix="LA"
    )
    live_b = make_real_studies(
        tmp_path / "b",
        N_LIVE,
        split=None,
        offset=offset + (N_LIVE + 1) // 2,
        devices=[DEVICE_B],
        transform=sharpen(),
        accession_prefix="LB",
    )
    send_and_wait([s for pair in zip(live_a, live_b) for s in pair])
    m = metrics()
    a, b = "Acme Medical DR-1000 @ XR-ROOM-A", "Other Imaging DX-9 @ XR-ROOM-B"
    figures = {
        dev: {
            k: m.get((f"dicom_node_drift_{k}", (("device", dev),)))
            for k in ("psi", "psi_limit", "flag_rate_ratio", "studies")
        }
        for dev in (a, b)
    }
    print("drift figures:", json.dumps(figures))
    assert m[("dicom_node_drift_reference", ())] == 1
    assert m[("dicom_node_drift_studies", (("device", a),))] == N_LIVE
    assert m[("dicom_node_drift_studies", (("device", b),))] == N_LIVE
    assert m[("dicom_node_drift_alert", (("device", b),))] == 1, figures
    assert m[("dicom_node_drift_alert", (("device", a),))] == 0, figures
    limit = psi_limit(N_LIVE, N_REF, 5, 0.25)  # 0.84: each device against its own 50 validated studies
    assert m[("dicom_node_drift_psi_limit", (("device", b),))] == pytest.approx(limit)
    assert m[("dicom_node_drift_psi", (("device", b),))] > limit > m[("dicom_node_drift_psi", (("device", a),))]
