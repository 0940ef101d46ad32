"""STOW-RS destinations (issue 22, part 2): the node delivers SR, SC and GSPS to a DICOMweb archive, all of a study's
results in one request; statuses and per-instance failures mapped to delivered / retried / failed; Orthanc's
DICOMweb plugin and a second node (STOW-RS with auth) as the real peers, a small HTTP server for the odd answers."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from dicom_node.config import DicomWebDestinationConfig, parse_config
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.net.channels import PeerUnreachable
from dicom_node.net.stowrs import StowClient, parse_store_response
from dicom_node.passwords import hash_password
from support.dicom_factory import make_cxr
from support.node import free_port, wait_for
from support.orthanc import Orthanc

FAILED, REFERENCED, UID, REASON = "00081198", "00081199", "00081155", "00081197"
_STUDY = re.compile(rb"\x20\x00\x0d\x00UI..([0-9.]+)", re.S)  # (0020,000D) Study Instance UID, explicit VR LE


class _Peer(ThreadingHTTPServer):
    """An HTTP server on loopback that answers STOW-RS requests with ``answer(body) -> (status, headers, body)`` and
    keeps each request's headers and number of parts."""

    daemon_threads = True

    def __init__(self, port: int, answer):
        self.answer, self.requests_seen = answer, []
        super().__init__(("127.0.0.1", port), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
        self.server.requests_seen.append(
            {
                "path": self.path,
                "headers": dict(self.headers),
                "parts": body.count(b"--" + boundary) - 1,
                "study": {u for u in _STUDY.findall(body)},
            }
        )
        status, headers, answer = self.server.answer(self.path, self.headers, body)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def forward_to(pacs: Orthanc):
    """A counting proxy in front of Orthanc's DICOMweb."""

    def answer(path, headers, body):
        r = requests.post(
            pacs.url + path,
            data=body,
            headers={k: headers[k] for k in ("Content-Type", "Accept")},
            timeout=60,
        )
        return r.status_code, {"Content-Type": r.headers.get("Content-Type", "application/dicom+json")}, r.content

    return answer


def destination(**kw) -> DicomWebDestinationConfig:
    return DicomWebDestinationConfig(type="dicomweb", name="archive", **kw)


def store_response(referenced=(), failed=()) -> bytes:
    out: dict = {}
    if referenced:
        out[REFERENCED] = {"vr": "SQ", "Value": [{UID: {"vr": "UI", "Value": [u]}} for u in referenced]}
    if failed:
        out[FAILED] = {
            "vr": "SQ",
            "Value": [{UID: {"vr": "UI", "Value": [u]}, REASON: {"vr": "US", "Value": [r]}} for u, r in failed],
        }
    return json.dumps(out).encode()


# ---- the mapping, against a small HTTP server ------------------------------------------------------------------
def test_configuration_and_the_destination_takes_the_dicom_results():
    cfg = parse_config(
        {
            "destinations": [
                {"type": "dicomweb", "name": "cloud", "url": "https://pacs.example.org/dicom-web/", "outputs": ["sr"]},
                {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104},
            ]
        },
        Path("."),
    )
    cloud = cfg.destinations[0]
    assert isinstance(cloud, DicomWebDestinationConfig) and cloud.url == "https://pacs.example.org/dicom-web"
    assert [d.name for d in cfg.result_destinations] == ["cloud", "pacs"] and cfg.notification_destinations == []
    with pytest.raises(Exception, match="not both"):
        destination(url="http://x/dicom-web", username="u", token_env="T")
    with pytest.raises(Exception, match="go together"):
        destination(url="http://x/dicom-web", certificate=Path("c.pem"))


def test_store_response_in_json_and_xml():
    assert parse_store_response(store_response(["1.2"], [("1.3", 0xA700)]), "application/dicom+json") == (
        {"1.2"},
        {"1.3": 0xA700},
    )
    xml = (
        b'<?xml version="1.0"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        b'<DicomAttribute tag="00081198" vr="SQ"><Item number="1">'
        b'<DicomAttribute tag="00081155" vr="UI"><Value number="1">1.3</Value></DicomAttribute>'
        b'<DicomAttribute tag="00081197" vr="US"><Value number="1">49442</Value></DicomAttribute></Item>'
        b'</DicomAttribute><DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
        b'<DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2</Value></DicomAttribute></Item>'
        b"</DicomAttribute></NativeDicomModel>"
    )
    assert parse_store_response(xml, "application/dicom+xml") == ({"1.2"}, {"1.3": 0xC122})
    assert parse_store_response(b"<html>", "text/html") == (set(), {})


def test_http_statuses_and_per_instance_failures_are_mapped(monkeypatch):
    instances = [("1.1", b"a"), ("1.2", b"b"), ("1.3", b"c"), ("1.4", b"d")]
    answers: list = []
    with _Peer(free_port(), lambda *_: answers.pop(0)) as peer:
        url = f"http://127.0.0.1:{peer.server_address[1]}/dicom-web"
        monkeypatch.setenv("STOW_TEST_TOKEN", "s3cret-token")
        client = StowClient(destination(url=url, token_env="STOW_TEST_TOKEN", timeout_s=5))
        json_type = {"Content-Type": "application/dicom+json"}

        answers.append((200, json_type, b""))
        assert client.store(instances) == (200, dict.fromkeys(["1.1", "1.2", "1.3", "1.4"]))
        seen = peer.requests_seen[-1]
        assert seen["path"] == "/dicom-web/studies" and seen["parts"] == 4
        assert seen["headers"]["Authorization"] == "Bearer s3cret-token"
        assert seen["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"')

        # 202: out of resources retried, a refusal failed, the referenced delivered, one in neither list retried
        answers.append((202, json_type, store_response(["1.1"], [("1.2", 0xA700), ("1.3", 0xC000)])))
        status, out = client.store(instances)
        assert status == 202 and out["1.1"] is None
        assert type(out["1.2"]) is TransientDeliveryError and "0xA700" in str(out["1.2"])
        assert type(out["1.3"]) is PermanentDeliveryError and "0xC000" in str(out["1.3"])
        assert type(out["1.4"]) is TransientDeliveryError

        answers.append((409, json_type, store_response(failed=[("1.1", 0xA900), ("1.2", 0xA701)])))
        status, out = client.store(instances)
        assert status == 409 and type(out["1.1"]) is PermanentDeliveryError
        assert type(out["1.2"]) is TransientDeliveryError and type(out["1.3"]) is PermanentDeliveryError

        for code, error in ((401, PermanentDeliveryError), (400, PermanentDeliveryError), (404, PermanentDeliveryError),
                            (403, PermanentDeliveryError), (408, TransientDeliveryError),
                            (429, TransientDeliveryError), (503, TransientDeliveryError)):  # fmt: skip
            answers.append((code, {}, b""))
            with pytest.raises(error, match=f"HTTP {code}") as caught:
                client.store(instances)
            assert type(caught.value) is error and "s3cret" not in str(caught.value)
    with pytest.raises(PeerUnreachable, match="cannot connect"):  # the server is gone
        client.store(instances)


def test_a_basic_password_env_that_is_not_set_is_a_permanent_failure(monkeypatch):
    monkeypatch.delenv("STOW_TEST_PASSWORD", raising=False)
    client = StowClient(
        destination(url="http://127.0.0.1:9/dicom-web", username="u", password_env="STOW_TEST_PASSWORD")
    )
    with pytest.raises(PermanentDeliveryError, match="STOW_TEST_PASSWORD"):
        client.store([("1.1", b"a")])


# ---- the node, with real peers ---------------------------------------------------------------------------------
def deliveries(node) -> list[dict]:
    return node.rows("SELECT destination, state, attempts, last_error FROM deliveries")


def send_studies(node, tmp_path: Path, n: int, images: int = 2) -> list[str]:
    studies = []
    for s in range(n):
        study_uid = generate_uid()
        files = []
        for i in range(images):
            p = tmp_path / "in" / f"{s}-{i}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            make_cxr(p, study_uid=study_uid)
            files.append(p)
        r = node.storescu(*files)
        assert r.returncode == 0, r.stderr
        studies.append(study_uid)
    return studies


@pytest.mark.slow
def test_sr_sc_gsps_go_to_orthanc_one_request_per_study_and_a_down_archive_is_retried(node_factory, models, tmp_path):
    proxy_port = free_port()
    with Orthanc(tmp_path / "orthanc", route=False) as pacs:
        node = node_factory(
            workers={"count": 1},
            inference={"models": models},
            studies={"stable_after_s": 1},
            destinations=[
                {
                    "type": "dicomweb",
                    "name": "archive",
                    "url": f"http://127.0.0.1:{proxy_port}/dicom-web",
                    "outputs": ["sr", "sc", "gsps"],
                    "mode": "live",
                }
            ],
            delivery={"backoff_initial_s": 1, "backoff_max_s": 2},
        )
        studies = send_studies(node, tmp_path, 2)
        # the archive is down: retried, with the reason
        wait_for(
            lambda: (
                node.rows("SELECT count(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] == 2
                and all(r["attempts"] >= 1 for r in deliveries(node))
            ),
            90,
            interval=0.5,
            what="deliveries tried against the archive that is down",
        )
        rows = deliveries(node)
        assert {r["state"] for r in rows} == {"pending"}
        assert all("STOW-RS: cannot connect to 127.0.0.1" in r["last_error"] for r in rows)
        with _Peer(proxy_port, forward_to(pacs)) as proxy:  # it comes up
            wait_for(
                lambda: {r["state"] for r in deliveries(node)} == {"delivered"}, 60, what="delivered when it is up"
            )
            seen = list(proxy.requests_seen)
        assert len(seen) == 2, [(s["parts"], s["study"]) for s in seen]  # one request per study
        assert sum(s["parts"] for s in seen) == len(rows)  # each request held all of its study's results
        for study_uid in studies:
            held = {m: len(pacs.instances_by_modality(study_uid, m)) for m in ("SR", "OT", "PR")}
            assert held["SR"] == 1 and held["OT"] >= 1 and held["PR"] >= 1, held
        assert node.log().count("STOW-RS to archive: ") == 2


@pytest.mark.slow
def test_wrong_credentials_at_a_node_peer_fail_for_good_and_are_never_logged(
    node_factory, models, tmp_path, monkeypatch
):
    peer = node_factory(dicomweb={"enabled": True, "users": {"pacs": hash_password("right-password-1")}})
    monkeypatch.setenv("PEER_STOW_PASSWORD", "wrong-password-1")
    node = node_factory(
        workers={"count": 1},
        inference={"models": models},
        destinations=[
            {
                "type": "dicomweb",
                "name": "peer",
                "url": peer.web_url + "/dicom-web",
                "username": "pacs",
                "password_env": "PEER_STOW_PASSWORD",
                "outputs": ["sr", "sc", "gsps"],
                "mode": "live",
            }
        ],
    )
    send_studies(node, tmp_path, 1, images=1)
    wait_for(
        lambda: (rows := deliveries(node)) and {r["state"] for r in rows} == {"failed"},
        90,
        interval=0.5,
        what="deliveries failed for good",
    )
    rows = deliveries(node)
    assert all(r["attempts"] == 1 and "HTTP 401" in r["last_error"] for r in rows), rows
    assert "wrong-password-1" not in node.log()
    assert peer.rows("SELECT count(*) AS n FROM instances")[0]["n"] == 0
