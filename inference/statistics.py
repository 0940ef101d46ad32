"""Classification statistics shared by training, ``evaluate``, ``calibrate`` and the running node's site validation
(numpy only; nothing here imports training code): ROC AUC (Mann-Whitney) with its DeLong 95 % interval, the ROC
curve, Wilson 95 % intervals of proportions, the metrics of a binary decision at a threshold, and the one-line
form in which ``evaluate`` and ``validate`` print them (:func:`classifier_line`)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "Z_95",
    "roc_auc",
    "roc_curve",
    "wilson_interval",
    "auc_interval",
    "binary_metrics",
    "classifier_line",
    "format_ci",
    "format_number",
]


def roc_auc(y_true, scores) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half); nan with one class only."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when score >= threshold; starts at (0, 0)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thr = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.array([0.0] + [float((s[y] >= t).sum()) / n_pos for t in thr])
    fpr = np.array([0.0] + [float((s[~y] >= t).sum()) / n_neg for t in thr])
    return fpr, tpr, np.concatenate(([np.inf], thr))


Z_95 = 1.959963984540054  # two-sided 95 %


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (sensitivity, specificity); (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def auc_interval(y_true, scores, z: float = Z_95) -> tuple[float, float]:
    """95 % interval of the ROC AUC by DeLong's variance (DeLong et al. 1988); (nan, nan) with one class or
    fewer than two of either."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) < 2 or len(neg) < 2:
        return float("nan"), float("nan")
    psi = (pos[:, None] > neg[None, :]).astype(np.float64) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    var = psi.mean(axis=1).var(ddof=1) / len(pos) + psi.mean(axis=0).var(ddof=1) / len(neg)
    half = z * float(np.sqrt(var))
    return max(0.0, auc - half), min(1.0, auc + half)


def binary_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """Accuracy, sensitivity, specificity (with 95 % Wilson intervals), PPV, NPV, ROC AUC (with its 95 % DeLong
    interval), FN count, confusion [[TN, FP], [FN, TP]]."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    fp, tn = int((pred & ~y).sum()), int((~pred & ~y).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": ratio(tp, tp + fn),
        "sensitivity_ci95": list(wilson_interval(tp, tp + fn)),
        "specificity": ratio(tn, tn + fp),
        "specificity_ci95": list(wilson_interval(tn, tn + fp)),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "roc_auc": roc_auc(y, s),
        "roc_auc_ci95": list(auc_interval(y, s)),
        "false_negatives": fn,
        "false_positives": fp,
        "confusion": [[tn, fp], [fn, tp]],
    }


def format_ci(v) -> str:
    return f"[{v[0]:.3f}-{v[1]:.3f}]" if v and None not in v else "[n/a]"


def format_number(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def classifier_line(name: str, m: dict) -> str:
    """``NAME: n 40 (20 abnormal), AUC 0.712 [0.548-0.876], sensitivity ... [..], specificity ... [..]``: what
    ``evaluate`` and ``validate`` print for a set of films (the same numbers give the same line)."""
    return (
        f"{name}: n {m['n']} ({m['positives']} abnormal), "
        f"AUC {format_number(m['roc_auc'])} {format_ci(m['roc_auc_ci95'])}, "
        f"sensitivity {format_number(m['sensitivity'])} {format_ci(m['sensitivity_ci95'])}, "
        f"specificity {format_number(m['specificity'])} {format_ci(m['specificity_ci95'])}"
    )
