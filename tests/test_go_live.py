"""Going live on evidence, end to end with Orthanc as the site's PACS (issue 20).

Orthanc's archive holds 40 studies made from real radiographs (nih-matched test split, with NIH's labels). The
node, silent, pulls them with `dicom-node backfill` (C-FIND, C-MOVE to itself), analyses them with the shipped
models and sends nothing back. `dicom-node validate` with the site's labels gives the same AUC and interval as
`dicom-node evaluate` on the same films, and proposes a site calibration. The destination then goes live with
that calibration: a new study gets its results at the PACS, decided at the site's threshold, and the 40
retrospective studies still get none.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inference.calibration import Calibration
from support.node import wait_for
from support.orthanc import Orthanc
from support.real_studies import make_real_studies, write_folder_labels, write_labels

pytestmark = pytest.mark.slow  # Orthanc, the shipped models over 40 real films, evaluate on the same films

REPO = Path(__file__).resolve().parents[1]
N = 40
DEVICES = [("Acme Medical", "DR-1000", "XR-ROOM-1"), ("Bcme", "CR-9", "XR-ROOM-2")]
METRICS = re.compile(r": (n \d+ \(\d+ abnormal\), AUC .*)$")


def own_objects(pacs: Orthanc, study_uid: str) -> list:
    return [ds for m in ("SR", "OT", "PR") for ds in pacs.instances_by_modality(study_uid, m)]


def test_backfill_silent_validate_then_live_at_the_site_threshold(tmp_path, node_factory):
    films = tmp_path / "films"
    studies = make_real_studies(films, N, split="test", seed=11, devices=DEVICES, start_date="20261115")
    pacs = Orthanc(tmp_path / "orthanc", route=False).start()
    try:
        assert pacs.storescu(*[s.path for s in studies]).returncode == 0
        node = node_factory(
            workers={"count": 1},
            studies={"stable_after_s": 1},
            destinations=[pacs.as_destination(outputs=("sr", "sc", "gsps"), mode="silent")],
            backfill={"source": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}},
            delivery={"backoff_initial_s": 1, "backoff_max_s": 3, "connect_timeout_s": 3},
        )
        pacs.route_to_node(node.port)  # the PACS knows the node's AE title: C-MOVE sends the images there

        # 1. pull the archive's history: every study arrives and is analysed; nothing is sent to the PACS
        out = node.cli("backfill", "--from", "2026-11-01", "--to", "2026-12-31")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: node.status()["jobs"]["done"] == N, 900, interval=2, what=f"{N} analysed studies")
        assert node.rows("SELECT COUNT(*) AS n FROM deliveries")[0]["n"] == 0  # retrospective: never delivered
        assert pacs.count_instances() == N and all(own_objects(pacs, s.study_uid) == [] for s in studies[:5])

        # 2. the site's labels, by accession number; validation equals evaluate on the same films
        out = node.cli("ground-truth", "import", str(write_labels(studies, tmp_path / "truth.csv")))
        assert f"imported {N} ground-truth row(s) from truth.csv; {N} of them match" in out.stdout
        site = tmp_path / "site-calibration.json"
        validated = node.cli(
            "validate", "--report", str(tmp_path / "report"), "--write-calibration", str(site),
            "--target-sensitivity", "0.9",
        )  # fmt: skip
        evaluated = subprocess.run(
            [sys.executable, "-m", "dicom_node", "evaluate", "--layout", "folder", "--images", str(films),
             "--csv", str(write_folder_labels(studies, tmp_path / "labels.csv")), "--modes", "soft",
             "--classifier", "models/classifier.pt", "--detector", "models/detector.pt",
             "--out", str(tmp_path / "evaluate")],
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
        print(validated.stdout, evaluated.stdout, sep="\n")

        def metrics(text: str, prefix: str) -> str:
            line = next(x for x in text.splitlines() if x.strip().startswith(prefix))
            return METRICS.search(line).group(1)

        # the same films give the same line: overall, per view, per device (evaluate's "batch" is the station)
        assert metrics(validated.stdout, "site validation") == metrics(evaluated.stdout, "classifier (operating")
        for view in sorted({s.view for s in studies}):
            assert metrics(validated.stdout, f"view {view}") == metrics(evaluated.stdout, f"view {view}")
        for make, model, station in DEVICES:
            mine = metrics(validated.stdout, f"device {make} {model} @ {station}")
            assert mine == metrics(evaluated.stdout, f"batch {station}")
        assert "month 2026-11" in validated.stdout and "month 2026-12" in validated.stdout
        assert "model card (validation split): n 144, AUC 0.750" in validated.stdout
        assert f"inference.models.calibration: {site}" in validated.stdout

        (row,) = node.rows("SELECT * FROM validations")
        assert row["n"] == N and row["positives"] == N // 2 and row["by"] == "cli"
        assert row["classifier_sha256"] == hashlib.sha256((REPO / "models/classifier.pt").read_bytes()).hexdigest()
        details = json.loads(row["details"])
        assert len(details["reference"]["*"]) == N
        assert {f"{m} {n} @ {s}" for m, n, s in DEVICES} <= set(details["reference"])
        assert details["calibration"]["target_sensitivity"] == 0.9
        report = Path(row["report_path"])
        assert report.parent == tmp_path / "report" and report.is_file()
        html = report.read_text()
        assert html.count("data:image/png;base64,") == 3 and "What the intervals mean" in html
        assert not re.search(r"(src|href)=['\"](https?:|//)", html) and "<script" not in html  # self-contained

        # the proposed calibration loads, is the classifier's, and reaches the target on these studies
        calibration = Calibration.load(site)
        assert calibration.model_sha256 == row["classifier_sha256"]
        got = node.rows("SELECT r.p_raw, i.view_position, i.accession_number FROM image_results r "
                        "JOIN instances i ON i.sop_instance_uid = r.sop_instance_uid")  # fmt: skip
        label = {s.accession: s.label for s in studies}
        flagged = [r["p_raw"] >= calibration.threshold(r["view_position"]) for r in got if label[r["accession_number"]]]
        assert sum(flagged) / len(flagged) >= 0.9

        # 3. live, at the site's operating point: a new study's results reach the PACS; the history's never do
        node.stop()
        node.config["destinations"] = [pacs.as_destination(outputs=("sr", "sc", "gsps"), mode="live")]
        node.config["inference"] = {"models": {"calibration": str(site)}}
        node._write_config()
        node.start()
        pacs.route_to_node(node.port)
        (new,) = make_real_studies(tmp_path / "new", 1, split="val", seed=5, accession_prefix="NEW")
        assert node.storescu(new.path).returncode == 0
        wait_for(lambda: len(own_objects(pacs, new.study_uid)) == 3, 300, interval=1, what="the new study's results")
        assert all(own_objects(pacs, s.study_uid) == [] for s in studies)
        (row,) = node.rows_of(
            "SELECT p_abnormal, p_raw, abnormal FROM image_results WHERE study_uid = ?", [new.study_uid]
        )
        t = calibration.threshold(new.view)
        assert bool(row["abnormal"]) == (row["p_raw"] >= t)
        logit = math.log(row["p_raw"] / (1 - row["p_raw"])) - math.log(t / (1 - t))
        assert row["p_abnormal"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
    finally:
        pacs.kill()
