"""Choosing a site calibration (``dicom-node calibrate``): per-view thresholds for a target sensitivity.

The choice itself lives in :mod:`inference.calibration` (the running node's ``validate`` makes the same choice on
its own results); it keeps its names here."""

from __future__ import annotations

from inference.calibration import MIN_PER_CLASS as MIN_PER_CLASS
from inference.calibration import _threshold_for_sensitivity as _threshold_for_sensitivity
from inference.calibration import choose_calibration as choose_calibration
