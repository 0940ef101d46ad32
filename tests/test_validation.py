"""Site ground truth and site validation (issue 20, parts 3 and 4).

- ``dicom-node ground-truth import``: a good CSV, and bad lines named;
- the validation cases as storage builds them (the newest truth counts, accession numbers match, only the model
  pair's results, the study's highest P(abnormal));
- (``dicom-node validate`` on 40 real radiographs pulled from Orthanc and analysed with the shipped models, against
  ``dicom-node evaluate`` on the same films: tests/test_go_live.py);
- the console: an operator's verdict becomes ground truth (CSRF, audit), the Validation page validates now, the
  Models page and the overview say whether the configured pair is validated, and the SR's Algorithm Parameters say
  "no site validation" before and "site-validated <date>, n=<n>" after.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from dicom_node.passwords import hash_password
from inference.calibration import Calibration
from inference.site_validation import NothingToValidate, validate_cases
from storage import Store
from storage.db import GroundTruth, ImageResult, Instance, Job, Study
from storage.validation import TruthRow, ValidationCase
from support.node import NodeProcess, wait_for
from support.real_studies import make_real_studies

REPO = Path(__file__).resolve().parents[1]
N = 40
DEVICES = [("Acme Medical", "DR-1000", "XR-ROOM-1"), ("Bcme", "CR-9", "XR-ROOM-2")]
METRICS = re.compile(r": (n \d+ \(\d+ abnormal\), AUC .*)$")
PASSWORD = "correct horse battery"
CLF_SHA, DET_SHA = "4f2a9c1b" + "0" * 56, "a1b2c3d4" + "1" * 56
MODELS_TEXT = "classifier resnet18 0.2.0 (4f2a9c1b); detector yolov8s 0.3.0 (a1b2c3d4)"


# ----------------------------------------------------------------------------- fast: statistics and storage


def test_the_statistics_live_outside_training_code_under_their_old_names_too():
    import inference.calibration as calibration
    import inference.statistics as statistics
    import inference.training.calibrate as calibrate
    import inference.training.evaluate as evaluate
    import inference.training.metrics as metrics

    for name in ("roc_auc", "roc_curve", "wilson_interval", "auc_interval", "binary_metrics", "Z_95"):
        assert getattr(metrics, name) is getattr(statistics, name)
    assert calibrate.choose_calibration is calibration.choose_calibration
    assert calibrate._threshold_for_sensitivity is calibration._threshold_for_sensitivity
    assert evaluate.classifier_line is statistics.classifier_line


def test_model_facts_are_read_without_torch():
    code = (
        "import sys; from inference.site_validation import model_file_facts, model_card_figures; "
        "f = model_file_facts('models/classifier.pt'); assert 'torch' not in sys.modules; "
        "c = model_card_figures(f['metadata']); print(f['sha256'], c['split'], c['overall']['roc_auc'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    sha, split, auc = out.split(" ", 1)[0], out.split()[1:3], out.split()[-1]
    assert sha == hashlib.sha256((REPO / "models" / "classifier.pt").read_bytes()).hexdigest()
    assert split == ["validation", "split"] and 0.5 < float(auc) < 1.0


def _case(label: int, p: float, view: str = "PA", device: str = "A", month: str = "2026-11", raw=None):
    return ValidationCase(
        "1.2", label, p, p if raw is None else raw, view, device, month, date(2026, 11, 1), datetime.now(), False, "x"
    )


def test_validation_statistics_on_known_cases():
    rng = np.random.default_rng(0)
    cases = [_case(1, float(p), device="A" if i % 2 else "B") for i, p in enumerate(rng.uniform(0.4, 1.0, 30))]
    cases += [_case(0, float(p), device="A" if i % 2 else "B") for i, p in enumerate(rng.uniform(0.0, 0.6, 30))]
    r = validate_cases(cases, 0.9, "ab" * 32)
    assert r["n"] == 60 and r["positives"] == 30
    assert set(r["per_device"]) == {"A", "B"} and r["per_device"]["A"]["n"] == 30
    assert sorted(r["reference"]) == ["*", "A", "B"] and len(r["reference"]["*"]) == 60
    cal = Calibration(**r["calibration"])
    assert cal.model_sha256 == "ab" * 32
    y = np.asarray([c.label for c in cases])
    raw = np.asarray([c.p_raw for c in cases])
    thr = np.asarray([cal.threshold(c.view) for c in cases])
    assert ((raw >= thr) & (y == 1)).sum() / 30 >= 0.9
    json.dumps(r)  # JSON-safe
    with pytest.raises(NothingToValidate, match="normal and abnormal"):
        validate_cases([_case(1, 0.7), _case(1, 0.8)])
    with pytest.raises(NothingToValidate, match="nothing to validate"):
        validate_cases([])


def _study(s, uid: str, accession: str, images: list[tuple[float, float, str]], models: str, study_date: str = ""):
    now = datetime.now(UTC).replace(tzinfo=None)
    s.add(Study(study_uid=uid, first_received_at=now, last_received_at=now, stable_due_at=None))
    s.flush()
    job = Job(study_uid=uid, state="done", created_at=now, models=models)
    s.add(job)
    s.flush()
    for k, (p, raw, view) in enumerate(images):
        sop = f"{uid}.{k}"
        s.add(
            Instance(
                sop_instance_uid=sop, study_uid=uid, series_uid=f"{uid}.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                view_position=view, manufacturer="Acme", model_name="DR-1", station_name="ROOM-1",
                study_date=study_date, accession_number=accession, size_bytes=1, path="/x", received_at=now,
                eligible=True, job_id=job.id,
            )
        )  # fmt: skip
        s.add(
            ImageResult(job_id=job.id, study_uid=uid, sop_instance_uid=sop, p_abnormal=p, p_raw=raw, abnormal=p >= 0.5)
        )


def test_validation_cases_from_storage(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "spool")
    try:
        with store._session.begin() as s:
            _study(s, "1.1", "ACC1", [(0.3, 0.6, "PA"), (0.8, 0.9, "AP")], MODELS_TEXT, "20261005")
            _study(s, "1.2", "ACC2", [(0.2, 0.5, "PA")], MODELS_TEXT)
            _study(s, "1.3", "ACC3", [(0.9, 0.95, "PA")], "classifier x 1 (deadbeef); detector y 1 (a1b2c3d4)")
        added, matched = store.import_ground_truth(
            [
                TruthRow(abnormal=False, accession_number="ACC1"),
                TruthRow(abnormal=False, study_uid="1.2"),
                TruthRow(abnormal=True, study_uid="1.3"),
                TruthRow(abnormal=True, accession_number="NOT-HERE"),
            ],
            "csv:a.csv",
        )
        assert (added, matched) == (4, 3)
        with store._session.begin() as s:  # a later row of the same study counts
            s.add(
                GroundTruth(
                    study_uid=None, accession_number="ACC1", abnormal=True, findings="", source="csv:b.csv",
                    created_at=datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=5),
                )
            )  # fmt: skip
        cases = {c.study_uid: c for c in store.validation_cases(CLF_SHA, DET_SHA)}
        assert set(cases) == {"1.1", "1.2"}  # 1.3 was made by another classifier
        c = cases["1.1"]
        assert (c.label, c.p_abnormal, c.p_raw, c.view, c.month) == (1, 0.8, 0.9, "AP", "2026-10")
        assert c.device == "Acme DR-1 @ ROOM-1" and c.truth_source == "csv:b.csv" and not c.retrospective
        assert cases["1.2"].label == 0 and cases["1.2"].month == date.today().strftime("%Y-%m")
        assert [x.study_uid for x in store.validation_cases(CLF_SHA, DET_SHA, since=date(2026, 10, 6))] == ["1.2"]
        # an operator's verdicts: agree = the node's verdict, disagree = the opposite, missed = abnormal
        assert store.record_verdict("1.2", "agree", "alice").abnormal is False
        assert store.record_verdict("1.2", "disagree", "alice", note="subtle").abnormal is True
        rec = store.record_verdict("1.2", "missed", "alice", finding="Pneumothorax")
        assert rec.abnormal is True and rec.findings == ("Pneumothorax",)
        truth = store.ground_truth_of("1.2")
        assert truth.source == "console:alice" and truth.verdict == "missed" and truth.findings == "Pneumothorax"
        assert store.latest_validation(CLF_SHA, DET_SHA) is None
        vid = store.record_validation(classifier_sha256=CLF_SHA, detector_sha256=DET_SHA, n=2, positives=1)
        assert store.latest_validation(CLF_SHA, DET_SHA).id == vid
        assert store.latest_validation("f" * 64, DET_SHA) is None  # another model file: no validation
    finally:
        store.close()


def test_ground_truth_import_names_bad_lines(tmp_path):
    node = NodeProcess(tmp_path / "node")  # not started: the command works on the stored state
    good = tmp_path / "good.csv"
    good.write_text("accession_number,label,findings\nA1,abnormal,Pleural effusion; Cardiomegaly\nA2,normal,\nA3,1,\n")
    out = node.cli("ground-truth", "import", str(good))
    assert "imported 3 ground-truth row(s) from good.csv; 0 of them match studies this node holds" in out.stdout
    (row,) = node.rows("SELECT findings, source FROM ground_truth WHERE accession_number = 'A1'")
    assert row == {"findings": "Pleural effusion; Cardiomegaly", "source": "csv:good.csv"}
    for text, message in (
        ("accession_number,label\nA1,abnormal\nA2,maybe\n", "line 3: label 'maybe' is not normal, abnormal"),
        ("accession_number,label,findings\nA1,abnormal,Broken leg\n", "line 2: unknown finding 'Broken leg'"),
        ("patient,label\nP1,normal\n", "line 1: the header needs accession_number or study_uid"),
        ("study_uid,label\n,normal\n", "line 2: no study_uid"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        out = node.cli("ground-truth", "import", str(bad), check=False)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out
    assert node.rows("SELECT COUNT(*) AS n FROM ground_truth")[0]["n"] == 3  # nothing of a bad file imported
    out = node.cli("validate", check=False)
    assert out.returncode == 2 and "nothing to validate" in out.stderr
    assert node.cli("validate", "--target-sensitivity", "1.5", check=False).returncode == 2


# ----------------------------------------------------------------------------- slow: console and SR (tiny models)


def _get(url: str, cookie: str) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def post(url: str, data: dict, cookie: str | None = None):
    """(status, body, headers) of a form POST; redirects are not followed."""
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=60) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def _login(base: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"{base}/login", timeout=10) as r:
        cookie = r.headers["Set-Cookie"].split(";")[0]
        token = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    code, _, headers = post(f"{base}/login", {"username": "alice", "password": PASSWORD, "csrf": token}, cookie)
    assert code == 303
    cookie = headers["set-cookie"].split(";")[0]
    token = re.search(r'name="csrf" value="([^"]+)"', _get(f"{base}/", cookie)[1]).group(1)
    return cookie, token


def _sr_bytes(node: NodeProcess, study_uid: str) -> bytes:
    (row,) = node.rows_of("SELECT path FROM results WHERE kind = 'sr' AND study_uid = ?", [study_uid])
    return Path(row["path"]).read_bytes()


@pytest.mark.slow  # a worker loads (tiny) models
def test_console_verdicts_validation_page_and_the_sr(tmp_path, node_factory, models):
    studies = make_real_studies(tmp_path / "films", 4, seed=2, start_date="20261120")
    node = node_factory(
        workers={"count": 1},
        inference={"models": models},
        studies={"stable_after_s": 0.5},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "outputs": ["sr"], "mode": "live"}
        ],
        delivery={"max_attempts": 1, "connect_timeout_s": 1},
        web={"users": {"alice": hash_password(PASSWORD)}},
    )
    base = node.web_url
    assert node.storescu(*[s.path for s in studies[:3]]).returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] == 3, 120, what="3 analysed studies")
    assert b"no site validation" in _sr_bytes(node, studies[0].study_uid)  # before any validation

    cookie, token = _login(base)
    assert "unvalidated-warning" in _get(f"{base}/", cookie)[1]  # a live destination, no validation
    assert "No site validation for these model files" in _get(f"{base}/models", cookie)[1]
    code, page = _get(f"{base}/studies/{studies[0].study_uid}", cookie)
    assert code == 200 and 'id="verdict-form"' in page and "No ground truth for this study yet" in page

    def verdict(study, **form) -> str:
        code, _, headers = post(f"{base}/studies/{study.study_uid}/verdict", {"csrf": token, **form}, cookie)
        assert code == 303, code
        return urllib.parse.unquote_plus(headers["location"])

    assert post(f"{base}/studies/{studies[0].study_uid}/verdict", {"verdict": "agree"}, cookie)[0] == 403  # no CSRF
    # the tiny classifier says 0.8 for every image: every study is "abnormality suspected"
    assert "verdict recorded: agree; ground truth abnormal" in verdict(studies[0], verdict="agree")
    assert "verdict recorded: disagree; ground truth normal" in verdict(studies[1], verdict="disagree", note="clear")
    assert "choose which finding was missed" in verdict(studies[2], verdict="missed")
    assert "ground truth abnormal (Pleural effusion)" in verdict(
        studies[2], verdict="missed", finding="Pleural effusion"
    )
    page = _get(f"{base}/studies/{studies[1].study_uid}", cookie)[1]
    assert "Ground truth: <b>normal</b>" in page and "console:alice" in page
    rows = node.rows("SELECT verdict, abnormal, source FROM ground_truth ORDER BY id")
    assert [(r["verdict"], r["abnormal"], r["source"]) for r in rows] == [
        ("agree", 1, "console:alice"), ("disagree", 0, "console:alice"), ("missed", 1, "console:alice")
    ]  # fmt: skip
    audit = (node.folder / "var" / "audit.jsonl").read_text()
    assert audit.count('"event": "console_verdict"') == 3 and studies[0].study_uid not in audit

    # validate now, from the Validation page
    assert "No validation yet" in _get(f"{base}/validation", cookie)[1]
    code, _, headers = post(f"{base}/validation/run", {"csrf": token, "target_sensitivity": "0.9"}, cookie)
    assert code == 303 and "validation+1+recorded" in headers["location"], headers["location"]
    page = _get(f"{base}/validation", cookie)[1]
    assert 'data-validation="1"' in page and "/validation/1/report" in page and "0.500 [" in page
    code, report = _get(f"{base}/validation/1/report", cookie)
    assert code == 200 and "Site validation #1" in report and "Only 3 studies" in report
    assert _get(f"{base}/validation/1/report", "dicom_node_session=none")[0] == 200  # the login form, not the report
    assert "Site validation #1" not in _get(f"{base}/validation/1/report", "dicom_node_session=none")[1]
    assert "Validated on this site" in _get(f"{base}/models", cookie)[1]
    assert "unvalidated-warning" not in _get(f"{base}/", cookie)[1]
    assert '"event": "console_validate"' in (node.folder / "var" / "audit.jsonl").read_text()

    # the next SR says so
    assert node.storescu(studies[3].path).returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] == 4, 120, what="the study sent after the validation")
    assert f"site-validated {datetime.now(UTC).date().isoformat()}, n=3".encode() in _sr_bytes(
        node, studies[3].study_uid
    )
