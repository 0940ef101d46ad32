"""What the radiologist sees: the node's own results, routed by the documented Orthanc example and sent back
to it, opened in real web viewers in headless Chromium (tests/support/viewers.py).

- OHIF Viewer 3.13 (prebuilt @ohif/app, reading Orthanc's DICOMweb): the image and the Secondary Capture
  render, every box of the SR is drawn on its source image (as many as the SR has findings), and the words
  next to each box are the finding's name and probability ("Cardiomegaly 0.66"), never a code; a normal study
  and an abnormal study without a box open without an error, their whole-image region labelled with the
  study's verdict in words and the image's P(abnormal) ("AI: no abnormality" over "P(abnormal): 0.02 1"); an
  image the models could not judge is framed without a label (no code) and opens without an error.
- dwv 0.36 (loading the image and the SR files): one annotation per box.
- The same boxes and words in OHIF when the node delivers its results over STOW-RS (a ``type: dicomweb``
  destination: Orthanc's DICOMweb) instead of C-STORE.

Screenshots are kept in test-artefacts/viewers/ (README's viewer section shows them). The tiny random models
of tests/support/models.py find boxes at will (abnormal) or nothing (normal); what is checked is how the
result is shown, not the AI.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.outputs import codes as C
from inference.types import FINDING_CLASSES
from support.dicom_factory import make_cxr
from support.models import make_tiny_models
from support.node import wait_for
from support.orthanc import Orthanc
from support.viewers import Chromium, ViewerServer, missing_requirements, open_files_in_dwv, open_study_in_ohif

pytestmark = pytest.mark.slow  # web viewers in headless Chromium

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "test-artefacts" / "viewers"
TID_1501 = "1501"


@pytest.fixture(scope="module")
def chromium():
    missing = missing_requirements()
    if missing:
        pytest.fail(f"web viewers not installed: {missing} (README set-up: tests/support/fetch_viewers.sh)")
    with Chromium() as browser:
        yield browser


def sr_regions(sr: pydicom.Dataset) -> list[tuple[str, str | None, list[str]]]:
    """(finding, finding site, comments) of every measurement group of the SR (TID 1501: each has one region,
    the source of its measurement; the comments are the words OHIF writes next to it)."""
    out = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in container.ContentSequence:
            assert group.ContentTemplateSequence[0].TemplateIdentifier == TID_1501
            items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
            comments = [
                i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Comment"
            ]
            out.append(
                (
                    items["Finding"].ConceptCodeSequence[0].CodeMeaning,
                    items["Finding Site"].ConceptCodeSequence[0].CodeMeaning if "Finding Site" in items else None,
                    comments,
                )
            )
    return out


def words_next_to(labels: list[str], comment: str) -> list[str]:
    """The OHIF labels (text box lines joined by " | ") with a line that is this comment: OHIF writes each
    Comment of a group as a line "<comment>:", then each measurement as "<name>: <value> <unit>"."""
    return [label for label in labels if comment in [line.rstrip(":").strip() for line in label.split(" | ")]]


def destination(pacs: Orthanc, transport: str) -> dict:
    """Orthanc as the node's live destination of SR, SC and GSPS, over C-STORE or over STOW-RS (its DICOMweb)."""
    outputs = ("sr", "sc", "gsps")
    if transport == "stow-rs":
        return {"type": "dicomweb", "name": "pacs", "url": pacs.dicomweb_url, "outputs": list(outputs), "mode": "live"}
    assert transport == "c-store", transport
    return pacs.as_destination(outputs=outputs)


def analysed_study(
    tmp_path, node_factory, models: dict, name: str, pixels=None, transport: str = "c-store"
) -> tuple[Orthanc, str, Path, Path]:
    """A chest DX (its ``pixels`` if given) sent to Orthanc, routed to a node, analysed, results back in Orthanc
    (over ``transport``: C-STORE or STOW-RS). Returns (pacs, study uid, the image file, the SR file as Orthanc
    holds it)."""
    pacs = Orthanc(tmp_path / f"orthanc-{name}").start()
    try:
        node = node_factory(
            workers={"count": 1},
            inference={"models": models, "fusion": {"max_findings": 4}},
            studies={"stable_after_s": 1},
            destinations=[destination(pacs, transport)],
        )
        pacs.route_to_node(node.port)
        image = tmp_path / f"{name}.dcm"
        # a 35 x 43 cm (14 x 17 inch) film's shape: OHIF writes a whole-image region's words in the margin to
        # the right of the image, which a square image in a wide viewport leaves too narrow for them
        ds = make_cxr(image, rows=630, cols=512, patient_id=f"VIEWER-{name.upper()}", pixels=pixels)
        assert pacs.storescu(image).returncode == 0
        wait_for(
            lambda: (
                {m: len(pacs.instances_by_modality(ds.StudyInstanceUID, m)) for m in ("SR", "OT", "PR")}
                == {"SR": 1, "OT": 1, "PR": 1}
            ),
            240,
            interval=1,
            what="SR, SC and GSPS in the PACS",
        )
        if transport == "stow-rs":  # they came over STOW-RS, not by C-STORE
            assert node.log().count("STOW-RS to pacs: ") == 1, node.log()[-3000:]
            assert not [r for r in node.rows("SELECT state FROM deliveries") if r["state"] != "delivered"]
    except BaseException:
        pacs.kill()
        raise
    (sr,) = pacs.instances_by_modality(ds.StudyInstanceUID, "SR")
    sr_file = tmp_path / f"{name}-sr.dcm"
    sr.save_as(sr_file)
    return pacs, ds.StudyInstanceUID, image, sr_file


def analyse_and_view(
    tmp_path, node_factory, chromium, name: str, pixels=None, transport: str = "c-store", dwv: bool = True, **model_kw
) -> tuple[list, object, object]:
    """Analyse a study with tiny models made with ``model_kw``, its results delivered over ``transport``, and open it
    in OHIF and (unless not ``dwv``) dwv; returns (the SR's regions, OHIF's result, dwv's result or None).
    Screenshots are kept under test-artefacts/viewers/<name>."""
    clf, det = make_tiny_models(tmp_path / "models", **model_kw)
    pacs, study, image, sr_file = analysed_study(
        tmp_path, node_factory, {"classifier": str(clf), "detector": str(det)}, name, pixels, transport
    )
    try:
        regions = sr_regions(pydicom.dcmread(sr_file))
        with ViewerServer(pacs.url) as server:
            ohif = open_study_in_ohif(chromium, server, study, tmp_path / "ohif", hydrate=False)
            dwv_result = open_files_in_dwv(chromium, server, [image, sr_file], tmp_path / "dwv") if dwv else None
    finally:
        pacs.kill()
    keep(ohif, name)
    return regions, ohif, dwv_result


def keep(result, name: str) -> None:
    """Copy the screenshots where a person (and the README) can look at them."""
    folder = ARTEFACTS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for key, shot in result.screenshots.items():
        shutil.copy(shot, folder / f"{result.viewer}-{key}.png")


@pytest.mark.parametrize(
    ("transport", "name"),
    [("c-store", "abnormal"), ("stow-rs", "abnormal-stow-rs")],  # dwv reads files: the same either way
)
def test_ohif_and_dwv_draw_every_box_of_the_node_sr(tmp_path, node_factory, chromium, transport, name):
    regions, ohif, dwv = analyse_and_view(
        tmp_path,
        node_factory,
        chromium,
        name,
        transport=transport,
        dwv=transport == "c-store",
        p_abnormal=0.8,
        detector_logit=-0.5,
        detector_gain=1e6,
    )
    assert regions and all(finding not in ("No abnormality", "Abnormal") for finding, _, _ in regions), regions
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    assert ohif.blocked_requests == [], summary  # nothing left the machine
    assert {v.modality for v in ohif.series} >= {"DX", "OT", "SR"}, summary
    for shown in ohif.views("DX") + ohif.views("OT"):  # the image and the Secondary Capture
        assert shown.rendered, summary
    (sr,) = ohif.views("SR")
    assert sr.sr_read == sr.sr_placed == len(regions), summary  # every group found its source image
    assert sr.annotations == len(regions) and sr.shapes.get("polyline") == len(regions), summary
    # the words next to each box: the finding's name and probability, as the SC and the GSPS write them
    for finding, _site, comments in regions:
        caption = comments[-1]
        assert re.fullmatch(re.escape(finding_label_of(finding)) + r" [01]\.\d\d", caption), caption
        (label,) = words_next_to(sr.labels, caption)  # "Cardiomegaly 0.66: | Probability: 0.66 1"
        assert "Probability: " in label, summary
    assert not any("363698007" in label for label in sr.labels), summary  # no code where words belong
    if dwv is not None:
        assert dwv.page_errors == [] and dwv.annotations == len(regions), dwv.summary()


def finding_label_of(meaning: str) -> str:
    """The class name the node writes for a finding code's meaning (codes.finding_label of its class)."""
    (class_id,) = [i for i in range(len(FINDING_CLASSES)) if C.finding_code(i).meaning == meaning]
    return C.finding_label(class_id)


def test_a_normal_study_and_its_sr_open_without_error(tmp_path, node_factory, chromium):
    regions, ohif, dwv = analyse_and_view(
        tmp_path, node_factory, chromium, "normal", p_abnormal=0.02, detector_logit=-30
    )
    assert regions == [("No abnormality", "Chest", ["AI: no abnormality"])]
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    assert all(v.rendered for v in ohif.views("DX") + ohif.views("OT")), summary
    (sr,) = ohif.views("SR")
    assert sr.errors == [] and sr.annotations == 1, summary
    # the study's verdict in words beside the image, and the image's P(abnormal)
    (label,) = words_next_to(sr.labels, "AI: no abnormality")
    assert re.fullmatch(r"AI: no abnormality: \| P\(abnormal\): 0\.\d\d 1", label), summary
    assert dwv.page_errors == [] and dwv.annotations == 1, dwv.summary()


def test_an_abnormal_study_without_a_box_says_abnormal_on_the_image(tmp_path, node_factory, chromium):
    """P(abnormal) high, nothing boxed: the whole-image region carries the study's verdict ("Abnormal", "AI:
    abnormality suspected"), never "No abnormality" (issue 21: 5 of 11 real SRs said both)."""
    regions, ohif, dwv = analyse_and_view(
        tmp_path, node_factory, chromium, "abnormal-no-box", p_abnormal=0.8, detector_logit=-30
    )
    ((finding, site, comments),) = regions
    assert (finding, site, comments[-1]) == ("Abnormal", "Chest", "AI: abnormality suspected"), regions
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    (sr,) = ohif.views("SR")
    assert sr.errors == [] and sr.annotations == 1, summary
    (label,) = words_next_to(sr.labels, "AI: abnormality suspected")
    assert re.search(r"P\(abnormal\): 0\.[5-9]\d 1$", label) and "no abnormality" not in label.lower(), summary
    assert dwv.page_errors == [] and dwv.annotations == 1, dwv.summary()


def test_an_image_the_models_could_not_judge_is_framed_without_a_code(tmp_path, node_factory, chromium):
    """A blank image: the SR's "Indeterminate" region has no probability to carry words; OHIF frames the image
    without a label (no code either) and opens without an error."""
    blank = np.full((630, 512), 2048, np.uint16)
    regions, ohif, dwv = analyse_and_view(tmp_path, node_factory, chromium, "not-analysable", blank, p_abnormal=0.5)
    assert regions == [("Indeterminate", None, [])], regions
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    (sr,) = ohif.views("SR")
    assert sr.errors == [] and sr.sr_placed == 1 and sr.annotations == 1, summary
    assert sr.labels == [""], summary  # a frame without words: "363698007: Chest" no more
    assert dwv.page_errors == [], dwv.summary()
