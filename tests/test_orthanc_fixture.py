"""Self-test of the Orthanc PACS fixture (tests/support/orthanc.py) and of the documented routing plugin.

A dcmtk storescp stands in for the AI node. Orthanc runs the example from docs/orthanc/: when a study is
stable, its CR/DX chest images go to the node in one store job; anything else stays; what the node sends
back is never routed; a job that fails is retried until it succeeds. Negative checks need no sleep: the
plugin logs "nothing to route" when it has looked at a study and sent nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import wait_for
from support.orthanc import DICOMWEB_PLUGIN, DOCS_CONFIG, DOCS_PLUGIN, NODE_MODALITY, PYTHON_PLUGIN, Orthanc

pytestmark = pytest.mark.slow  # the Orthanc fixture checks itself

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def node_standin(tmp_path):
    """dcmtk storescp as a stand-in for the node: writes what Orthanc routes to it."""
    scp = DcmtkStoreSCP(tmp_path / "scp", aet="DICOM_NODE").start()
    yield scp
    scp.stop()


@pytest.fixture
def orthanc_factory(tmp_path):
    started: list[Orthanc] = []

    def make(**kwargs) -> Orthanc:
        pacs = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(pacs)
        return pacs.start()

    yield make
    for pacs in started:
        pacs.kill()


def test_docs_config_matches_the_node_defaults():
    docs = json.loads(DOCS_CONFIG.read_text())
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    node = config["node"]
    assert docs["DicomModalities"][NODE_MODALITY] == [node["ae_title"], "127.0.0.1", node["port"]]
    # the node's default destination is this example PACS
    (dest,) = config["destinations"]
    assert (dest["ae_title"], dest["host"], dest["port"]) == (docs["DicomAet"], "127.0.0.1", docs["DicomPort"])
    # ports that do not clash with Debian's own Orthanc service, storage outside the repository
    assert docs["DicomPort"] != 4242 and docs["HttpPort"] != 8042
    for key in ("StorageDirectory", "IndexDirectory"):
        assert Path(docs[key]).is_absolute() and REPO not in Path(docs[key]).parents
    assert docs["Plugins"] == [str(DICOMWEB_PLUGIN), str(PYTHON_PLUGIN)] and docs["DicomWeb"]["Enable"] is True
    # Orthanc's Python plugin reads the script relative to its working directory: the repository (README)
    assert (REPO / docs["PythonScript"]) == DOCS_PLUGIN and "LuaScripts" not in docs
    assert docs["RemoteAccessAllowed"] is False
    assert docs["DicomAlwaysAllowStore"] is True and docs["UnknownSopClassAccepted"] is True
    assert docs["SaveJobs"] is True and docs["JobsHistorySize"] >= 100  # failed jobs stay to be retried
    # the docs ship the safe setting; the fixture only flips the switches and shortens the retry delays
    routing = docs["DicomNodeRouting"]
    assert routing["SkipNodeOutputs"] is True and routing["RouteEverything"] is False


def nothing_routed(pacs: Orthanc, study_uid: str) -> bool:
    study_id = pacs.find_study(study_uid)
    return study_id is not None and f"study {study_id}: nothing to route" in pacs.log()


def test_routes_chest_only_and_keeps_data_over_restart(tmp_path, node_standin, orthanc_factory):
    pacs = orthanc_factory(node_aet=node_standin.aet, node_port=node_standin.port)
    assert pacs.system()["DicomAet"] == "ORTHANC" and pacs.system()["DicomPort"] == pacs.port
    assert pacs.echoscu()
    hand = make_cxr(tmp_path / "hand.dcm", modality="CR", body_part="HAND", patient_id="HAND-1")
    chest = make_cxr(tmp_path / "chest.dcm", modality="CR")

    assert pacs.storescu(tmp_path / "hand.dcm").returncode == 0
    assert pacs.storescu(tmp_path / "chest.dcm").returncode == 0
    got = wait_for(lambda: node_standin.dataset(chest.SOPInstanceUID), 30, what="chest CR routed to the node")
    assert got.StudyInstanceUID == chest.StudyInstanceUID and got.Modality == "CR"
    wait_for(lambda: nothing_routed(pacs, hand.StudyInstanceUID), 30, what="the hand study looked at")
    assert node_standin.received_uids() == {chest.SOPInstanceUID}  # the hand stayed in the PACS

    study_id = pacs.find_study(chest.StudyInstanceUID)
    assert study_id in pacs.studies() and pacs.find_study(hand.StudyInstanceUID) not in (None, study_id)
    assert pacs.find_study("1.2.3.4.5.6.7.8.9") is None
    instances = pacs.study_instances(study_id)
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in instances] == [chest.SOPInstanceUID]
    series = pacs.series_of_study(chest.StudyInstanceUID)
    assert [(s["Modality"], s["SeriesInstanceUID"], len(s["instances"])) for s in series] == [
        ("CR", chest.SeriesInstanceUID, 1)
    ]
    [ds] = pacs.instances_by_modality(chest.StudyInstanceUID, "CR")
    assert ds.SOPInstanceUID == chest.SOPInstanceUID and ds.pixel_array.shape == (256, 256)
    assert pacs.instances_by_modality(chest.StudyInstanceUID, "SR") == []
    assert pacs.count_instances() == 2
    assert "image(s) to the AI node, job" in pacs.log()
    wait_for(lambda: "delivered to the AI node" in pacs.log(), 30, what="the job's success noticed")

    ports = (pacs.port, pacs.http_port)
    pacs.restart()
    assert (pacs.port, pacs.http_port) == ports
    assert pacs.count_instances() == 2 and pacs.find_study(chest.StudyInstanceUID) == study_id
    assert pacs.instance_dataset(instances[0]["ID"]).SOPInstanceUID == chest.SOPInstanceUID


def test_node_outputs_are_not_routed_back(tmp_path, node_standin, orthanc_factory):
    pacs = orthanc_factory(node_aet=node_standin.aet, node_port=node_standin.port)
    result = make_cxr(tmp_path / "from-node.dcm", modality="DX")  # chest DX that the node "sent"
    sentinel = make_cxr(tmp_path / "sentinel.dcm", modality="DX", body_part=None)  # no body part: routed
    assert pacs.storescu(tmp_path / "from-node.dcm", calling=node_standin.aet).returncode == 0
    assert pacs.storescu(tmp_path / "sentinel.dcm").returncode == 0
    wait_for(lambda: node_standin.dataset(sentinel.SOPInstanceUID), 30, what="sentinel routed")
    wait_for(lambda: nothing_routed(pacs, result.StudyInstanceUID), 30, what="the node's output looked at")
    assert node_standin.received_uids() == {sentinel.SOPInstanceUID}
    assert pacs.find_study(result.StudyInstanceUID) is not None  # stored, just not routed


def test_route_everything_without_loop_protection(tmp_path, node_standin, orthanc_factory):
    """The mode that lets end-to-end tests check the node's own loop protection."""
    pacs = orthanc_factory(
        node_aet=node_standin.aet, node_port=node_standin.port, route_everything=True, skip_node_outputs=False
    )
    hand = make_cxr(tmp_path / "hand.dcm", modality="CR", body_part="HAND")
    assert pacs.storescu(tmp_path / "hand.dcm", calling=node_standin.aet).returncode == 0
    wait_for(lambda: node_standin.dataset(hand.SOPInstanceUID), 30, what="node's own hand image routed back")
    assert [j["Type"] for j in pacs.jobs()] == ["DicomModalityStore"]  # the routing job


def test_no_routing_when_disabled(tmp_path, node_standin, orthanc_factory):
    pacs = orthanc_factory(node_aet=node_standin.aet, node_port=node_standin.port, route=False)
    chest = make_cxr(tmp_path / "chest.dcm", modality="CR")
    assert pacs.storescu(tmp_path / "chest.dcm").returncode == 0
    assert pacs.find_study(chest.StudyInstanceUID) is not None
    assert pacs.jobs() == [] and node_standin.received_uids() == set()
    pacs.send_to_node(pacs.find_study(chest.StudyInstanceUID))  # explicit push still works
    wait_for(lambda: node_standin.dataset(chest.SOPInstanceUID), 30, what="explicit send")


def test_a_failed_routing_job_is_visible_and_retried_until_delivered(tmp_path, orthanc_factory):
    """The node is down when the study is routed: Orthanc's job fails (visible under /jobs, reason in the log)
    and the plugin resubmits it with backoff; once the node listens the study arrives, once."""
    standin = DcmtkStoreSCP(tmp_path / "scp", aet="DICOM_NODE")  # not started: the node is down
    from support.node import free_port

    standin.port = free_port()
    pacs = orthanc_factory(node_aet=standin.aet, node_port=standin.port)
    chest = make_cxr(tmp_path / "chest.dcm", modality="DX")
    assert pacs.storescu(tmp_path / "chest.dcm").returncode == 0
    wait_for(lambda: "retry 2 in" in pacs.log(), 60, what="two failed attempts")
    (job,) = pacs.jobs()
    assert job["Type"] == "DicomModalityStore"
    assert "failed" in pacs.log() and "Connection refused" in pacs.log()
    standin.start()
    try:
        wait_for(lambda: standin.dataset(chest.SOPInstanceUID), 60, what="the study after the node came back")
        wait_for(lambda: pacs.jobs()[0]["State"] == "Success", 30, what="the job to succeed")
        assert standin.received_uids() == {chest.SOPInstanceUID}
    finally:
        standin.stop()
