"""The words an output shows a reader on the image: the disclaimer and the one-line summary of a prediction.

Burned into the Secondary Capture's banner and bar, and written as the GSPS's top-left text object.
"""

from __future__ import annotations

from inference.types import Prediction

__all__ = ["BANNER_TEXT", "summary_text"]

BANNER_TEXT = "AI result - not for primary diagnosis"


def summary_text(prediction: Prediction) -> str:
    if prediction.not_analysable:
        return f"Not analysable: {prediction.not_analysable}"
    n = len(prediction.findings)
    if prediction.abnormal:
        return f"Abnormal (p={1.0 - prediction.p_no_finding:.2f}), {n} finding{'s' if n != 1 else ''}"
    return f"No finding (p={prediction.p_no_finding:.2f})"
