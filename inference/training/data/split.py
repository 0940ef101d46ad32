"""Patient-level, seeded, stratified train/val/test split.

Every image of a patient lands in the same split. Patients are grouped into strata by
(any abnormal image, view of their first image); inside each stratum the patients are shuffled
with ``numpy.random.default_rng(seed)`` (sorted first, so the result does not depend on input
order) and each one goes to the split that is furthest below its target share of images. Small
strata therefore still spread as evenly as they can, and the same seed always gives the same split.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from inference.errors import DatasetError
from inference.training.data.sample import Sample

SPLITS = ("train", "val", "test")


def split_by_patient(
    samples: list[Sample], fractions: tuple[float, ...] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[Sample]]:
    """``{"train": [...], "val": [...], "test": [...]}``; no patient appears in two splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not sum(fractions) > 0:
        raise DatasetError(f"split fractions must be three non-negative numbers, got {fractions}")
    frac = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for pid, group in by_patient.items():
        group.sort(key=lambda s: s.image_id)
        strata[(any(s.abnormal for s in group), group[0].view or "")].append(pid)

    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for key in sorted(strata):
        pids = sorted(strata[key])
        rng.shuffle(pids)
        counts = np.zeros(3)
        for pid in pids:
            n = len(by_patient[pid])
            deficit = frac * (counts.sum() + n) - counts
            k = int(np.argmax(np.where(frac > 0, deficit, -np.inf)))
            counts[k] += n
            assigned[pid] = SPLITS[k]
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for pid in sorted(by_patient):
        out[assigned[pid]].extend(by_patient[pid])
    return out


def subsample(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """At most ``n`` samples, balanced between normal and abnormal where possible (seeded)."""
    if n is None or n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.abnormal]
    neg = [s for s in samples if not s.abnormal]
    take_pos = min(len(pos), max(n - len(neg), n // 2))
    take_neg = min(len(neg), n - take_pos)
    pick = [pos[i] for i in sorted(rng.choice(len(pos), take_pos, replace=False))] if take_pos else []
    pick += [neg[i] for i in sorted(rng.choice(len(neg), take_neg, replace=False))] if take_neg else []
    return sorted(pick, key=lambda s: s.image_id)
