"""The one study-level summary every output states: the SR, the SC and GSPS captions, and the messages to people
and worklists (HL7, FHIR, webhooks) are all built from a :class:`StudyVerdict`, so that they cannot disagree.

``study_verdict(images, priority=..., reasons=...)`` takes a study's predictions (with the SOP Instance UID of
each image where the caller has it) and says:

- ``verdict``: ``"abnormal"`` (an image has a box, or its P(abnormal) reaches the operating point),
  ``"no abnormality"``, or ``"not analysable"`` (no image could be judged);
- ``p_abnormal``: the most suspicious judged image's P(abnormal) = 1 - P(no finding); None when none was judged;
- ``findings``: every box (name, probability, image, box), strongest first;
- ``unjudged``: the images the models could not judge, with the reason;
- ``priority``: ``"urgent"`` or ``"routine"`` with its reasons (computed by the caller from the site's rules);
- ``statement``: the sentence the SR states, e.g. "AI: abnormality suspected, P(abnormal) = 0.85, operating
  point 0.50; 2 findings marked", with "URGENT (reasons): " in front for an urgent study; ``headline`` ("Abnormal",
  "No abnormality", "Not analysable": what the SC and GSPS summaries start with) and ``label`` ("AI: no
  abnormality": the SR's words beside the image in a viewer) say the verdict in fewer words.

Plain Python (no DICOM), so that any output or channel can use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dicom_node.errors import EncodingError
from inference.types import ABNORMAL_OPERATING_POINT, Prediction

__all__ = [
    "ABNORMAL",
    "HEADLINES",
    "NO_ABNORMALITY",
    "NOT_ANALYSABLE",
    "PRIORITIES",
    "ROUTINE",
    "URGENT",
    "StudyVerdict",
    "UnjudgedImage",
    "VerdictFinding",
    "image_verdict",
    "study_verdict",
]

ABNORMAL = "abnormal"
NO_ABNORMALITY = "no abnormality"
NOT_ANALYSABLE = "not analysable"
URGENT = "urgent"
ROUTINE = "routine"
PRIORITIES = (URGENT, ROUTINE)
# The words each output shows for a verdict (SR finding meaning aside: the SR uses the codes of codes.py).
HEADLINES = {ABNORMAL: "Abnormal", NO_ABNORMALITY: "No abnormality", NOT_ANALYSABLE: "Not analysable"}


@dataclass(frozen=True)
class VerdictFinding:
    """One box the AI marked."""

    name: str  # the class name, e.g. "Cardiomegaly"
    class_id: int  # 0-13 (inference.types.FINDING_CLASSES)
    probability: float  # the fused score in [0, 1]
    sop_instance_uid: str  # the image it is on ("" when the caller gave none)
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in that image's pixels


@dataclass(frozen=True)
class UnjudgedImage:
    """An image the models could not judge, and why."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class StudyVerdict:
    verdict: str  # ABNORMAL, NO_ABNORMALITY or NOT_ANALYSABLE
    p_abnormal: float | None  # None when no image could be judged
    findings: tuple[VerdictFinding, ...]  # strongest first
    unjudged: tuple[UnjudgedImage, ...]
    images: int  # images in the study's result, judged or not
    priority: str = ROUTINE  # URGENT or ROUTINE
    priority_reasons: tuple[str, ...] = ()
    operating_point: float = ABNORMAL_OPERATING_POINT

    @property
    def urgent(self) -> bool:
        return self.priority == URGENT

    @property
    def abnormal(self) -> bool:
        return self.verdict == ABNORMAL

    @property
    def headline(self) -> str:
        """ "Abnormal", "No abnormality" or "Not analysable"."""
        return HEADLINES[self.verdict]

    @property
    def ai_statement(self) -> str:
        """What the AI did, without the priority: "AI: no abnormality detected, P(abnormal) = 0.12, operating
        point 0.50", "...; 2 findings marked", "...; 1 of 2 images not analysable (reason)", or "AI: no result,
        1 of 1 image not analysable (reason)"."""
        unjudged = ""
        if self.unjudged:
            reasons = "; ".join(sorted({u.reason for u in self.unjudged}))
            images = f"image{'s' if self.images != 1 else ''}"
            unjudged = f"{len(self.unjudged)} of {self.images} {images} not analysable ({reasons})"
        if self.p_abnormal is None:
            return f"{self.ai_verdict}, {unjudged}"
        n = len(self.findings)
        where = f"; {n} finding{'s' if n != 1 else ''} marked" if n else ""
        statement = (
            f"{self.ai_verdict}, P(abnormal) = {self.p_abnormal:.2f}, operating point {self.operating_point:.2f}{where}"
        )
        return statement + (f"; {unjudged}" if unjudged else "")

    @property
    def ai_verdict(self) -> str:
        """The statement's first words: "AI: abnormality suspected", "AI: no abnormality detected" or "AI: no
        result"."""
        return {
            ABNORMAL: "AI: abnormality suspected",
            NO_ABNORMALITY: "AI: no abnormality detected",
            NOT_ANALYSABLE: "AI: no result",
        }[self.verdict]

    @property
    def label(self) -> str:
        """The verdict in a few words, for a label beside the image: "AI: abnormality suspected", "AI: no
        abnormality", "AI: no result"; "URGENT" leads an urgent study's labels (:attr:`flag`)."""
        return {
            ABNORMAL: "AI: abnormality suspected",
            NO_ABNORMALITY: "AI: no abnormality",
            NOT_ANALYSABLE: "AI: no result",
        }[self.verdict]

    @property
    def flag(self) -> str:
        """ "URGENT" for an urgent study, "" for a routine one (the short form of :attr:`priority_text`)."""
        return "URGENT" if self.urgent else ""

    @property
    def priority_text(self) -> str:
        """ "URGENT (pneumothorax 0.91 >= 0.50)" for an urgent study, "" for a routine one."""
        if not self.urgent:
            return ""
        return "URGENT" + (f" ({'; '.join(self.priority_reasons)})" if self.priority_reasons else "")

    @property
    def statement(self) -> str:
        """The sentence every output states: the AI statement, after "URGENT (reasons): " when urgent."""
        return f"{self.priority_text}: {self.ai_statement}" if self.urgent else self.ai_statement

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "headline": self.headline,
            "p_abnormal": None if self.p_abnormal is None else round(self.p_abnormal, 4),
            "operating_point": self.operating_point,
            "findings": [
                {
                    "name": f.name,
                    "class_id": f.class_id,
                    "probability": round(f.probability, 4),
                    "sop_instance_uid": f.sop_instance_uid,
                    "box": [round(v, 1) for v in f.box],
                }
                for f in self.findings
            ],
            "unjudged": [{"sop_instance_uid": u.sop_instance_uid, "reason": u.reason} for u in self.unjudged],
            "images": self.images,
            "priority": self.priority,
            "priority_reasons": list(self.priority_reasons),
            "statement": self.statement,
        }


def _p_abnormal(p: Prediction) -> float:
    value = 1.0 - float(p.p_no_finding)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise EncodingError(f"P(abnormal) {value!r} is outside [0, 1]")
    return value


def image_verdict(prediction: Prediction) -> str:
    """One image's own verdict: ABNORMAL, NO_ABNORMALITY or NOT_ANALYSABLE (what its SC and GSPS say)."""
    if prediction.not_analysable:
        return NOT_ANALYSABLE
    return ABNORMAL if prediction.abnormal else NO_ABNORMALITY


def study_verdict(
    images: Iterable[Prediction | tuple[str, Prediction]],
    priority: str = ROUTINE,
    reasons: Sequence[str] = (),
) -> StudyVerdict:
    """The study's verdict from its images' predictions: each a :class:`Prediction`, or a (SOP Instance UID,
    Prediction) pair so that findings and unjudged images name their image. ``priority`` ("urgent" or
    "routine") and its ``reasons`` are the caller's (the site's priority rules). Raises :class:`EncodingError`
    on a probability outside [0, 1] and :class:`ValueError` on an unknown priority."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    pairs = [item if isinstance(item, tuple) else ("", item) for item in images]
    if not pairs:
        raise EncodingError("a study verdict needs at least one image")
    judged = [(uid, p) for uid, p in pairs if not p.not_analysable]
    unjudged = tuple(UnjudgedImage(str(uid), p.not_analysable) for uid, p in pairs if p.not_analysable)
    findings = tuple(
        sorted(
            (
                VerdictFinding(
                    f.label,
                    int(f.class_id),
                    float(f.score),
                    str(uid),
                    (float(f.box[0]), float(f.box[1]), float(f.box[2]), float(f.box[3])),
                )
                for uid, p in judged
                for f in p.findings
            ),
            key=lambda f: -f.probability,
        )
    )
    if not judged:
        verdict, p_abnormal = NOT_ANALYSABLE, None
    else:
        p_abnormal = max(_p_abnormal(p) for _, p in judged)
        verdict = ABNORMAL if any(p.abnormal for _, p in judged) else NO_ABNORMALITY
    return StudyVerdict(
        verdict=verdict,
        p_abnormal=p_abnormal,
        findings=findings,
        unjudged=unjudged,
        images=len(pairs),
        priority=priority,
        priority_reasons=tuple(str(r) for r in reasons),
    )
