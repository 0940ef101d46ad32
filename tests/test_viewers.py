"""What the radiologist sees: the node's own results, routed by the documented Orthanc example and sent back
to it, opened in real web viewers in headless Chromium (tests/support/viewers.py).

- OHIF Viewer 3.13 (prebuilt @ohif/app, reading Orthanc's DICOMweb): the image and the Secondary Capture
  render, every box of the SR is drawn on its source image (as many as the SR has findings), each label
  carries the finding's site and probability, and a normal study, its SR included, opens without an error.
- dwv 0.36 (loading the image and the SR files): one annotation per box.

Screenshots are kept in test-artefacts/viewers/ (README's viewer section shows them). The tiny random models
of tests/support/models.py find boxes at will (abnormal) or nothing (normal); what is checked is how the
result is shown, not the AI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from support.dicom_factory import make_cxr
from support.models import make_tiny_models
from support.node import wait_for
from support.orthanc import Orthanc
from support.viewers import Chromium, ViewerServer, missing_requirements, open_files_in_dwv, open_study_in_ohif

pytestmark = pytest.mark.slow  # web viewers in headless Chromium

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "test-artefacts" / "viewers"
TID_1410 = "1410"


@pytest.fixture(scope="module")
def chromium():
    missing = missing_requirements()
    if missing:
        pytest.fail(f"web viewers not installed: {missing} (README set-up: tests/support/fetch_viewers.sh)")
    with Chromium() as browser:
        yield browser


def sr_regions(sr: pydicom.Dataset) -> list[tuple[str, str]]:
    """(finding, finding site) of every TID 1410 measurement group of the SR (each has one image region)."""
    out = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in container.ContentSequence:
            assert group.ContentTemplateSequence[0].TemplateIdentifier == TID_1410
            items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
            out.append(
                (
                    items["Finding"].ConceptCodeSequence[0].CodeMeaning,
                    items["Finding Site"].ConceptCodeSequence[0].CodeMeaning,
                )
            )
    return out


def analysed_study(tmp_path, node_factory, models: dict, name: str) -> tuple[Orthanc, str, Path, Path]:
    """A chest DX sent to Orthanc, routed to a node, analysed, results back in Orthanc. Returns (pacs, study
    uid, the image file, the SR file as Orthanc holds it)."""
    pacs = Orthanc(tmp_path / f"orthanc-{name}").start()
    try:
        node = node_factory(
            workers={"count": 1},
            inference={"models": models, "fusion": {"max_findings": 4}},
            studies={"stable_after_s": 1},
            destinations=[pacs.as_destination(outputs=("sr", "sc", "gsps"))],
        )
        pacs.route_to_node(node.port)
        image = tmp_path / f"{name}.dcm"
        ds = make_cxr(image, rows=512, cols=512, patient_id=f"VIEWER-{name.upper()}")
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
    except BaseException:
        pacs.kill()
        raise
    (sr,) = pacs.instances_by_modality(ds.StudyInstanceUID, "SR")
    sr_file = tmp_path / f"{name}-sr.dcm"
    sr.save_as(sr_file)
    return pacs, ds.StudyInstanceUID, image, sr_file


def analyse_and_view(tmp_path, node_factory, chromium, name: str, **model_kw) -> tuple[list, object, object]:
    """Analyse a study with tiny models made with ``model_kw`` and open it in OHIF and dwv; returns (the SR's
    regions, OHIF's result, dwv's result). Screenshots are kept under test-artefacts/viewers/<name>."""
    clf, det = make_tiny_models(tmp_path / "models", **model_kw)
    pacs, study, image, sr_file = analysed_study(
        tmp_path, node_factory, {"classifier": str(clf), "detector": str(det)}, name
    )
    try:
        regions = sr_regions(pydicom.dcmread(sr_file))
        with ViewerServer(pacs.url) as server:
            ohif = open_study_in_ohif(chromium, server, study, tmp_path / "ohif", hydrate=False)
            dwv = open_files_in_dwv(chromium, server, [image, sr_file], tmp_path / "dwv")
    finally:
        pacs.kill()
    keep(ohif, name)
    return regions, ohif, dwv


def keep(result, name: str) -> None:
    """Copy the screenshots where a person (and the README) can look at them."""
    folder = ARTEFACTS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for key, shot in result.screenshots.items():
        shutil.copy(shot, folder / f"{result.viewer}-{key}.png")


def test_ohif_and_dwv_draw_every_box_of_the_node_sr(tmp_path, node_factory, chromium):
    regions, ohif, dwv = analyse_and_view(
        tmp_path, node_factory, chromium, "abnormal", p_abnormal=0.8, detector_logit=-0.5, detector_gain=1e6
    )
    assert regions and all(finding != "No abnormality" for finding, _ in regions), regions
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    assert ohif.blocked_requests == [], summary  # nothing left the machine
    assert {v.modality for v in ohif.series} >= {"DX", "OT", "SR"}, summary
    for shown in ohif.views("DX") + ohif.views("OT"):  # the image and the Secondary Capture
        assert shown.rendered, summary
    (sr,) = ohif.views("SR")
    assert sr.sr_read == sr.sr_placed == len(regions), summary  # every group found its source image
    assert sr.annotations == len(regions) and sr.shapes.get("polyline") == len(regions), summary
    # OHIF's label is the group's measurement and its finding site (it never shows the finding's own name)
    for site in {s for _, s in regions}:
        assert any(f"363698007: {site}" in label for label in sr.labels), summary
    assert all("Probability: 0." in label for label in sr.labels), summary
    assert dwv.page_errors == [] and dwv.annotations == len(regions), dwv.summary()


def test_a_normal_study_and_its_sr_open_without_error(tmp_path, node_factory, chromium):
    regions, ohif, dwv = analyse_and_view(
        tmp_path, node_factory, chromium, "normal", p_abnormal=0.02, detector_logit=-30
    )
    assert regions == [("No abnormality", "Chest")]
    summary = ohif.summary()
    assert ohif.page_errors == [] and ohif.console_errors == [], summary
    assert all(v.rendered for v in ohif.views("DX") + ohif.views("OT")), summary
    (sr,) = ohif.views("SR")
    assert sr.errors == [] and sr.annotations == 1 and sr.labels == ["363698007: Chest"], summary
    assert dwv.page_errors == [] and dwv.annotations == 1, dwv.summary()
