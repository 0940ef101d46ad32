"""Self-test of the web-viewer harness (tests/support/viewers.py) on hand-made DICOM, not on the node's outputs.

Each study is a synthetic DX chest image, a Secondary Capture of it, and a Comprehensive 3D SR (TID 1500)
made here with highdicom: per finding one TID 1410 "Planar ROI measurements" group (tracking identifier
and UID, a finding code, a qualitative evaluation, a closed 5-point POLYLINE rectangle on the DX). They are
stored in an Orthanc with its DICOMweb plugin and opened in OHIF Viewer 3 (through the harness's
same-origin proxy) and in dwv, in Debian's Chromium. The harness must see that OHIF draws one box per
finding, shows the SC and the DX, and breaks on the SRs OHIF 3.13 cannot read (a measurement group
without an image region; an SR without any measurement group), and that dwv builds one annotation per box.

Set-up (once): apt-get install -y chromium orthanc-dicomweb; pip install playwright;
bash tests/support/fetch_viewers.sh. The tests fail, saying which, when one is missing.
About 45 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from support.dicom_factory import make_cxr
from support.orthanc import DICOMWEB_PLUGIN, Orthanc
from support.viewers import Chromium, ViewerServer, missing_requirements, open_files_in_dwv, open_study_in_ohif

pytestmark = pytest.mark.slow  # the viewer harness checks itself in headless Chromium


@pytest.fixture(scope="module", autouse=True)
def _requirements():
    """The set-up installs everything these tests need (README, .ci/run): a missing piece is a failure."""
    missing = missing_requirements() or (None if DICOMWEB_PLUGIN.exists() else f"{DICOMWEB_PLUGIN} is missing")
    if missing:
        pytest.fail(f"web-viewer test requirements missing: {missing} (README set-up)")


FINDINGS = [  # (finding code, box x0, y0, x1, y1 in pixels of the 512 x 512 DX)
    (("60046008", "SCT", "Pleural effusion"), (60, 80, 200, 220)),
    (("36118008", "SCT", "Pneumothorax"), (300, 100, 450, 260)),
    (("8186001", "SCT", "Cardiomegaly"), (150, 300, 350, 450)),
]


# ------------------------------------------------------------------------------------------------ test data


def _finding_group(image: Dataset, n: int, code: tuple[str, str, str], box: tuple[int, int, int, int]):
    """TID 1410: one finding, its rectangle as a closed POLYLINE (5 points, first == last) on the image."""
    x0, y0, x1, y1 = box
    points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"finding {n}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        ),
        finding_type=hd.sr.CodedConcept(*code),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("246112005", "SCT", "Severity"),
                value=hd.sr.CodedConcept("6736007", "SCT", "Moderate"),
            )
        ],
    )


def _image_level_group():
    """TID 1501: a measurement group without any image region (an image-level finding)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="image level"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value=hd.sr.CodedConcept("17621005", "SCT", "Normal"),
            )
        ],
    )


def make_study(folder: Path, name: str, findings: list, *, image_level_first: bool = False) -> dict:
    """DX + SC + TID 1500 SR of one new patient in ``folder``; returns {study, dx, sc, sr, boxes}.

    ``findings`` empty: the SR's "Imaging Measurements" container holds no measurement group at all
    (highdicom insists on one, so the one given is removed again)."""
    folder.mkdir(parents=True, exist_ok=True)
    dx = make_cxr(folder / f"{name}-dx.dcm", rows=512, cols=512, patient_id=f"VIEWERS-{name}")
    groups = [_finding_group(dx, n, code, box) for n, (code, box) in enumerate(findings, start=1)]
    if image_level_first:
        groups.insert(0, _image_level_group())
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=generate_uid(), name="viewer-harness-test"
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept("43468-8", "LN", "XR Chest 2 Views"),
        imaging_measurements=groups or [_image_level_group()],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[dx],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="dicom-node tests",
        series_description="AI findings SR",
    )
    if not groups:
        for item in sr.ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
                del item.ContentSequence
    sr.save_as(folder / f"{name}-sr.dcm")

    pixels = (dx.pixel_array.astype(np.float64) / 4095 * 255).astype(np.uint8)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    for _code, (x0, y0, x1, y1) in findings:  # the boxes burnt in, as the node's SC does
        rgb[y0:y1, [x0, x1 - 1]] = (255, 255, 0)
        rgb[[y0, y1 - 1], x0:x1] = (255, 255, 0)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=dx,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=98,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="dicom-node tests",
        patient_orientation=("L", "F"),
        series_description="AI overlay SC",
    )
    sc.save_as(folder / f"{name}-sc.dcm")
    return {
        "study": dx.StudyInstanceUID,
        "dx": folder / f"{name}-dx.dcm",
        "sc": folder / f"{name}-sc.dcm",
        "sr": folder / f"{name}-sr.dcm",
        "findings": [code[2] for code, _box in findings],
    }


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One Orthanc (DICOMweb on) holding every study, one harness server in front of it, one Chromium."""
    root = tmp_path_factory.mktemp("viewers")
    studies = {
        "findings": make_study(root / "data", "findings", FINDINGS),
        "normal": make_study(root / "data", "normal", []),
        "image_level_first": make_study(root / "data", "image_level_first", FINDINGS[:2], image_level_first=True),
    }
    with Orthanc(root / "orthanc", route=False, dicomweb=True) as pacs:
        files = [s[k] for s in studies.values() for k in ("dx", "sc", "sr")]
        pacs.storescu(*files, check=True)
        assert pacs.count_instances() == len(files)
        with ViewerServer(pacs.url) as server, Chromium() as chromium:
            yield {"studies": studies, "server": server, "chromium": chromium, "out": root / "screens"}


def _open(env, key: str, **kwargs):
    study = env["studies"][key]
    return open_study_in_ohif(env["chromium"], env["server"], study["study"], env["out"] / key, **kwargs)


# ------------------------------------------------------------------------------------------------ tests


def test_ohif_draws_every_box_of_the_sr_and_shows_the_images(env):
    expected = env["studies"]["findings"]["findings"]
    result = _open(env, "findings")
    summary = result.summary()

    assert result.page_errors == [], summary
    assert result.console_errors == [], summary
    assert result.blocked_requests == [], summary  # nothing left the machine
    assert {v.modality for v in result.series} == {"DX", "OT", "SR"}, summary
    for image in result.views("DX") + result.views("OT"):
        assert image.rendered, f"{image.modality} series shows a black viewport\n{summary}"

    (sr,) = result.views("SR")
    # read-only SR display: one closed polyline and one (empty) text box per finding
    assert sr.annotations == len(expected), summary
    assert sr.shapes.get("polyline") == len(expected), summary
    assert sr.tools == ["DICOMSRDisplay"] * len(expected), summary
    # the finding code is not drawn on the box: OHIF's SR display labels a box only with NUM values and
    # the Finding Site; this SR has neither
    assert sr.labels == [""] * len(expected), summary

    # "Do you want to continue tracking measurements for this study?" -> Yes: editable RectangleROIs,
    # one row per finding in the Measurements panel, titled with the finding's code meaning
    assert sr.hydrate_offered, summary
    assert sr.hydrated, summary
    assert sr.hydrated_annotations == len(expected), summary
    assert sr.hydrated_tools.count("RectangleROI") == len(expected), summary
    assert sorted(sr.measurement_rows) == sorted(expected), summary
    for shot in result.screenshots.values():
        assert shot.stat().st_size > 10_000, shot


def test_ohif_opens_the_normal_study(env):
    """The study itself opens cleanly: images shown, the SR listed. Opening that SR is the next test."""
    result = _open(env, "normal", open_sr=False)
    summary = result.summary()
    assert result.page_errors == [], summary
    assert result.console_errors == [], summary
    assert result.blocked_requests == [], summary
    assert [v.modality for v in result.series] == ["DX", "OT"], summary
    assert all(v.rendered for v in result.series), summary
    assert [d["modality"] for d in result.details["display_sets"]].count("SR") == 1, summary


@pytest.mark.parametrize(
    ("key", "error"),
    [
        # a TID 1501 group (no SCOORD) anywhere in Imaging Measurements: coords[0] of that measurement is undefined
        ("image_level_first", "Cannot read properties of undefined (reading 'ReferencedSOPSequence')"),
        # no measurement group at all: the SR viewport looks for a first measurement to show
        ("normal", "Cannot destructure property 'displaySetInstanceUID' of 'measurement' as it is undefined"),
    ],
)
def test_harness_reports_the_srs_ohif_breaks_on(env, key, error):
    """OHIF 3.13 catches these in its viewer route's error boundary (logged at console.debug level, the
    viewport goes black); the harness must report them as page errors."""
    result = _open(env, key)
    (sr,) = result.views("SR")
    assert any(error in e for e in sr.errors), result.summary()
    assert any(error in e for e in result.page_errors), result.summary()
    assert sr.annotations == 0 and not sr.rendered, result.summary()


def test_dwv_builds_and_draws_every_box(env):
    study = env["studies"]["findings"]
    result = open_files_in_dwv(env["chromium"], env["server"], [study["dx"], study["sr"]], env["out"] / "dwv")
    summary = result.summary()
    assert result.page_errors == [] and result.console_errors == [], summary
    (sr,) = [d for d in result.details["data"] if d["modality"] == "SR"]
    assert sr["annotations"] == len(study["findings"]), sr
    assert result.annotations == len(study["findings"]), sr
    assert sr["shapes"] == ["rectangle"] * len(study["findings"]), sr  # the 5-point polyline became a rectangle
    assert sorted(item["meta"]["Finding"] for item in sr["items"]) == sorted(study["findings"]), sr


def test_dwv_ignores_an_sr_whose_first_group_has_no_region(env):
    """dwv 0.36 decides from the FIRST measurement group whether an SR is an annotation it supports."""
    study = env["studies"]["image_level_first"]
    result = open_files_in_dwv(env["chromium"], env["server"], [study["dx"], study["sr"]], env["out"] / "dwv-1501")
    (sr,) = [d for d in result.details["data"] if d["modality"] == "SR"]
    assert sr["annotations"] is None and result.annotations == 0, sr
    assert "Not a dwv supported annotation" in sr["warn"], sr
