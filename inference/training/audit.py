"""``dicom-node audit``: is the training set learnable from nuisance alone, before and after our preprocessing?

Runs the data set's confound audit (``../shared/datasets/tools/confound_audit.py``: a patient-grouped, cross-
validated logistic regression on view, brightness, contrast, sharpness and border brightness) twice on the
chosen split: on the images as stored, and on the images as the classifier sees them (intensity normalisation
and CLAHE with the model file's own settings, or the training defaults). A nuisance AUC well above 0.5 means a
network can separate the classes without seeing disease; keep it under 0.65.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from inference.errors import DatasetError
from inference.preprocess import PreprocessParams
from inference.training.data.images import load_clahe01
from inference.training.data.sample import Sample


def _write_csv(path: Path, rows: list[tuple[str, int, str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "view_position"])
        w.writerows(rows)


def run_audit(samples: list[Sample], params: PreprocessParams, tool: Path, boot: int = 1000) -> str:
    """The tool's report on the stored images and on the preprocessed ones (text, as printed)."""
    if not tool.is_file():
        raise DatasetError(f"confound audit tool {tool} not found (it ships with ../shared/datasets/tools)")
    out = []
    with tempfile.TemporaryDirectory(prefix="dicom-node-audit-") as tmp:
        tmp_dir = Path(tmp)
        raw = [(str(s.path.resolve()), s.label, s.patient_id, s.view or "") for s in samples]
        _write_csv(tmp_dir / "stored.csv", raw)
        seen = []
        for i, s in enumerate(samples):
            img = load_clahe01(s, params)  # as the node computes it, before the letterbox
            name = f"{i:05d}.png"
            cv2.imwrite(str(tmp_dir / name), np.rint(img * 255).astype(np.uint8))
            seen.append((name, s.label, s.patient_id, s.view or ""))
        _write_csv(tmp_dir / "seen.csv", seen)
        for title, csv_name in (("as stored", "stored.csv"), ("as the classifier sees them", "seen.csv")):
            res = subprocess.run(
                [sys.executable, str(tool), "--csv", str(tmp_dir / csv_name), "--boot", str(boot)],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise DatasetError(f"confound audit failed: {res.stderr.strip().splitlines()[-1:]}")
            out.append(f"--- {title} ---\n{res.stdout.strip()}")
    return "\n".join(out)
