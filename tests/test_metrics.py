"""mAP@0.4 (VinBigData competition rule) and classification metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.training.metrics import (
    NO_FINDING_BOX,
    add_no_finding,
    auc_interval,
    binary_metrics,
    choose_threshold,
    class_ap,
    detection_map,
    iou_matrix,
    map_range,
    roc_auc,
    voc_ap,
    voc_ap_11point,
    wilson_interval,
)
from inference.types import NO_FINDING_ID

G1, G2 = (0, 0, 10, 10), (20, 20, 30, 30)


def test_two_gt_three_predictions_by_hand():
    # sorted: P1 (0.9) hits G1 -> TP; P2 (0.8) hits nothing -> FP; P3 (0.7) hits G2 -> TP
    preds = [("a", 0.7, G2), ("a", 0.9, G1), ("a", 0.8, (50, 50, 60, 60))]
    r = class_ap({"a": [G1, G2]}, preds, iou_thr=0.4)
    assert r.tp.tolist() == [True, False, True]
    np.testing.assert_allclose(r.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r.precision, [1.0, 0.5, 2 / 3])
    # envelope: precision 1 up to recall 0.5, then 2/3 up to recall 1 -> 0.5 * 1 + 0.5 * 2/3
    assert r.ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_voc2010_differs_from_11_point():
    recall, precision = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    assert voc_ap(recall, precision) == pytest.approx(5 / 6)
    # 11-point: t = 0.0..0.5 (6 points) precision 1, t = 0.6..1.0 (5 points) precision 2/3
    assert voc_ap_11point(recall, precision) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(recall, precision) != pytest.approx(voc_ap_11point(recall, precision))
    r = class_ap(
        {"a": [G1, G2]},
        [("a", 0.9, G1), ("a", 0.8, (50, 50, 60, 60)), ("a", 0.7, G2)],
        iou_thr=0.4,
        interpolation="voc2007",
    )
    assert r.ap == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_iou_threshold_is_strict_and_duplicates_are_false_positives():
    just_04 = (0, 0, 4, 10)  # IoU with G1 = 40 / 100 = 0.4 exactly
    assert iou_matrix([just_04], [G1])[0, 0] == pytest.approx(0.4)
    assert class_ap({"a": [G1]}, [("a", 0.9, just_04)], 0.4).ap == 0.0  # "IoU > 0.4"
    assert class_ap({"a": [G1]}, [("a", 0.9, just_04)], 0.4, strict=False).ap == 1.0
    dup = class_ap({"a": [G1]}, [("a", 0.9, G1), ("a", 0.8, (0, 0, 10, 9))], 0.4)
    assert dup.tp.tolist() == [True, False]
    assert dup.ap == pytest.approx(1.0)  # the FP comes after full recall
    # a prediction on an image without ground truth of that class is a false positive
    fp_first = class_ap({"a": [G1], "b": []}, [("b", 0.95, G1), ("a", 0.9, G1)], 0.4)
    assert fp_first.ap == pytest.approx(0.5)  # recall 1 reached at precision 1/2


def test_no_finding_class_14_with_one_pixel_box():
    gts = {"a": [(3, (10, 10, 50, 50))], "b": [], "c": []}
    preds = {"a": [(3, 0.8, (12, 10, 50, 52))], "b": [(3, 0.3, (0, 0, 5, 5))], "c": []}
    g, p = add_no_finding(gts, preds, {"a": 0.95, "b": 0.9, "c": 0.6})
    assert g["b"] == [(NO_FINDING_ID, NO_FINDING_BOX)] and g["c"] == [(NO_FINDING_ID, NO_FINDING_BOX)]
    assert all(c != NO_FINDING_ID for c, _ in g["a"])
    res = detection_map(g, p, iou_thr=0.4)
    # class 3: a TP (0.8) then b FP (0.3) -> AP 1
    assert res["per_class"][3].ap == pytest.approx(1.0)
    # class 14, by score: a 0.95 FP, b 0.9 TP, c 0.6 TP -> recall .5 at precision .5, 1 at 2/3
    assert res["per_class"][NO_FINDING_ID].tp.tolist() == [False, True, True]
    assert res["per_class"][NO_FINDING_ID].ap == pytest.approx(2 / 3)
    assert math.isnan(res["per_class"][0].ap)  # no ground truth: not in the mean
    assert res["map"] == pytest.approx((1.0 + 2 / 3) / 2)
    # ranking the normal images first gives a perfect class-14 AP
    g, p = add_no_finding(gts, preds, {"a": 0.2, "b": 0.9, "c": 0.6})
    assert detection_map(g, p)["per_class"][NO_FINDING_ID].ap == pytest.approx(1.0)


def test_map_range_uses_coco_thresholds():
    gts = {"a": [(0, G1)]}
    preds = {"a": [(0, 0.9, (0, 0, 10, 7))]}  # IoU 0.7
    r = map_range(gts, preds, classes=range(1))
    assert r["map50"] == 1.0
    assert r["by_thr"][0.7] == 1.0 and r["by_thr"][0.75] == 0.0
    assert r["map50_95"] == pytest.approx(5 / 10)  # thresholds 0.50..0.70 hit


def test_classification_metrics_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, s) == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered
    assert roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)  # tie counts one half
    m = binary_metrics(y, s, threshold=0.35)
    assert m["confusion"] == [[1, 1], [0, 2]]
    assert (m["sensitivity"], m["specificity"], m["accuracy"], m["false_negatives"]) == (1.0, 0.5, 0.75, 0)
    assert choose_threshold(y, s) == pytest.approx(0.8)  # J = 0.5 at 0.8 (first of the ties)
    assert choose_threshold(y, s, "sensitivity", 1.0) == pytest.approx(0.35)
    # DeLong by hand: V10 = [0.5, 1], V01 = [1, 0.5] -> var = 0.125/2 + 0.125/2, half width 1.96 * 0.354
    assert m["roc_auc_ci95"] == pytest.approx([0.75 - 1.959964 * 0.125**0.5, 1.0], abs=1e-6)
    assert m["sensitivity_ci95"][1] == 1.0 and 0.0 < m["specificity_ci95"][0] < 0.5 < m["specificity_ci95"][1]


def test_confidence_intervals():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan: no cases, no interval
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)]
    s = np.r_[rng.normal(0, 1, 200), rng.normal(1, 1, 200)]  # AUC ~0.76
    lo, hi = auc_interval(y, s)
    assert lo < roc_auc(y, s) < hi and hi - lo < 0.12
    lo_small, hi_small = auc_interval(y[::10], s[::10])  # 20 + 20 cases: a much wider interval
    assert hi_small - lo_small > 2 * (hi - lo)
    assert auc_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)  # perfect separation


def test_map_interval_brackets_the_map_and_is_exact_when_every_box_is_found():
    from inference.training.metrics import detection_map, map_interval

    box = (10.0, 10.0, 50.0, 50.0)
    gts = {f"i{k}": [(0, box)] for k in range(20)}
    found = {f"i{k}": [(0, 0.9, box)] for k in range(20)}
    half = {f"i{k}": [(0, 0.9, box)] if k < 10 else [] for k in range(20)}
    patients = {f"i{k}": f"p{k // 2}" for k in range(20)}
    assert map_interval(gts, found, patients, reps=200) == (1.0, 1.0)
    point = detection_map(gts, half, 0.4)["map"]
    lo, hi = map_interval(gts, half, patients, reps=200)
    assert point == pytest.approx(0.5) and 0.15 <= lo < point < hi <= 0.85
