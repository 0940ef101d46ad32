"""Self-test of the Orthanc PACS fixture (tests/orthanc.py) and of the documented routing rule.

A dcmtk storescp stands in for the AI node. Orthanc runs the rule from docs/orthanc/: CR/DX chest
images go to the node, anything else stays, and what the node sends back is never routed.
Negative checks need no sleep: Orthanc runs its Lua events one at a time, in arrival order, and the
routing job sends in that order, so once a chest image sent *after* an instance has arrived, that
instance would have arrived before it had it been routed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import wait_for
from support.orthanc import DOCS_CONFIG, DOCS_LUA, NODE_MODALITY, Orthanc, routing_lua

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
    node = yaml.safe_load((REPO / "config.yaml").read_text())["node"]
    assert docs["DicomModalities"][NODE_MODALITY] == [node["ae_title"], "127.0.0.1", node["port"]]
    assert docs["LuaScripts"] == [DOCS_LUA.name]
    assert docs["RemoteAccessAllowed"] is False and docs["Plugins"] == []
    assert docs["DicomAlwaysAllowStore"] is True and docs["UnknownSopClassAccepted"] is True
    # the docs ship the safe setting; the fixture only flips the switches
    assert "local SKIP_NODE_OUTPUTS = true" in DOCS_LUA.read_text()
    assert "local ROUTE_EVERYTHING = false" in DOCS_LUA.read_text()
    flipped = routing_lua(skip_node_outputs=False, route_everything=True)
    assert "local SKIP_NODE_OUTPUTS = false" in flipped and "local ROUTE_EVERYTHING = true" in flipped


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
    assert "route-chest-xrays: routing" in pacs.log()

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
    assert [j["Content"].get("Description") for j in pacs.jobs()] == ["Lua"]  # the routing job


def test_no_routing_when_disabled(tmp_path, node_standin, orthanc_factory):
    pacs = orthanc_factory(node_aet=node_standin.aet, node_port=node_standin.port, route=False)
    chest = make_cxr(tmp_path / "chest.dcm", modality="CR")
    assert pacs.storescu(tmp_path / "chest.dcm").returncode == 0
    assert pacs.find_study(chest.StudyInstanceUID) is not None
    assert pacs.jobs() == [] and node_standin.received_uids() == set()
    pacs.send_to_node(pacs.find_study(chest.StudyInstanceUID))  # explicit push still works
    wait_for(lambda: node_standin.dataset(chest.SOPInstanceUID), 30, what="explicit send")
