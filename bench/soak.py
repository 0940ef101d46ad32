#!/usr/bin/env python3
"""Soak benchmark: real senders while hostile clients run, against the real node process.

    python bench/soak.py [--senders 8] [--images 100] [--stalled 4] [--churners 20] [--size 256]

Two runs in the same process, each against a fresh node (``max_associations`` 16, ``acse_timeout_s`` 3):

- **baseline**: ``--senders`` pynetdicom senders in parallel, each one association storing ``--images`` DX
  images (``--size`` pixels square, 16 bit), from 127.0.0.1;
- **soak**: the same senders while ``--stalled`` clients (127.0.0.2) each send the first 30 bytes of an
  A-ASSOCIATE-RQ and stall (reconnecting when the node closes them), and ``--churners`` clients (127.0.0.3)
  connect and close as fast as they can.

Printed per run: images stored (from the node's database) against images sent, associations refused, seconds,
images/s; for the soak also the ratio of its throughput to the baseline's, the node's resident memory (median
of the first and of the last quarter of the run, sampled every 0.2 s), the files left in ``storage.root/tmp``,
and how many stalled and churning connections the node served. Nothing here is asserted: the figures are what
the closing note of issue 10 reports. Bounded in time: the senders must finish within ``--limit`` seconds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from support.dicom_factory import make_cxr  # noqa: E402
from support.node import NodeProcess  # noqa: E402
from support.rawdicom import associate_rq, connect  # noqa: E402


def make_files(folder: Path, senders: int, images: int, size: int) -> list[list[Path]]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, (size, size), dtype=np.uint16)
    out = []
    for s in range(senders):
        files = []
        for i in range(images):
            p = folder / f"{s:02d}-{i:04d}.dcm"
            make_cxr(p, bits_stored=12, pixels=np.roll(base, s * images + i, axis=1), study_uid=generate_uid())
            files.append(p)
        out.append(files)
    return out


def sender(port: int, aet: str, files: list[Path], result: dict) -> None:
    ae = AE(ae_title=f"SENDER{len(result):02d}"[:16])
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        result["refused"] = result.get("refused", 0) + 1
        return
    ok = 0
    for f in files:
        status = assoc.send_c_store(f)
        ok += int(getattr(status, "Status", -1) == 0x0000)
    assoc.release()
    result["ok"] = result.get("ok", 0) + ok


def stalled_client(port: int, called: str, stop: threading.Event, counts: dict) -> None:
    head = associate_rq(called)[:30]
    while not stop.is_set():
        try:
            s = connect(port, "127.0.0.2", timeout=1)
            s.sendall(head)
            counts["stalled"] += 1
            while not stop.is_set():  # wait until the node closes it
                try:
                    if not s.recv(1024):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            s.close()
        except OSError:
            time.sleep(0.05)


def churner(port: int, stop: threading.Event, counts: dict) -> None:
    while not stop.is_set():
        try:
            connect(port, "127.0.0.3", timeout=1).close()
            counts["churned"] += 1
        except OSError:
            pass
        time.sleep(0.01)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(work: Path, name: str, files: list[list[Path]], args, hostile: bool) -> dict:
    node = NodeProcess(
        work / name,
        node={"max_associations": 16, "acse_timeout_s": 3, "max_connections_per_peer": 12},
        studies={"stable_after_s": 3600},
        logging={"level": "WARNING"},
    )
    node.start()
    stop = threading.Event()
    counts = {"stalled": 0, "churned": 0}
    background: list[threading.Thread] = []
    rss: list[float] = []
    try:
        if hostile:
            for _ in range(args.stalled):
                background.append(
                    threading.Thread(target=stalled_client, args=(node.port, node.ae_title, stop, counts))
                )
            for _ in range(args.churners):
                background.append(threading.Thread(target=churner, args=(node.port, stop, counts)))
            for t in background:
                t.daemon = True
                t.start()
            time.sleep(1.0)  # let them take what they can first

        def sample() -> None:
            while not stop.is_set():
                rss.append(rss_mb(node.proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result: dict = {}
        senders = [threading.Thread(target=sender, args=(node.port, node.ae_title, f, result)) for f in files]
        t0 = time.perf_counter()
        for t in senders:
            t.start()
        for t in senders:
            t.join(max(0.0, args.limit - (time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
        unfinished = sum(t.is_alive() for t in senders)
        stop.set()
        for t in background:
            t.join(5)
        time.sleep(0.5)
        tmp_left = len(list((Path(node.config["storage"]["root"]) / "tmp").iterdir()))
        stored = node.status()["instances"]["total"]
    finally:
        stop.set()
        node.stop()
    q = max(1, len(rss) // 4)
    return {
        "sent": sum(len(f) for f in files),
        "acknowledged": result.get("ok", 0),
        "stored": stored,
        "refused": result.get("refused", 0),
        "unfinished": unfinished,
        "seconds": elapsed,
        "rate": result.get("ok", 0) / elapsed,
        "rss_first": statistics.median(rss[:q]) if rss else float("nan"),
        "rss_last": statistics.median(rss[-q:]) if rss else float("nan"),
        "tmp_left": tmp_left,
        **counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--stalled", type=int, default=4)
    ap.add_argument("--churners", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds the senders may take")
    args = ap.parse_args()
    _config.STORE_SEND_CHUNKED_DATASET = False
    socket.setdefaulttimeout(None)
    with tempfile.TemporaryDirectory(prefix="dicom-node-soak-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        files = make_files(work / "files", args.senders, args.images, args.size)
        base = run(work, "baseline", files, args, hostile=False)
        soak = run(work, "soak", files, args, hostile=True)
    print(
        f"{args.senders} senders x {args.images} images ({args.size}x{args.size} 16-bit DX), one association each; "
        f"soak adds {args.stalled} stalled handshakes and {args.churners} connect/close churners"
    )
    for name, r in (("baseline", base), ("soak", soak)):
        print(
            f"{name:9s}: stored {r['stored']}/{r['sent']} (acknowledged {r['acknowledged']}), associations refused "
            f"{r['refused']}, unfinished {r['unfinished']}, {r['seconds']:.1f} s, {r['rate']:.1f} images/s, "
            f"RSS {r['rss_first']:.0f} -> {r['rss_last']:.0f} MB, files left in tmp/ {r['tmp_left']}"
        )
    print(f"soak: {soak['stalled']} stalled connections and {soak['churned']} churning connections served")
    print(
        f"throughput ratio soak/baseline: {soak['rate'] / base['rate']:.2f}x (1.0 = the hostile clients cost nothing)"
    )


if __name__ == "__main__":
    main()
