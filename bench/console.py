#!/usr/bin/env python3
"""Console page loads with many studies stored: does a page cost the same with 100 or 10,000 studies?

    python bench/console.py [--studies 10000] [--small 100] [--repeat 15]

For each size, a fresh SQLite database under a temporary ``storage.root`` is filled in bulk with that many
studies (two images each; 90% analysed with a verdict and two findings, delivered; 5% failed; 5% skipped) and
the node's real web server (uvicorn, as ``serve`` runs it) is started on loopback. A logged-in client then
loads each console page ``--repeat`` times over HTTP. Printed per page: the median and the slowest time in ms
for both sizes, the ratio of the large to the small database, and the ratio of the page to ``/healthz`` (a
request that does no work) measured in the same run. The target of issue 11 is under 300 ms per page with
10,000 studies; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import functools
import http.cookiejar
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sqlalchemy import insert  # noqa: E402

from dicom_node.config import parse_config  # noqa: E402
from dicom_node.factories import build_pipeline  # noqa: E402
from dicom_node.passwords import hash_password  # noqa: E402
from dicom_node.web.server import WebServer  # noqa: E402
from storage import Store  # noqa: E402
from storage.db import Delivery, FindingRow, ImageResult, Instance, Job, Result, Study  # noqa: E402

PASSWORD = "bench-password"


def fill(store: Store, n: int) -> str:
    """n studies in bulk; returns the UID of a done study (for its page)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    studies, instances, jobs, images, findings, results, deliveries = [], [], [], [], [], [], []
    result_id = 0
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        t = now - timedelta(minutes=i)
        studies.append({"study_uid": uid, "first_received_at": t, "last_received_at": t, "stable_due_at": None})
        kind = "skipped" if i % 20 == 7 else "failed" if i % 20 == 13 else "done"
        job_id = None if kind == "skipped" else len(jobs) + 1
        for k in range(2):
            sop = f"{uid}.{k}"
            instances.append(
                {
                    "sop_instance_uid": sop,
                    "study_uid": uid,
                    "series_uid": f"{uid}.9",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "modality": "DX",
                    "body_part": "CHEST",
                    "view_position": "PA",
                    "calling_ae": "MODALITY",
                    "size_bytes": 8_000_000,
                    "path": f"/nonexistent/{i}/{k}.dcm",
                    "received_at": t,
                    "eligible": kind != "skipped",
                    "skip_reason": "BodyPartExamined is not a chest (KNEE)" if kind == "skipped" else None,
                    "job_id": job_id,
                }
            )
            if kind == "done":
                images.append(
                    {"job_id": job_id, "study_uid": uid, "sop_instance_uid": sop, "p_abnormal": 0.7, "abnormal": True}
                )
                for label in ("Cardiomegaly", "Pleural effusion"):
                    findings.append(
                        {
                            "job_id": job_id,
                            "study_uid": uid,
                            "sop_instance_uid": sop,
                            "label": label,
                            "score": 0.6,
                            "x_min": 10.0,
                            "y_min": 10.0,
                            "x_max": 200.0,
                            "y_max": 200.0,
                        }
                    )
        if job_id is not None:
            jobs.append(
                {
                    "id": job_id,
                    "study_uid": uid,
                    "state": kind,
                    "reason": "PixelDataError: image 1 of 2: cannot decode" if kind == "failed" else None,
                    "created_at": t,
                    "started_at": t,
                    "finished_at": t + timedelta(seconds=2),
                    "attempts": 1,
                    "crashes": 0,
                    "pipeline_s": 0.8,
                    "models": "classifier resnet18 0.4.0 (abcdef12), detector yolov8s 0.3.0 (12345678)",
                }
            )
        if kind == "done":
            result_id += 1
            results.append(
                {
                    "id": result_id,
                    "job_id": job_id,
                    "study_uid": uid,
                    "kind": "sr",
                    "sop_instance_uid": f"{uid}.100",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
                    "series_uid": f"{uid}.101",
                    "source_sop_uid": None,
                    "path": f"/nonexistent/{i}/sr.dcm",
                    "created_at": t,
                }
            )
            deliveries.append(
                {
                    "result_id": result_id,
                    "destination": "pacs",
                    "state": "delivered",
                    "attempts": 1,
                    "next_attempt_at": t,
                    "last_attempt_at": t,
                    "created_at": t,
                    "delivered_at": t + timedelta(seconds=3),
                }
            )
    with store.engine.begin() as conn:
        for table, rows in (
            (Study, studies),
            (Job, jobs),
            (Instance, instances),
            (ImageResult, images),
            (FindingRow, findings),
            (Result, results),
            (Delivery, deliveries),
        ):
            if rows:
                conn.execute(insert(table), rows)
    return studies[0]["study_uid"]


class Client:
    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> bytes:
        with self.opener.open(self.base + path, timeout=60) as r:
            assert r.status == 200, (path, r.status)
            return r.read()

    def log_in(self) -> None:
        token = re.search(rb'name="csrf" value="([^"]+)"', self.get("/login")).group(1).decode()
        data = urllib.parse.urlencode({"csrf": token, "username": "bench", "password": PASSWORD}).encode()
        with self.opener.open(self.base + "/login", data=data, timeout=60) as r:
            assert r.url.endswith("/"), "login failed"


def measure(n: int, repeat: int, password_hash: str) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-console-") as tmp:
        cfg = parse_config(
            {
                "storage": {"root": tmp},
                "web": {"port": 0, "users": {"bench": password_hash}},
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113, "mode": "live"}
                ],
            },
            Path(tmp),
        )
        store = Store(cfg.storage.resolved_database_url, cfg.storage.root)
        t0 = time.perf_counter()
        uid = fill(store, n)
        print(f"  {n} studies written in {time.perf_counter() - t0:.1f} s", flush=True)
        web = WebServer(cfg, store, functools.partial(build_pipeline, cfg))
        port = web.start()
        try:
            client = Client(f"http://127.0.0.1:{port}")
            client.log_in()
            pages = {
                "/healthz": "/healthz",
                "overview": "/",
                "studies": "/studies",
                "studies, page 100": f"/studies?page={min(100, max(1, n // 50))}",
                "studies, state=failed": "/studies?state=failed",
                "studies, skip reason": "/studies?skipped=KNEE",
                "studies, one day": f"/studies?date={datetime.now(UTC).date().isoformat()}",
                "study page": f"/studies/{uid}",
                "/metrics": "/metrics",
            }
            times: dict[str, list[float]] = {}
            for name, path in pages.items():
                client.get(path)  # warm: templates compiled, connections pooled
                got = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    client.get(path)
                    got.append((time.perf_counter() - t) * 1000)
                times[name] = got
            return times
        finally:
            web.stop()
            store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    password_hash = hash_password(PASSWORD)
    print(f"small database ({args.small} studies):")
    small = measure(args.small, args.repeat, password_hash)
    print(f"large database ({args.studies} studies):")
    large = measure(args.studies, args.repeat, password_hash)
    base = statistics.median(large["/healthz"])
    print(f"\n{'page':<24s}{'small ms':>10s}{'large ms':>10s}{'large max':>11s}{'large/small':>13s}{'x healthz':>11s}")
    for name in large:
        s, big = statistics.median(small[name]), statistics.median(large[name])
        print(f"{name:<24s}{s:>10.1f}{big:>10.1f}{max(large[name]):>11.1f}{big / s:>13.2f}{big / base:>11.1f}")
    worst = max(statistics.median(v) for k, v in large.items())
    print(f"\nslowest page (median) with {args.studies} studies: {worst:.0f} ms (target: under 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
