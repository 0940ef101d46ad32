#!/usr/bin/env python3
"""The rate through HAProxy with one listener and with two: the LAN of tests/test_multihost.py (network namespaces
as hosts, PostgreSQL, the spool bind-mounted at a different path on each host, HAProxy from
docs/haproxy/haproxy.cfg), without the kills.

    sudo .venv/bin/python bench/multihost.py [--studies 60] [--parallel 4] [--rounds 2] [--listeners 2]

Two listener hosts (``dicom-node serve``, no workers) behind HAProxy and one worker host (``studies.stable_after_s``
is an hour, so it analyses nothing and the run measures receiving only). Each
round sends ``--studies`` new studies (real radiographs from nih-matched, 256 px, every other study with a second
image) from the PACS host through HAProxy, ``--parallel`` associations at once, one association per study: first
with only listener1 in HAProxy (listener2 in maintenance), then with all listeners. Printed per run: instances,
seconds, instances/s; then the median rate of each setting and their ratio (two to one). Needs root, haproxy,
dcmtk, iproute2, postgresql and ../shared. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".yolo"))

from support import netns  # noqa: E402
from support.models import make_tiny_models  # noqa: E402
from support.multihost.cluster import Cluster, make_studies, missing_tools  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=60, help="studies per run (default 60)")
    ap.add_argument("--parallel", type=int, default=4, help="associations at once (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (one listener, all listeners) (default 2)")
    ap.add_argument("--listeners", type=int, default=2, choices=(2, 3), help="listener hosts (default 2)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "multihost.json")
    args = ap.parse_args()
    why = netns.available()
    if why or missing_tools():
        print(f"cannot run: {why or 'missing ' + ' '.join(missing_tools())}", file=sys.stderr)
        return 2

    names = tuple(f"listener{i + 1}" for i in range(args.listeners))
    with tempfile.TemporaryDirectory(prefix="dicom-node-multihost-") as tmp:
        folder = Path(tmp)
        clf, det = make_tiny_models(folder / "models", p_abnormal=0.8, detector_logit=-0.3)
        studies = make_studies(folder / "studies", args.studies * 2 * args.rounds)
        cluster = Cluster(folder / "cluster", {"classifier": str(clf), "detector": str(det)}, stable_after_s=3600)
        runs: list[dict] = []
        try:
            cluster.up(listeners=names)
            for name in names:
                cluster.launch(name)
            cluster.launch("worker1")
            cluster.wait_started(*names, "worker1")
            cluster.wait_up(*names)
            batches = iter(studies[i : i + args.studies] for i in range(0, len(studies), args.studies))
            for r in range(args.rounds):
                for enabled in (names[:1], names):
                    for name in names:
                        cluster.set_server(name, name in enabled)
                    cluster.wait_up(*enabled)
                    report = cluster.send(next(batches), parallel=args.parallel)
                    sessions = {n: int(s["stot"]) for n, s in cluster.haproxy_servers().items()}
                    run = {
                        "round": r + 1,
                        "listeners": len(enabled),
                        "instances": report.instances,
                        "seconds": round(report.seconds, 2),
                        "instances_per_s": round(report.per_second, 2),
                        "failures": len(report.failures),
                        "sessions_so_far": sessions,
                    }
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            (row,) = cluster.sql("SELECT count(*) AS n FROM instances")
            stored = row["n"]
        finally:
            cluster.close()

    one = statistics.median(r["instances_per_s"] for r in runs if r["listeners"] == 1)
    many = statistics.median(r["instances_per_s"] for r in runs if r["listeners"] == args.listeners)
    summary = {
        "cpus": os.cpu_count(),
        "parallel_associations": args.parallel,
        "studies_per_run": args.studies,
        "instances_stored": stored,
        "instances_sent": sum(r["instances"] for r in runs),
        "one_listener_instances_per_s": round(one, 2),
        f"{args.listeners}_listeners_instances_per_s": round(many, 2),
        "ratio": round(many / one, 2),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
