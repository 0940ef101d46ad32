"""Every output of a study states the same verdict, findings and priority (issue 21, "outputs that agree").

For four studies (abnormal with boxes, abnormal without a box, normal, an image the models cannot judge), each
routine and urgent, the StudyVerdict (dicom_node.outputs.verdict) is compared with what each output says:

- the SR: its Qualitative Evaluations (finding code, priority code, statement) and every region it draws (finding,
  tracking identifier, the comments viewers show next to it);
- the SC: the banner and the summary line burned in (captions.banner_text and summary_text, what
  sc.render_overlay writes) and its Image Comments (the priority);
- the GSPS: its text objects (the banner and summary, and one "<label> <score>" per box).

Words that would contradict the verdict ("No abnormality" in an abnormal study, "Abnormal" in a normal one, a
probability for a study no image of which was judged) must appear nowhere.

The notification channels (HL7 ORU, FHIR Bundle, webhook) join the comparison through ``CHANNELS`` below: each is
a function from the study (its sources, predictions and verdict) to the texts and codes it states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.outputs import codes as C
from dicom_node.outputs.captions import banner_text, finding_caption, summary_text
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.sc import build_sc
from dicom_node.outputs.sr import build_sr
from dicom_node.outputs.verdict import (
    ABNORMAL,
    NO_ABNORMALITY,
    NOT_ANALYSABLE,
    ROUTINE,
    URGENT,
    StudyVerdict,
    study_verdict,
)
from inference.types import FINDING_CLASSES, Finding, Prediction
from support.dicom_factory import make_cxr
from support.provenance import IDENTITY, MODELS

ROWS, COLS = 256, 200


def _finding(class_id: int, score: float, box) -> Finding:
    return Finding(class_id, FINDING_CLASSES[class_id], score, tuple(float(v) for v in box), score)


def _prediction(p_no_finding: float, findings=()) -> Prediction:
    return Prediction(1 - p_no_finding, p_no_finding, tuple(findings), "soft", MODELS, (ROWS, COLS))


STUDIES = {
    "abnormal with boxes": _prediction(
        0.09,
        [_finding(12, 0.91, (20, 30, 90, 150)), _finding(3, 0.66, (60, 120, 150, 220))],
    ),
    "abnormal without a box": _prediction(0.15),  # P(abnormal) 0.85, no finding above its floor
    "normal": _prediction(0.93),
    "not analysable": Prediction.unanalysable("blank or nearly constant image", "soft", MODELS, (ROWS, COLS)),
}
EXPECTED = {
    "abnormal with boxes": ABNORMAL,
    "abnormal without a box": ABNORMAL,
    "normal": NO_ABNORMALITY,
    "not analysable": NOT_ANALYSABLE,
}
# Words that state the opposite verdict
CONTRADICTIONS = {
    ABNORMAL: ("No abnormality", "no abnormality", "not analysable", "Not analysable", "Indeterminate"),
    NO_ABNORMALITY: ("Abnormal", "abnormality suspected", "not analysable", "Not analysable", "Indeterminate"),
    NOT_ANALYSABLE: ("Abnormal", "abnormality suspected", "No abnormality", "no abnormality", "P(abnormal)"),
}
URGENT_REASONS = ("Pneumothorax 0.91 >= 0.50",)


@dataclass
class Study:
    source: pydicom.Dataset
    prediction: Prediction
    verdict: StudyVerdict


@dataclass
class Said:
    """What one output states: its verdict words (texts a person reads) and codes (what a machine reads)."""

    texts: list[str]
    codes: list[str] = dataclasses.field(default_factory=list)  # code meanings
    priority: str | None = None  # "urgent" / "routine" where the output states one


def _items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _meaning(item, attr="ConceptNameCodeSequence") -> str:
    return item[attr][0].CodeMeaning


def _sr_says(study: Study, tmp_path) -> Said:
    sr = build_sr(
        [(study.source, study.prediction)],
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        series_number=9001,
        instance_number=1,
        identity=IDENTITY,
        priority=study.verdict.priority,
        priority_reasons=study.verdict.priority_reasons,
    )
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    (evaluations,) = [i for i in sr.ContentSequence if _meaning(i) == "Qualitative Evaluations"]
    ev = {_meaning(i): i for i in evaluations.ContentSequence}
    verdict = study.verdict
    # the study level: the verdict's code and its statement, the priority coded when urgent
    assert _meaning(ev["Finding"], "ConceptCodeSequence") == C.verdict_code(verdict.verdict).meaning
    assert ev["Comment"].TextValue == verdict.statement
    priority = URGENT if "Priority" in ev and _meaning(ev["Priority"], "ConceptCodeSequence") == "Urgent" else ROUTINE
    said = Said([ev["Comment"].TextValue], [_meaning(ev["Finding"], "ConceptCodeSequence")], priority)
    # every region: a box says its finding and score; a whole image says the study's verdict, in its finding,
    # its tracking identifier and its comment; an image not judged says so
    (measurements,) = [i for i in sr.ContentSequence if _meaning(i) == "Imaging Measurements"]
    groups = list(measurements.ContentSequence)
    assert groups, "every SR has a region to draw"
    boxes = sorted(study.prediction.findings, key=lambda f: -f.score)
    for n, group in enumerate(groups):
        items = list(group.ContentSequence)
        finding = [_meaning(i, "ConceptCodeSequence") for i in items if _meaning(i) == "Finding"]
        tracking = [i.TextValue for i in items if _meaning(i) == "Tracking Identifier"]
        comments = [i.TextValue for i in items if _meaning(i) == "Comment"]
        assert len(finding) == len(tracking) == 1
        if n < len(boxes):  # a box
            f = boxes[n]
            assert finding == [C.finding_code(f.class_id).meaning] and comments and comments[-1] == finding_caption(f)
            assert verdict.verdict == ABNORMAL
            if verdict.urgent and n == 0:
                assert comments[0] == "URGENT"
        elif study.prediction.not_analysable:
            label = f"AI: not analysable ({study.prediction.not_analysable})"
            assert finding == ["Indeterminate"] and tracking == [label] and comments == []  # nothing to say on it
        else:  # the study's own verdict on the whole image: its statement, and in a few words beside the image
            assert finding == [C.verdict_code(verdict.verdict).meaning] and tracking == [verdict.statement]
            assert comments == (["URGENT"] if verdict.urgent else []) + [verdict.label]
        said.texts += tracking + comments
        said.codes += finding
    return said


def _sc_says(study: Study, tmp_path) -> Said:
    sc = build_sc(
        study.source,
        np.full((ROWS, COLS), 0.5, np.float32),
        study.prediction,
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        series_number=9002,
        instance_number=1,
        identity=IDENTITY,
        priority=study.verdict.priority,
        priority_reasons=study.verdict.priority_reasons,
    )
    # burned in: the summary below the image (summary_text, as sc.render_overlay writes it) and the banner; the
    # header says an urgent study's priority in Image Comments
    comment = str(sc.get("ImageComments", ""))
    texts = [summary_text(study.prediction), banner_text(study.verdict.priority, study.verdict.priority_reasons)]
    return Said(texts + ([comment] if comment else []), priority=URGENT if comment.startswith("URGENT") else ROUTINE)


def _gsps_says(study: Study, tmp_path) -> Said:
    pr = build_gsps(
        study.source,
        study.prediction,
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        series_number=9003,
        instance_number=1,
        identity=IDENTITY,
        priority=study.verdict.priority,
        priority_reasons=study.verdict.priority_reasons,
    )
    texts = [t.UnformattedTextValue for a in pr.GraphicAnnotationSequence for t in a.TextObjectSequence]
    boxes = {finding_caption(f) for f in study.prediction.findings}
    assert boxes <= set(texts)  # each box's label, as the SR's region comment says it
    (summary,) = [t for t in texts if t not in boxes]
    assert summary.endswith(summary_text(study.prediction))
    return Said([summary], priority=URGENT if summary.startswith("URGENT") else ROUTINE)


# The notification channels (HL7 ORU^R01, FHIR Bundle, webhook JSON) add their own function here: from the study
# to what the message states (its texts, its codes, its priority), built as the channel builds it.
CHANNELS: dict[str, Callable[[Study, object], Said]] = {
    "SR": _sr_says,
    "SC": _sc_says,
    "GSPS": _gsps_says,
}


@pytest.mark.parametrize("priority", [ROUTINE, URGENT])
@pytest.mark.parametrize("name", list(STUDIES))
def test_every_output_states_the_same_verdict(tmp_path, name, priority):
    prediction = STUDIES[name]
    source = make_cxr(rows=ROWS, cols=COLS)
    reasons = URGENT_REASONS if priority == URGENT else ()
    verdict = study_verdict([(source.SOPInstanceUID, prediction)], priority, reasons)
    assert verdict.verdict == EXPECTED[name] and verdict.priority == priority
    assert [(f.name, f.probability, f.sop_instance_uid) for f in verdict.findings] == [
        (f.label, f.score, source.SOPInstanceUID) for f in sorted(prediction.findings, key=lambda f: -f.score)
    ]
    study = Study(source, prediction, verdict)
    for channel, says in CHANNELS.items():
        said = says(study, tmp_path)
        everything = " | ".join(said.texts + said.codes)
        # says the verdict, in its words ...
        assert any(verdict.headline.lower() in t.lower() or verdict.ai_verdict in t for t in said.texts), (
            channel,
            everything,
        )
        # ... and nothing that contradicts it
        for word in CONTRADICTIONS[verdict.verdict]:
            assert word not in everything, (channel, word, everything)
        if said.priority is not None:
            assert said.priority == priority, (channel, everything)
        if priority == URGENT:  # and says why
            assert any(t.startswith("URGENT") and URGENT_REASONS[0] in t for t in said.texts), (channel, everything)
        else:
            assert "URGENT" not in everything, (channel, everything)


def test_the_verdict_of_a_study_with_several_images():
    """The most suspicious judged image decides; images not judged are named with their reason."""
    a, b, c = "1.2.3.1", "1.2.3.2", "1.2.3.3"
    verdict = study_verdict(
        [
            (a, STUDIES["normal"]),
            (b, STUDIES["abnormal with boxes"]),
            (c, STUDIES["not analysable"]),
        ]
    )
    assert verdict.verdict == ABNORMAL and verdict.p_abnormal == pytest.approx(0.91)
    assert [f.sop_instance_uid for f in verdict.findings] == [b, b]
    assert [(u.sop_instance_uid, u.reason) for u in verdict.unjudged] == [(c, "blank or nearly constant image")]
    assert verdict.statement == (
        "AI: abnormality suspected, P(abnormal) = 0.91, operating point 0.50; 2 findings marked; "
        "1 of 3 images not analysable (blank or nearly constant image)"
    )
    assert verdict.to_json()["findings"][0]["name"] == "Pneumothorax"
    with pytest.raises(ValueError):
        study_verdict([STUDIES["normal"]], priority="stat")
