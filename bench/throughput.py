#!/usr/bin/env python3
"""Analysis throughput of a real node: images per second with 1, 2 and 4 worker processes.

    python bench/throughput.py [--studies 12] [--images-per-study 2] [--workers 1,2,4] [--device cpu|cuda]
                               [--backend torch|onnxruntime] [--batch-images 8]

For each worker count a fresh ``dicom-node serve`` (the models in ``config.yaml``, by default the shipped ones)
is started with ``workers.count`` = N and ``inference.models.threads`` = cores // N (at least 1), and waits
until its workers have loaded their models. Then ``--studies`` studies of ``--images-per-study`` real NIH
radiographs each (as DICOM, from ``../shared/datasets/nih-matched``) are sent with one ``storescu`` each, all
at once, and the clock runs from the first image sent until the last job is done (``status``). Printed per
worker count: images, seconds, images/s and the ratio to one worker in the same run. With ``--device cuda``
the same on the GPU (half precision, a study's images batched); where no GPU is present the script says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from support.dicom_factory import make_cxr  # noqa: E402
from support.node import NodeProcess, wait_for  # noqa: E402

FILMS = REPO.parent / "shared" / "datasets" / "nih-matched"


def make_studies(folder: Path, studies: int, per_study: int) -> list[list[Path]]:
    films = sorted((FILMS / "abnormal" / "images").glob("*.jpg")) + sorted((FILMS / "normal" / "images").glob("*.jpg"))
    if len(films) < studies * per_study:
        raise SystemExit(f"need {studies * per_study} films under {FILMS}")
    out = []
    for s in range(studies):
        files = []
        study_uid = f"1.2.826.0.1.3680043.8.498.77{s + 1}"
        for i in range(per_study):
            grey = cv2.imread(str(films[s * per_study + i]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
            path = folder / f"s{s}-{i}.dcm"
            make_cxr(path, rows=grey.shape[0], cols=grey.shape[1], pixels=grey, study_uid=study_uid,
                     view="PA" if i % 2 == 0 else "AP")  # fmt: skip
            files.append(path)
        out.append(files)
    return out


def run(workers: int, studies: list[list[Path]], tmp: Path, device: str, backend: str, batch: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // workers)
    node = NodeProcess(
        tmp / f"node-{device}-{workers}",
        node={"max_connections_per_peer": 64, "max_associations": 64},  # every sender at once, from one host
        workers={"count": workers},
        studies={"stable_after_s": 0.5},
        inference={"models": {"device": device, "threads": threads, "backend": backend, "batch_images": batch}},
    )
    node.start(timeout=600)
    try:
        wait_for(lambda: node.status()["workers"]["alive"] == workers, 600, interval=0.5, what="workers ready")
        t0 = time.perf_counter()
        senders = [
            subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)])
            for files in studies
        ]
        if any(p.wait(300) for p in senders):
            raise SystemExit("a storescu failed; see the node log " + str(node.log_path))
        images = sum(map(len, studies))

        def finished() -> bool:  # every image stored and nothing left to analyse (a study may get two jobs)
            st = node.status()
            return (
                st["instances"]["total"] == images
                and st["studies"]["receiving"] == 0
                and not (st["jobs"]["queued"] or st["jobs"]["running"])
            )

        wait_for(finished, 3600, interval=0.2, what="all studies analysed")
        return time.perf_counter() - t0
    finally:
        node.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--images-per-study", type=int, default=2)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    ap.add_argument("--batch-images", type=int, default=8)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: no GPU on this machine; nothing measured")
            return 0
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="dicom-node-throughput-") as name:
        tmp = Path(name)
        studies = make_studies(tmp, args.studies, args.images_per_study)
        images = args.studies * args.images_per_study
        print(flush=True)
        print(f"{images} images in {args.studies} studies, device {args.device}, backend {args.backend}, "
              f"{os.cpu_count()} cores")  # fmt: skip
        print(f"{'workers':>8s}{'threads':>9s}{'seconds':>9s}{'images/s':>10s}{'vs 1':>7s}")
        first = None
        for n in counts:
            seconds = run(n, studies, tmp, args.device, args.backend, args.batch_images)
            rate = images / seconds
            first = first or rate
            threads = max(1, (os.cpu_count() or 1) // n)
            print(f"{n:>8d}{threads:>9d}{seconds:>9.1f}{rate:>10.2f}{rate / first:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
