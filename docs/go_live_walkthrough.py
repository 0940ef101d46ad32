#!/usr/bin/env python3
"""Walk the README's go-live path as a site would, and photograph the validation report and console pages.

    python docs/go_live_walkthrough.py [--studies 80]

Orthanc (the docs/orthanc example, auto-routing off) holds studies made from real radiographs of the nih-matched
test split, with NIH's labels, from two made-up devices. A silent `dicom-node serve` with the shipped models pulls
them with `dicom-node backfill`; `dicom-node ground-truth import` and `dicom-node validate` then measure the
models on them. The commands' output is printed as a user sees it; the report and the console's Validation page
go to docs/images/. Nothing is asserted: tests/test_go_live.py is the test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from dicom_node.passwords import hash_password  # noqa: E402
from support.node import NodeProcess, wait_for  # noqa: E402
from support.orthanc import Orthanc  # noqa: E402
from support.real_studies import make_real_studies, write_labels  # noqa: E402
from support.viewers import Chromium  # noqa: E402

OUT = REPO / "docs" / "images"
PASSWORD = "walkthrough-password"


def run(node: NodeProcess, *args: str) -> str:
    print(f"\n$ dicom-node {' '.join(args)}", flush=True)
    done = node.cli(*args, check=False)
    print(done.stdout.rstrip())
    if done.returncode:
        print(done.stderr.rstrip())
        raise SystemExit(done.returncode)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=80)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicom-node-golive-") as tmp_name:
        tmp = Path(tmp_name)
        studies = make_real_studies(
            tmp / "films", args.studies, seed=11, devices=[("Acme", "DR-1", "ROOM-1"), ("Bcme", "CR-9", "ROOM-2")]
        )
        pacs = Orthanc(tmp / "orthanc", route=False).start()
        node = NodeProcess(
            tmp / "node",
            workers={"count": 1},
            studies={"stable_after_s": 1},
            destinations=[pacs.as_destination(outputs=("sr", "sc", "gsps"), mode="silent")],
            backfill={"source": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}},
            web={"users": {"radiology-lead": hash_password(PASSWORD)}},
        )
        try:
            assert pacs.storescu(*[s.path for s in studies]).returncode == 0
            node.start(timeout=300)
            pacs.route_to_node(node.port)
            t0 = time.monotonic()
            run(node, "backfill", "--from", "2026-11-01", "--to", "2027-12-31")
            wait_for(lambda: node.status()["jobs"]["done"] == len(studies), 1800, interval=2, what="analyses")
            print(f"\n{len(studies)} studies pulled and analysed in {time.monotonic() - t0:.0f} s")
            print(f"deliveries made: {node.rows('SELECT COUNT(*) AS n FROM deliveries')[0]['n']}")
            run(node, "ground-truth", "import", str(write_labels(studies, tmp / "truth.csv")))
            run(node, "validate", "--target-sensitivity", "0.9")
            base = node.web_url
            with Chromium() as browser:
                page, _ = browser.new_page(width=1200, height=900)
                OUT.mkdir(parents=True, exist_ok=True)
                page.goto(f"{base}/login")
                page.fill("input[name=username]", "radiology-lead")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(f"{base}/")
                page.goto(f"{base}/validation/1/report")  # the report as the console serves it
                page.screenshot(path=str(OUT / "validation-report.png"), full_page=True)
                page.goto(f"{base}/validation")
                page.screenshot(path=str(OUT / "console-validation.png"), full_page=True)
            print("\n" + "\n".join(str(p.relative_to(REPO)) for p in sorted(OUT.glob("*validation*.png"))))
        finally:
            node.kill()
            pacs.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
