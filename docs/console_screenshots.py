#!/usr/bin/env python3
"""Take the README's console screenshots (docs/images/console-*.png) with the default models.

    python docs/console_screenshots.py

Starts a real ``dicom-node serve`` (default models, one worker) with a dcmtk ``storescp`` as its PACS, sends
three real NIH radiographs from ``../shared/datasets/nih-matched`` as DICOM studies with ``storescu`` (made-up
patient names), waits until they are analysed and delivered, then logs in to the console in headless Chromium
and photographs each page. Nothing is asserted; ``tests/test_console.py`` is the test.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from dicom_node.passwords import hash_password  # noqa: E402
from support.dcmtk import DcmtkStoreSCP  # noqa: E402
from support.dicom_factory import make_cxr  # noqa: E402
from support.node import NodeProcess, wait_for  # noqa: E402
from support.viewers import Chromium  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "nih-matched"
OUT = REPO / "docs" / "images"
PASSWORD = "screenshot-password"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dicom-node-shots-") as tmp_name:
        tmp = Path(tmp_name)
        pacs = DcmtkStoreSCP(tmp / "pacs").start()
        node = NodeProcess(
            tmp / "node",
            workers={"count": 1},
            studies={"stable_after_s": 1},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "mode": "live"}],
            web={"users": {"radiology-it": hash_password(PASSWORD)}},
        )
        node.start(timeout=300)
        try:
            films = [
                *sorted((DATA / "abnormal" / "images").glob("*.jpg"))[:2],
                sorted((DATA / "normal" / "images").glob("*.jpg"))[0],
            ]
            for n, film in enumerate(films):
                grey = cv2.imread(str(film), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16  # 8 -> 12 bit
                make_cxr(
                    tmp / f"{n}.dcm",
                    rows=grey.shape[0],
                    cols=grey.shape[1],
                    pixels=grey,
                    patient_name=f"DEMO^PATIENT^{n + 1}",
                    patient_id=f"DEMO-{n + 1:04d}",
                )
                assert node.storescu(tmp / f"{n}.dcm").returncode == 0
            wait_for(
                lambda: node.status()["deliveries"]["delivered"] >= 3 * len(films), 600, interval=2, what="results"
            )
            study = node.rows("SELECT study_uid FROM findings ORDER BY score DESC LIMIT 1")
            uid = study[0]["study_uid"] if study else node.rows("SELECT study_uid FROM studies LIMIT 1")[0]["study_uid"]
            base = node.web_url
            with Chromium() as browser:
                page, _ = browser.new_page(width=1400, height=900)
                page.goto(f"{base}/login")
                page.fill("input[name=username]", "radiology-it")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(f"{base}/")
                OUT.mkdir(parents=True, exist_ok=True)
                for name, path in (
                    ("overview", "/"),
                    ("studies", "/studies"),
                    ("study", f"/studies/{uid}"),
                    ("models", "/models"),
                ):
                    page.goto(base + path)
                    page.screenshot(path=str(OUT / f"console-{name}.png"), full_page=name != "models")
                page.goto(f"{base}/analyse")
                png = tmp / "upload.png"
                cv2.imwrite(str(png), cv2.imread(str(films[0]), cv2.IMREAD_GRAYSCALE))
                page.set_input_files("input[type=file]", str(png))
                page.click("#analyse")
                page.locator("section.analysed").wait_for(timeout=300_000)
                page.screenshot(path=str(OUT / "console-analyse.png"), full_page=True)
            print("\n".join(str(p.relative_to(REPO)) for p in sorted(OUT.glob("console-*.png"))))
        finally:
            node.kill()
            pacs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
