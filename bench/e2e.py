#!/usr/bin/env python3
"""End-to-end benchmark with a real PACS: studies sent to Orthanc, auto-routed to the node, results back in Orthanc.

    python bench/e2e.py [--studies 20] [--burst 100] [--urgent 1] [--tiny] [--stable 2] [--size 1024] [--gsps]
                        [--out DIR]

Orthanc (tests/support/orthanc.py, the documented Lua routing rule) forwards every chest DX it stores to a real
``dicom-node serve`` (tests/support/node.py) with one worker process, which sends SR + SC (+ GSPS with ``--gsps``)
back to Orthanc. Models: the files named in config.yaml (``models/classifier.pt``, ``models/detector.pt``), or
tiny random-weight models with ``--tiny`` (times the plumbing, not real networks).

Phase 1, latency: ``--studies`` one-image studies (synthetic ``--size`` x ``--size`` DX chest), sent one at a time;
each is waited for (SR and SC delivered, SR found in Orthanc) before the next is sent. ``--warmup`` studies go
first and are not counted. Per study, on the node's clock (its SQLite DB, naive UTC):

    t_ack      instances.received_at of the study's last instance (the row is committed just before 0x0000)
    t_sr       deliveries.delivered_at of the SR: when the node got Orthanc's C-STORE response, i.e. the SR is
               stored in Orthanc. Cross-checked with Orthanc's own /instances/{id}/metadata/ReceptionDate
               (UTC, whole seconds in Orthanc 1.10: only a consistency check, not a measurement)
    e2e        t_sr - t_ack
    pipeline   jobs.pipeline_s (Pipeline.run only, summed over the study's images)
    flag       finished_at - t_ack: time from the last image to the flag (the job's results committed, priority
               decided; /metrics dicom_node_time_to_flag_seconds), median and p95
    overhead   e2e - stable_after_s - pipeline  (target: median < 1 s), split into
      claim    jobs.started_at - (t_ack + stable)    stable timer lateness (created_at) + worker poll
      encode   finished_at - started_at - pipeline_s  read + decode pixels, SR/SC/GSPS encoding
      deliver  SR delivered_at - finished_at          result files written + committed (finished_at is stamped
                                                      before that), sender poll, association, C-STORE, Orthanc
    The worker's log line "job N done in X s" (its wall time up to the commit) splits "deliver" further into
    "commit" (job wall - (finished_at - started_at)) and "send" (the rest).

Phase 2, burst: ``--burst`` one-image studies in one storescu call into Orthanc, as fast as it goes; waits until
every SR is delivered. RSS of the node process and its children (the worker) is sampled every second; prints
RSS at the start, at 25/50/75/100 % of studies done, the max, min/median/max per quarter, and the slope over the
second half (Theil-Sen, MB per 10 studies; "flat" if <= 1) to judge "flat memory", plus studies per minute.
``--urgent`` studies (Requested Procedure Priority STAT) are sent last in the same storescu call, behind the
routine ones: the time to flag (median and p95) of the routine studies is the baseline, and the urgent ones'
time to flag is given as a ratio to it, with how many routine studies queued before them they overtook.

``--torch-threads N`` sets OMP_NUM_THREADS=N for the node (its worker inherits it; torch reads it for its intra-op
threads); left out, torch uses one thread per CPU.

Work files go to a temporary folder under bench/ (removed at exit) unless ``--out DIR`` keeps them there (logs,
node DB, results.json); bench/out/ is git-ignored. Orthanc and the node are killed at exit whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".yolo"))
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".yolo" / "mpl"))

from pydicom.uid import generate_uid  # noqa: E402

from support.dicom_factory import make_cxr  # noqa: E402
from support.node import NodeProcess, wait_for  # noqa: E402
from support.orthanc import Orthanc  # noqa: E402

TARGET_OVERHEAD_S = 1.0
FLAT_MB_PER_10 = 1.0  # "flat memory": RSS slope over the second half of the burst at most this
JOB_DONE_RE = re.compile(r"job (\d+) done in ([\d.]+) s \(pipeline ([\d.]+) s\)")


# ---------------------------------------------------------------------------------------------- helpers
def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def secs(a: datetime, b: datetime) -> float:
    return (a - b).total_seconds()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def theil_sen(x: list[float], y: list[float]) -> float:
    """Median of the pairwise slopes (robust to outliers); nan with fewer than two distinct x."""
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
    return statistics.median(slopes) if slopes else float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class NodeDB:
    """Read-only view of the node's SQLite database (its timestamps are naive UTC)."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            c.row_factory = sqlite3.Row
            self._local.conn = c
        return c

    def study(self, study_uid: str) -> dict | None:
        """Timings of the latest job of a study, or None while it is not finished and delivered."""
        c = self.conn
        job = c.execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (study_uid,)).fetchone()
        if job is None:
            return None
        if job["state"] == "failed":
            raise RuntimeError(f"job {job['id']} failed: {job['reason']}")
        if job["state"] != "done":
            return None
        dels = c.execute(
            "SELECT r.kind, d.state, d.delivered_at, d.last_error, r.sop_instance_uid FROM results r "
            "JOIN deliveries d ON d.result_id = r.id WHERE r.job_id = ?",
            (job["id"],),
        ).fetchall()
        for d in dels:
            if d["state"] == "failed":
                raise RuntimeError(f"delivery of {d['kind']} failed: {d['last_error']}")
        if not dels or any(d["state"] != "delivered" for d in dels):
            return None
        t_ack = ts(c.execute("SELECT max(received_at) FROM instances WHERE study_uid = ?", (study_uid,)).fetchone()[0])
        sr = [d for d in dels if d["kind"] == "sr"][0]
        return {
            "job_id": job["id"],
            "t_ack": t_ack,
            "created": ts(job["created_at"]),
            "started": ts(job["started_at"]),
            "finished": ts(job["finished_at"]),
            "pipeline_s": job["pipeline_s"] or 0.0,
            "sr_delivered": ts(sr["delivered_at"]),
            "sr_uid": sr["sop_instance_uid"],
            "last_delivered": max(ts(d["delivered_at"]) for d in dels),
            "n_results": len(dels),
        }

    def srs_delivered(self) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM deliveries d JOIN results r ON r.id = d.result_id "
            "WHERE r.kind = 'sr' AND d.state = 'delivered'"
        ).fetchone()[0]

    def failures(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT 'job ' || id || ': ' || coalesce(reason, '') FROM jobs WHERE state = 'failed' "
            "UNION ALL SELECT 'delivery ' || id || ': ' || coalesce(last_error, '') "
            "FROM deliveries WHERE state = 'failed'"
        ).fetchall()
        return [r[0] for r in rows]


def job_walls(node_log: str) -> dict[int, float]:
    """{job id: worker wall time up to its commit} from the worker's 'job N done in X s' log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in JOB_DONE_RE.finditer(node_log)}


def orthanc_sr(pacs: Orthanc, study_uid: str, sr_uid: str) -> tuple[str, dict]:
    """Orthanc's id and metadata of the node's SR in a study (fails if Orthanc does not have it)."""
    for series in pacs.series_of_study(study_uid):
        if series["Modality"] != "SR":
            continue
        for inst in series["instances"]:
            tags = pacs.get(f"/instances/{inst}")["MainDicomTags"]
            if tags.get("SOPInstanceUID") == sr_uid:
                keys = pacs.get(f"/instances/{inst}/metadata")
                meta = {k: pacs.request("GET", f"/instances/{inst}/metadata/{k}").decode() for k in keys}
                return inst, meta
    raise RuntimeError(f"the SR {sr_uid} is not in Orthanc although the node has it delivered")


def parse_reception_date(value: str) -> datetime:
    """Orthanc's ReceptionDate: ISO basic 'YYYYMMDDTHHMMSS' (UTC; fractional seconds if ever present)."""
    for fmt in ("%Y%m%dT%H%M%S.%f", "%Y%m%dT%H%M%S"):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            pass
    raise ValueError(f"unexpected ReceptionDate format {value!r}")


# ---------------------------------------------------------------------------------------------- setup
def models_for(args, work: Path) -> tuple[dict, str]:
    if args.tiny:
        from support.models import make_tiny_models

        omp = os.environ.get("OMP_NUM_THREADS")
        clf, det = make_tiny_models(work / "models")
        if omp is None:  # importing ultralytics sets OMP_NUM_THREADS=1; keep it out of the node's environment
            os.environ.pop("OMP_NUM_THREADS", None)
        return {"classifier": str(clf), "detector": str(det)}, "tiny random-weight models (tests/support/models.py)"
    from dicom_node.config import load_config
    from inference.modelfile import read_metadata

    cfg = load_config(REPO / "config.yaml")
    m = cfg.inference.models
    desc = []
    for kind, path in (("classifier", m.classifier), ("detector", m.detector)):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing (the default {kind} named in config.yaml); use --tiny")
        md = read_metadata(path)
        desc.append(f"{kind} {Path(path).name}: {md.architecture} v{md.version} @ {md.preprocess.input_size}px")
    return {"classifier": str(m.classifier), "detector": str(m.detector), "device": m.device}, "; ".join(desc)


class Studies:
    """One-image synthetic DX chest studies, distinct study/series/SOP UIDs and slightly different pixels."""

    def __init__(self, folder: Path, size: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ds = make_cxr(None, rows=size, cols=size)
        self.base = ds.pixel_array.astype(np.int32)
        self.rng = np.random.default_rng(0)
        self.n = 0

    def make(self, prefix: str, **extra) -> tuple[Path, str]:
        self.n += 1
        noise = self.rng.integers(-24, 25, self.base.shape, dtype=np.int32)
        pixels = np.clip(np.roll(self.base, (self.n % 17) - 8, axis=1) + noise, 0, 4095).astype(np.uint16)
        study_uid = generate_uid()
        path = self.folder / f"{prefix}{self.n:04d}.dcm"
        make_cxr(
            path,
            pixels=pixels,
            study_uid=study_uid,
            patient_id=f"BENCH{self.n:05d}",
            AccessionNumber=f"B{self.n:07d}",
            **extra,
        )
        return path, study_uid


def _proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _proc_children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def process_tree_rss(pid: int) -> list[tuple[int, float, str]]:
    """[(pid, RSS in MB, command line)] of ``pid`` and all its descendants (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    out = []
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                out.append((p.pid, p.memory_info().rss / 2**20, " ".join(p.cmdline())))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append((p, _proc_rss_mb(p), cmd))
            todo += _proc_children(p)
        except OSError:
            pass
    return out


class RssSampler(threading.Thread):
    """Every ``interval`` s: RSS of the node process and of its descendants (the worker), and SRs delivered."""

    def __init__(self, pid: int, db: NodeDB, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.db, self.interval = pid, db, interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()

    def sample(self) -> dict:
        node_mb = workers_mb = other_mb = 0.0
        for pid, rss, cmd in process_tree_rss(self.pid):
            if pid == self.pid:
                node_mb += rss
            elif "resource_tracker" in cmd:
                other_mb += rss
            else:
                workers_mb += rss
        return {
            "t": time.monotonic(),
            "done": self.db.srs_delivered(),
            "node_mb": node_mb,
            "workers_mb": workers_mb,
            "other_mb": other_mb,
            "total_mb": node_mb + workers_mb + other_mb,
        }

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.sample())
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.samples.append(self.sample())


# ---------------------------------------------------------------------------------------------- phases
def phase_latency(args, pacs: Orthanc, node: NodeProcess, db: NodeDB, studies: Studies) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    meta_keys: dict = {}
    total = args.warmup + args.studies
    for i in range(total):
        warm = i < args.warmup
        path, study_uid = studies.make("lat")
        r = pacs.storescu(path)
        if r.returncode != 0:
            raise RuntimeError(f"storescu into Orthanc failed: {r.stderr.strip()}")
        got = wait_for(
            lambda uid=study_uid: db.study(uid), args.timeout, interval=0.05, what=f"study {i + 1}: SR and SC delivered"
        )
        inst_id, meta = orthanc_sr(pacs, study_uid, got["sr_uid"])
        meta_keys = meta
        got["orthanc_reception"] = parse_reception_date(meta["ReceptionDate"]) if "ReceptionDate" in meta else None
        got["warmup"] = warm
        got["study"] = i + 1
        rows.append(got)
        e2e = secs(got["sr_delivered"], got["t_ack"])
        log(
            f"{'warm-up' if warm else 'study'} {i + 1 - (0 if warm else args.warmup)}: e2e {e2e:.2f} s, "
            f"pipeline {got['pipeline_s']:.2f} s, overhead {e2e - args.stable - got['pipeline_s']:.2f} s"
        )
    walls = job_walls(node.log())
    for row in rows:
        row["job_wall"] = walls.get(row["job_id"])
    return rows, meta_keys


def breakdown(row: dict, stable: float) -> dict[str, float]:
    due = row["t_ack"] + timedelta(seconds=stable)
    e2e = secs(row["sr_delivered"], row["t_ack"])
    out = {
        "e2e": e2e,
        "e2e-stable": e2e - stable,
        "pipeline": row["pipeline_s"],
        "overhead": e2e - stable - row["pipeline_s"],
        "claim": secs(row["started"], due),
        "timer_late": secs(row["created"], due),
        "poll": secs(row["started"], row["created"]),
        "encode": secs(row["finished"], row["started"]) - row["pipeline_s"],
        "flag": secs(row["finished"], row["t_ack"]),
        "deliver": secs(row["sr_delivered"], row["finished"]),
    }
    if row.get("job_wall") is not None:
        job_end = row["started"] + timedelta(seconds=row["job_wall"])
        out["commit"] = secs(job_end, row["finished"])
        out["send"] = secs(row["sr_delivered"], job_end)
    if row.get("orthanc_reception") is not None:
        # ReceptionDate has whole seconds: the SR was stored in [ReceptionDate, ReceptionDate + 1 s)
        out["orthanc_minus_delivered"] = secs(row["orthanc_reception"], row["sr_delivered"])
    return out


def print_latency(args, rows: list[dict], meta: dict) -> dict:
    counted = [r for r in rows if not r["warmup"]]
    bds = [breakdown(r, args.stable) for r in counted]
    cols = ["e2e", "e2e-stable", "pipeline", "overhead", "claim", "encode", "deliver", "commit", "send", "flag"]
    print()
    print(
        f"Phase 1: latency, {len(counted)} one-image studies one at a time (stable_after_s = {args.stable:g}; "
        f"{args.warmup} warm-up not counted); seconds"
    )
    print("  study " + " ".join(f"{c:>10}" for c in cols) + "  orthanc-recv")
    for r, b in zip(counted, bds):
        orth = r["orthanc_reception"].isoformat(sep=" ") if r["orthanc_reception"] else "-"
        print(
            f"  {r['study'] - args.warmup:5d} "
            + " ".join(f"{b.get(c, float('nan')):10.3f}" for c in cols)
            + f"  {orth}"
        )
    stats = {}
    print("  " + "-" * 118)
    for name, q in (("median", 0.5), ("p90", 0.9), ("p95", 0.95)):
        vals = {c: pct([b[c] for b in bds if c in b], q) for c in cols + ["timer_late", "poll"]}
        stats[name] = vals
        print(f"  {name:>5} " + " ".join(f"{vals[c]:10.3f}" for c in cols))
    med = stats["median"]
    print(
        f"  claim = stable-timer lateness (median {med['timer_late']:.3f} s) + worker poll (median {med['poll']:.3f} s)"
    )
    # Orthanc's ReceptionDate cross-check (UTC, whole seconds): delivered_at must lie in [RD, RD + 1 s) (+ clock slop)
    diffs = [b["orthanc_minus_delivered"] for b in bds if "orthanc_minus_delivered" in b]
    if diffs:
        ok = all(-1.05 < d <= 0.05 for d in diffs)
        print(
            f"  Orthanc ReceptionDate (metadata keys: {', '.join(sorted(meta))}): "
            f"e.g. {meta.get('ReceptionDate')!r}; ReceptionDate - SR delivered_at in "
            f"[{min(diffs):.3f}, {max(diffs):.3f}] s -> "
            f"{'consistent with UTC, whole seconds' if ok else 'NOT consistent with delivered_at'}"
        )
    met = med["overhead"] < TARGET_OVERHEAD_S
    print(
        f"  target: median overhead < {TARGET_OVERHEAD_S:g} s -> {med['overhead']:.3f} s: {'MET' if met else 'NOT MET'}"
    )
    return {"stats": stats, "met": met, "n": len(counted)}


def flag_times(db: NodeDB, jobs_after: int) -> dict[str, float]:
    """{study UID: seconds from its last image to its flag (job committed)} of the jobs after ``jobs_after``."""
    rows = db.conn.execute(
        "SELECT j.study_uid, j.finished_at, (SELECT max(i.received_at) FROM instances i "
        "WHERE i.study_uid = j.study_uid) AS last_image FROM jobs j WHERE j.id > ? AND j.state = 'done'",
        (jobs_after,),
    ).fetchall()
    return {r["study_uid"]: secs(ts(r["finished_at"]), ts(r["last_image"])) for r in rows}


def phase_burst(args, pacs: Orthanc, node: NodeProcess, db: NodeDB, studies: Studies) -> dict:
    n_routine = args.burst
    made = [studies.make("burst") for _ in range(n_routine)]
    made += [studies.make("urgent", RequestedProcedurePriority="STAT") for _ in range(args.urgent)]
    urgent_uids = {uid for _, uid in made[n_routine:]}
    files = [path for path, _ in made]
    n = len(files)
    before = db.srs_delivered()
    jobs_before = db.conn.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0]
    sampler = RssSampler(node.proc.pid, db, interval=args.sample_s)
    sampler.start()
    time.sleep(3 * args.sample_s)  # a few samples of the idle, warm node first
    t0 = time.monotonic()
    log(f"burst: sending {n} studies ({args.urgent} urgent last) into Orthanc in one storescu call")
    r = pacs.storescu(*files, timeout=max(300, 5 * n))
    t_sent = time.monotonic()
    if r.returncode != 0:
        sampler.stop()
        raise RuntimeError(f"storescu into Orthanc failed: {r.stderr.strip()[-2000:]}")
    log(f"burst: Orthanc accepted {n} studies in {t_sent - t0:.1f} s; waiting for {n} SRs")
    last_report = [0]

    def all_done() -> bool:
        done = db.srs_delivered() - before
        if done >= last_report[0] + max(1, n // 10):
            last_report[0] = done
            log(f"burst: {done}/{n} SRs delivered")
        bad = db.failures()
        if bad:
            raise RuntimeError("failures during the burst: " + "; ".join(bad[:5]))
        return done >= n

    wait_for(all_done, args.timeout + 60 * n, interval=0.5, what=f"{n} SRs delivered")
    t_end = time.monotonic()
    time.sleep(2 * args.sample_s)
    sampler.stop()

    c = db.conn
    first_ack = ts(c.execute("SELECT min(received_at) FROM instances WHERE job_id > ?", (jobs_before,)).fetchone()[0])
    jobs = c.execute("SELECT * FROM jobs WHERE id > ?", (jobs_before,)).fetchall()
    last_sr = ts(
        c.execute(
            "SELECT max(d.delivered_at) FROM deliveries d JOIN results r ON r.id = d.result_id "
            "WHERE r.kind = 'sr' AND r.job_id > ?",
            (jobs_before,),
        ).fetchone()[0]
    )
    pipeline = [j["pipeline_s"] or 0.0 for j in jobs]
    node_span = secs(last_sr, first_ack)
    flags = flag_times(db, jobs_before)
    routine_flag = [t for uid, t in flags.items() if uid not in urgent_uids]
    urgent_flag = [t for uid, t in flags.items() if uid in urgent_uids]
    started = {j["study_uid"]: j["started_at"] for j in jobs}
    created = {j["study_uid"]: j["created_at"] for j in jobs}
    overtaken = [
        sum(1 for uid in started if uid not in urgent_uids and created[uid] < created[u] and started[uid] > started[u])
        for u in urgent_uids
        if u in started
    ]
    queued_before = [
        sum(1 for uid in created if uid not in urgent_uids and created[uid] < created[u]) for u in urgent_uids
    ]

    samples = sampler.samples
    s0 = samples[0]

    def at_fraction(f: float) -> dict:
        goal = before + int(round(f * n))
        return next((s for s in samples if s["done"] >= goal), samples[-1])

    marks = {f"{int(f * 100)}%": at_fraction(f) for f in (0.25, 0.5, 0.75, 1.0)}
    half = [s for s in samples if before + n / 2 <= s["done"] <= before + n]
    # Theil-Sen (median of pairwise slopes): RSS swings by the size of one job's buffers between samples taken
    # inside and outside a job, and a least-squares fit chases those swings; the median slope does not.
    slope = {
        key: theil_sen([s["done"] for s in half], [s[key] for s in half]) * 10
        for key in ("total_mb", "node_mb", "workers_mb")
    }
    mx = {k: max(s[k] for s in samples) for k in ("total_mb", "node_mb", "workers_mb")}
    quarters = []
    for q in range(4):
        lo, hi = before + q * n / 4, before + (q + 1) * n / 4
        vals = [s["total_mb"] for s in samples if lo <= s["done"] < hi or (q == 3 and s["done"] >= hi)]
        quarters.append((min(vals), statistics.median(vals), max(vals)) if vals else (float("nan"),) * 3)
    flat = None if slope["total_mb"] != slope["total_mb"] else slope["total_mb"] <= FLAT_MB_PER_10  # nan: too few
    throughput_node = n / node_span * 60
    throughput_wall = n / (t_end - t0) * 60

    print()
    print(f"Phase 2: burst of {n} one-image studies (one storescu call into Orthanc, auto-routed)")
    print(
        f"  Orthanc accepted all in {t_sent - t0:.1f} s; all {n} SRs in Orthanc {t_end - t0:.1f} s after the "
        f"send started (poll 0.5 s)"
    )
    print(
        f"  throughput: {throughput_node:.1f} studies/min (node: first ack -> last SR delivered, {node_span:.1f} s); "
        f"{throughput_wall:.1f} studies/min wall (storescu start -> all SRs)"
    )
    print(
        f"  time to flag (last image -> results committed), routine (baseline): median {pct(routine_flag, 0.5):.2f} s, "
        f"p95 {pct(routine_flag, 0.95):.2f} s over {len(routine_flag)} studies"
    )
    if urgent_flag:
        print(
            f"  urgent (STAT, sent last): median {pct(urgent_flag, 0.5):.2f} s, max {max(urgent_flag):.2f} s -> "
            f"ratio to the routine median {pct(urgent_flag, 0.5) / pct(routine_flag, 0.5):.2f}x; overtook "
            f"{sum(overtaken)} of {sum(queued_before)} routine jobs queued before them"
        )
    print(
        f"  pipeline per study in the burst: median {statistics.median(pipeline):.3f} s, "
        f"p90 {pct(pipeline, 0.9):.3f} s -> pipeline-bound max {60 / statistics.median(pipeline):.1f} studies/min"
    )
    print(
        f"  RSS (MB)      {'node':>8} {'worker(s)':>10} {'total':>8}   (samples every {args.sample_s:g} s, "
        f"{len(samples)} samples)"
    )
    print(f"    {'start':<11} {s0['node_mb']:8.1f} {s0['workers_mb']:10.1f} {s0['total_mb']:8.1f}")
    for k, s in marks.items():
        print(f"    {k + ' done':<11} {s['node_mb']:8.1f} {s['workers_mb']:10.1f} {s['total_mb']:8.1f}")
    print(f"    {'max':<11} {mx['node_mb']:8.1f} {mx['workers_mb']:10.1f} {mx['total_mb']:8.1f}")
    print(
        f"    {'slope':<11} {slope['node_mb']:8.2f} {slope['workers_mb']:10.2f} {slope['total_mb']:8.2f}"
        f"   MB per 10 studies over the second half (Theil-Sen)"
    )
    print(
        "  total RSS (MB) min / median / max while the studies of each quarter were done: "
        + "; ".join(f"Q{i + 1} {a:.0f} / {b:.0f} / {c:.0f}" for i, (a, b, c) in enumerate(quarters))
    )
    print(
        f"  flat memory (total slope <= {FLAT_MB_PER_10:g} MB / 10 studies over the second half): "
        f"{ {True: 'YES', False: 'NO', None: 'n/a (too few samples)'}[flat] }"
    )
    return {
        "n": n,
        "accept_s": t_sent - t0,
        "wall_s": t_end - t0,
        "node_span_s": node_span,
        "throughput_node_per_min": throughput_node,
        "throughput_wall_per_min": throughput_wall,
        "pipeline_median_s": statistics.median(pipeline),
        "flag_routine_median_s": pct(routine_flag, 0.5),
        "flag_routine_p95_s": pct(routine_flag, 0.95),
        "flag_urgent_median_s": pct(urgent_flag, 0.5),
        "flag_urgent_ratio": pct(urgent_flag, 0.5) / pct(routine_flag, 0.5) if urgent_flag else float("nan"),
        "urgent_overtook": sum(overtaken),
        "urgent_queued_behind": sum(queued_before),
        "rss_start": s0,
        "rss_marks": marks,
        "rss_max": mx,
        "slope_mb_per_10": slope,
        "quarters": quarters,
        "flat": flat,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20, help="phase 1: studies sent one at a time (0 = skip)")
    ap.add_argument("--warmup", type=int, default=1, help="phase 1: warm-up studies first, not counted")
    ap.add_argument("--burst", type=int, default=100, help="phase 2: studies sent at once (0 = skip)")
    ap.add_argument("--urgent", type=int, default=1, help="phase 2: urgent (STAT) studies sent after the burst")
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight models instead of config.yaml's")
    ap.add_argument("--stable", type=float, default=2.0, help="studies.stable_after_s of the node")
    ap.add_argument("--size", type=int, default=1024, help="image rows = columns")
    ap.add_argument("--gsps", action="store_true", help="the destination also gets GSPS (default: SR + SC)")
    ap.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling interval in the burst")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for one study's results")
    ap.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the node's worker (default: torch's)")
    ap.add_argument("--out", type=Path, help="keep work files, logs and results.json here (e.g. bench/out/e2e)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: kill Orthanc and the node

    with ExitStack() as stack:
        if args.out:
            work = args.out.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=REPO / "bench")))
        models, model_desc = models_for(args, work)
        if args.torch_threads:
            os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # NodeProcess passes os.environ on
        threads = os.environ.get("OMP_NUM_THREADS", f"torch default ({os.cpu_count()})")
        outputs = ("sr", "sc", "gsps") if args.gsps else ("sr", "sc")
        print(f"dicom-node e2e benchmark  {datetime.now().isoformat(timespec='seconds')}")
        print(f"  host: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
        print(f"  models: {model_desc}")
        print(f"  worker torch intra-op threads: {threads}")
        print(
            f"  stable_after_s = {args.stable:g}; 1 worker process; images {args.size}x{args.size} 12-bit DX; "
            f"destination outputs {'+'.join(outputs)}; work folder {work}"
        )

        pacs = Orthanc(work / "orthanc")
        stack.callback(pacs.kill)
        node = NodeProcess(
            work / "node",
            workers={"count": 1},
            inference={"models": models},
            studies={"stable_after_s": args.stable},
            destinations=[pacs.as_destination(outputs=outputs)],
            logging={"level": "INFO"},
        )
        stack.callback(node.kill)
        t = time.monotonic()
        pacs.start()
        node.start()
        pacs.route_to_node(node.port)
        wait_for(
            lambda: " ready" in node.log() or "cannot start" in node.log() or node.proc.poll() is not None,
            600,
            interval=0.2,
            what="the worker to load its models",
        )
        if "cannot start" in node.log() or node.proc.poll() is not None:
            raise SystemExit(f"the node's worker did not start:\n{node.log()[-3000:]}")
        log(
            f"Orthanc {pacs.system().get('Version')} and the node are up; worker ready after "
            f"{time.monotonic() - t:.1f} s"
        )
        db = NodeDB(Path(node.config["storage"]["root"]) / "dicom-node.sqlite3")
        studies = Studies(work / "in", args.size)

        result: dict = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "models": model_desc,
        }
        lat = burst = None
        if args.studies:
            rows, meta = phase_latency(args, pacs, node, db, studies)
            lat = print_latency(args, rows, meta)
            result["latency"] = {**lat, "rows": [{**r, **breakdown(r, args.stable)} for r in rows]}
        if args.burst:
            burst = phase_burst(args, pacs, node, db, studies)
            result["burst"] = burst
        load_end = os.getloadavg()

        print()
        print("=" * 100)
        print("SUMMARY (dicom-node bench/e2e.py)")
        print(
            f"  machine: {os.cpu_count()} CPUs, shared and noisy (load average at end {load_end[0]:.2f}); "
            f"Orthanc {pacs.system().get('Version')} on 127.0.0.1; 1 worker; models: {model_desc}"
        )
        print(
            f"  stable_after_s = {args.stable:g}; {args.size}x{args.size} DX; outputs {'+'.join(outputs)}; "
            f"torch threads {threads}"
        )
        if lat:
            m, p = lat["stats"]["median"], lat["stats"]["p90"]
            print(f"  latency, {lat['n']} studies one at a time (median / p90, s):")
            print(
                f"    e2e (ack by node -> SR stored in Orthanc) {m['e2e']:.2f} / {p['e2e']:.2f}; "
                f"minus stable wait {m['e2e-stable']:.2f} / {p['e2e-stable']:.2f}; pipeline {m['pipeline']:.2f} / "
                f"{p['pipeline']:.2f}"
            )
            print(
                f"    delivery overhead (e2e - stable - pipeline) {m['overhead']:.2f} / {p['overhead']:.2f} "
                f"-> target < {TARGET_OVERHEAD_S:g} s at the median: {'MET' if lat['met'] else 'NOT MET'}"
            )
            print(
                f"    time to flag (last image -> results committed) {m['flag']:.2f} / p95 "
                f"{lat['stats']['p95']['flag']:.2f}"
            )
            print(
                f"    overhead parts (medians): claim {m['claim']:.2f} (timer {m['timer_late']:.2f} + worker poll "
                f"{m['poll']:.2f}), decode+encode {m['encode']:.2f}, write+commit {m['commit']:.2f}, "
                f"sender poll+C-STORE {m['send']:.2f}"
            )
        if burst:
            s0, mk, mx, sl = burst["rss_start"], burst["rss_marks"], burst["rss_max"], burst["slope_mb_per_10"]
            print(
                f"  burst of {burst['n']} studies: {burst['throughput_node_per_min']:.1f} studies/min "
                f"(pipeline median {burst['pipeline_median_s']:.2f} s/study); all SRs in Orthanc after "
                f"{burst['wall_s']:.0f} s"
            )
            print(
                f"    time to flag, routine: median {burst['flag_routine_median_s']:.1f} s, p95 "
                f"{burst['flag_routine_p95_s']:.1f} s; urgent (STAT, sent last): median "
                f"{burst['flag_urgent_median_s']:.1f} s = {burst['flag_urgent_ratio']:.2f}x the routine median, "
                f"ahead of {burst['urgent_overtook']} of {burst['urgent_queued_behind']} routine jobs queued before"
            )
            print(
                f"    RSS node+worker MB: start {s0['total_mb']:.0f}, 25% {mk['25%']['total_mb']:.0f}, "
                f"50% {mk['50%']['total_mb']:.0f}, 75% {mk['75%']['total_mb']:.0f}, "
                f"100% {mk['100%']['total_mb']:.0f}, max {mx['total_mb']:.0f}; "
                f"slope {sl['total_mb']:+.2f} MB/10 studies over the second half -> "
                f"flat: { {True: 'YES', False: 'NO', None: 'n/a'}[burst['flat']] }"
            )
        print("=" * 100)
        if args.out:
            (work / "results.json").write_text(json.dumps(result, indent=1, default=str))
            print(f"results, node and Orthanc logs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
