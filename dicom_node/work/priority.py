"""Study priority (triage): ``urgent`` or ``routine``, and why.

A study is urgent when (``priority`` in config.yaml)

- one of its findings reaches the score floor of its class (``priority.findings``, e.g. Pneumothorax 0.5),
- its P(abnormal) (as the SR states it: 1 - P(no finding), the highest of its images) reaches
  ``priority.p_abnormal`` (off by default), or
- its sender asked for it and ``priority.sender_request`` is on: C-STORE Priority HIGH, or Requested Procedure
  Priority STAT in the header (top level or in the Request Attributes Sequence), read at ingest.

A study the sender asked for is queued urgent, so it is analysed before routine ones; after the analysis the
rules give the study's final priority, which orders its deliveries and is stated in the outputs (SC banner, GSPS
text, SR) and the console. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dicom_node.config import PriorityConfig
from inference.types import Prediction
from storage.states import QueuePriority

__all__ = ["ROUTINE", "URGENT", "Priority", "study_priority"]

URGENT = "urgent"
ROUTINE = "routine"


@dataclass(frozen=True)
class Priority:
    level: str  # URGENT or ROUTINE
    reasons: tuple[str, ...] = ()  # why urgent, strongest first: "suspected Pneumothorax (0.72)", ...

    @property
    def urgent(self) -> bool:
        return self.level == URGENT

    @property
    def queue(self) -> QueuePriority:
        """Its place in the job and delivery queues (storage)."""
        return QueuePriority.URGENT if self.urgent else QueuePriority.ROUTINE

    def text(self) -> str:
        """``urgent: suspected Pneumothorax (0.72); sender priority STAT`` or ``routine``."""
        return f"{self.level}: {'; '.join(self.reasons)}" if self.reasons else self.level


def study_priority(rules: PriorityConfig, predictions: Iterable[Prediction], requested: str = "") -> Priority:
    """The priority of a study from its images' predictions and what its sender requested (``requested``: the
    request as stored at ingest, e.g. "STAT" or "HIGH"; "" = none). Images the models could not judge count
    for nothing."""
    strongest: dict[str, float] = {}
    p_abnormal: float | None = None
    for p in predictions:
        if p.not_analysable:
            continue
        for f in p.findings:
            floor = rules.findings.get(f.label)
            if floor is not None and f.score >= floor:
                strongest[f.label] = max(strongest.get(f.label, 0.0), float(f.score))
        p_abn = 1.0 - float(p.p_no_finding)
        if math.isfinite(p_abn):
            p_abnormal = p_abn if p_abnormal is None else max(p_abnormal, p_abn)
    reasons = [f"suspected {label} ({score:.2f})" for label, score in sorted(strongest.items(), key=lambda x: -x[1])]
    if rules.p_abnormal is not None and p_abnormal is not None and p_abnormal >= rules.p_abnormal:
        reasons.append(f"P(abnormal) {p_abnormal:.2f}")
    if requested and rules.sender_request:
        reasons.append(f"sender priority {requested}")
    return Priority(URGENT if reasons else ROUTINE, tuple(reasons))
