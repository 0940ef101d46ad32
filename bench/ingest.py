#!/usr/bin/env python3
"""Ingest benchmark: N synthetic 2048x2048 16-bit DX files over ONE association, to the node and to dcmtk
storescp (writing to a temp dir), in the same run; and the same files to the node in ONE STOW-RS request
(multipart/related, streamed from disk). Prints files/s and MB/s for each, and the ratios.

    python bench/ingest.py [--count 200] [--size 2048] [--rounds 1]

The node writes each file fsync'd and commits a database row before it acknowledges; storescp does neither.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.dicom_factory import make_cxr  # noqa: E402
from support.node import NodeProcess, free_port  # noqa: E402


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, (size, size), dtype=np.uint16)
    files = []
    for i in range(count):
        p = folder / f"{i:04d}.dcm"
        make_cxr(p, modality="DX", bits_stored=12, pixels=np.roll(base, i, axis=1), study_uid="1.2.3.4.5.6.7.8")
        files.append(p)
    return files


def send(port: int, aet: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"storescu failed: {r.stderr[-2000:]}")
    return dt


def bench_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        dt = send(port, "STORESCP", files)
        assert len(list(out.iterdir())) == len(files), "storescp did not store every file"
        return dt
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(out)


def bench_node(files: list[Path], work: Path) -> float:
    node = NodeProcess(
        work / "node", studies={"stable_after_s": 3600}, storage={"min_free_disk_mb": 1}, logging={"level": "WARNING"}
    )
    node.start()
    try:
        dt = send(node.port, node.ae_title, files)
        assert node.status()["instances"]["total"] == len(files), "node did not store every file"
        return dt
    finally:
        node.stop()
        shutil.rmtree(work / "node")


BOUNDARY = "benchboundary"
TOKEN = "bench-token-0123456789abcdef"


def stow_body(files: list[Path]):
    """The multipart/related body, read from the files as it is sent."""
    for f in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def bench_stow(files: list[Path], work: Path) -> float:
    node = NodeProcess(
        work / "node",
        studies={"stable_after_s": 3600},
        storage={"min_free_disk_mb": 1},
        logging={"level": "INFO"},  # the web address is logged at INFO
        dicomweb={"enabled": True, "tokens": [TOKEN]},
    )
    node.start()
    try:
        session = requests.Session()
        session.trust_env = False
        t0 = time.perf_counter()
        r = session.post(
            node.web_url + "/dicom-web/studies",
            data=stow_body(files),  # chunked transfer encoding
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "Accept": "application/dicom+json",
            },
            timeout=600,
        )
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"STOW-RS answered {r.status_code}: {r.text[:500]}")
        assert node.status()["instances"]["total"] == len(files), "node did not store every file"
        return dt
    finally:
        node.stop()
        shutil.rmtree(work / "node")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=1, help="alternate node/storescp this many times")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=REPO / "bench") as tmp:
        work = Path(tmp)
        files = make_files(work / "in", args.count, args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} files, {mb:.0f} MB, {args.size}x{args.size} 16-bit DX, one association each")
        node_t, scp_t, stow_t = [], [], []
        for _ in range(args.rounds):
            scp_t.append(bench_storescp(files, work))
            node_t.append(bench_node(files, work))
            stow_t.append(bench_stow(files, work))
        ts, tn, tw = min(scp_t), min(node_t), min(stow_t)
        n = len(files)
        print(f"storescp : {n / ts:7.1f} files/s {mb / ts:8.1f} MB/s  ({ts:.2f} s)")
        print(f"dicom-node: {n / tn:7.1f} files/s {mb / tn:8.1f} MB/s  ({tn:.2f} s, fsync'd + committed)")
        print(f"STOW-RS   : {n / tw:7.1f} files/s {mb / tw:8.1f} MB/s  ({tw:.2f} s, one request, fsync'd + committed)")
        print(f"ratio node/storescp (files/s): {ts / tn:.2f}x   (target >= 1.5x)")
        print(f"ratio STOW-RS/C-STORE on the node (files/s): {tn / tw:.2f}x")


if __name__ == "__main__":
    main()
