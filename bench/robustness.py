#!/usr/bin/env python3
"""Robustness of the AI decision to benign differences in how the same film is stored or processed.

    python bench/robustness.py [--n 150] [--classifier FILE] [--detector FILE] [--data ../shared/datasets]

Takes ``--n`` real NIH chest films from ``nih-matched`` (its test split first, then validation), runs the node's
pipeline (input check, intensity normalisation, CLAHE, classifier, detector, fusion) on each as it is, then on
each benign variant of it, and prints how often the decision changes (flip rate, with its 95 % Wilson interval):

    dicom, VOI window     12-bit DX with a Window Center/Width covering the 0.5-99.5 % range of the values
    dicom, no window      the same pixels without any window: the node's percentile fallback
    dicom 8 / 12 / 16 bit the same picture stored with 8, 12 and 16 bits (full-range window)
    gamma 0.7 / 1.4       x ** gamma
    blur                  Gaussian, sigma 1 px (of a 512 px film)
    sharpen               unsharp mask, amount 1, sigma 2 px
    jpeg q50              JPEG re-compression at quality 50
    resample 0.5x         down to half size and back up

DICOM variants are decoded by the node's own reader (``dicom_node.imaging.pixels.decode_image``), the rest are
fed as arrays. "decision" is the classifier's at its operating point (P(abnormal) >= 0.5); "result" is what
the SR states (abnormal when a finding is boxed or P(abnormal) after fusion reaches 0.5). The target (issue 9)
is a flip rate of at most 5 % for each. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.config import default_model  # noqa: E402
from dicom_node.imaging.pixels import decode_image  # noqa: E402
from inference.pipeline import Pipeline  # noqa: E402
from inference.training.augment import blur, jpeg, resample, unsharp  # noqa: E402
from inference.training.data.images import load_image01  # noqa: E402
from inference.training.data.nih import read_nih_matched  # noqa: E402
from inference.training.metrics import wilson_interval  # noqa: E402


def as_dicom(img01: np.ndarray, bits: int, window: str) -> Dataset:
    """A DX data set holding ``img01`` with ``bits`` stored bits; ``window``: "range" (covering all values),
    "percentile" (0.5-99.5 % of the values) or "none"."""
    top = 2**bits - 1
    values = np.rint(np.clip(img01, 0, 1) * top).astype(np.uint16 if bits > 8 else np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    if window == "range":
        ds.WindowCenter, ds.WindowWidth = (top + 1) / 2, top + 1
    elif window == "percentile":
        lo, hi = np.percentile(values, [0.5, 99.5])
        ds.WindowCenter, ds.WindowWidth = float((lo + hi) / 2), float(max(hi - lo, 1))
    ds.PixelData = values.tobytes()
    return ds


def from_dicom(ds: Dataset) -> np.ndarray:
    return decode_image(ds)[0]


VARIANTS = {
    "dicom, VOI window": lambda x: from_dicom(as_dicom(x, 12, "percentile")),
    "dicom, no window": lambda x: from_dicom(as_dicom(x, 12, "none")),
    "dicom 8 bit": lambda x: from_dicom(as_dicom(x, 8, "range")),
    "dicom 12 bit": lambda x: from_dicom(as_dicom(x, 12, "range")),
    "dicom 16 bit": lambda x: from_dicom(as_dicom(x, 16, "range")),
    "gamma 0.7": lambda x: x**0.7,
    "gamma 1.4": lambda x: x**1.4,
    "blur": lambda x: blur(x, 1.0 * max(x.shape) / 512),
    "sharpen": lambda x: unsharp(x, 1.0, 2.0 * max(x.shape) / 512),
    "jpeg q50": lambda x: jpeg(x, 50),
    "resample 0.5x": lambda x: resample(x, 0.5),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150, help="films (nih-matched test split, then val)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--classifier", default=str(default_model("classifier.pt")))
    ap.add_argument("--detector", default=str(default_model("detector.pt")))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        Pipeline.limit_threads(args.threads)
    samples = read_nih_matched(args.data)
    samples = ([s for s in samples if s.split == "test"] + [s for s in samples if s.split == "val"])[: args.n]
    pipe = Pipeline.from_files(args.classifier, args.detector)
    print(f"{len(samples)} nih-matched films; classifier {args.classifier}; detector {args.detector}")
    base, flips, refused = [], {k: [] for k in VARIANTS}, {k: 0 for k in VARIANTS}
    for i, s in enumerate(samples, 1):
        img = load_image01(s.path)
        ref = pipe.run(img, s.view)
        if ref.not_analysable:
            print(f"  {s.image_id}: not analysable ({ref.not_analysable}), left out")
            continue
        base.append(ref)
        for name, make in VARIANTS.items():
            out = pipe.run(np.ascontiguousarray(make(img), dtype=np.float32), s.view)
            if out.not_analysable:  # counted on its own, not as a flip
                refused[name] += 1
                continue
            flips[name].append(
                (
                    (out.p_abnormal >= 0.5) != (ref.p_abnormal >= 0.5),
                    out.abnormal != ref.abnormal,
                    abs(out.p_abnormal - ref.p_abnormal),
                )
            )
        if i % 25 == 0:
            print(f"  {i}/{len(samples)}", flush=True)
    n = len(base)
    print(
        f"\nabnormal decisions on the originals: classifier {sum(p.p_abnormal >= 0.5 for p in base)}/{n}, "
        f"result {sum(p.abnormal for p in base)}/{n}"
    )
    print(f"{'variant':20s} {'decision flips':>24s} {'result flips':>24s} {'median |dP|':>12s} refused")
    worst = 0.0
    for name, rows in flips.items():
        n = len(rows)
        d = sum(r[0] for r in rows)
        r_ = sum(r[1] for r in rows)
        lo, hi = wilson_interval(d, n)
        lo2, hi2 = wilson_interval(r_, n)
        worst = max(worst, d / n)
        print(
            f"{name:20s} {d:3d} = {d / n:5.1%} [{lo:.1%}-{hi:.1%}] {r_:3d} = {r_ / n:5.1%} [{lo2:.1%}-{hi2:.1%}] "
            f"{np.median([r[2] for r in rows]):12.4f} {refused[name]:7d}"
        )
    print(f"\nworst decision flip rate {worst:.1%} (target <= 5 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
