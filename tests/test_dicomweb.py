"""DICOMweb (issue 22): STOW-RS ingest on the node's web server (dicomweb-client, curl, Orthanc's DICOMweb client, raw
sockets for the hostile cases, kill -9 mid-body) and a backfill over QIDO-RS / WADO-RS from Orthanc."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicom_node.passwords import hash_password
from support.dicom_factory import make_cxr
from support.node import NodeProcess, wait_for
from support.orthanc import DOCS_CONFIG, Orthanc
from support.real_studies import make_real_studies

TOKEN = "stow-test-token-0123456789"
USER, PASSWORD = "pacs", "stow-password-1"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def stow_config(password_hash: str, **dicomweb) -> dict:
    return {"enabled": True, "tokens": [TOKEN], "users": {USER: password_hash}, **dicomweb}


def session(auth=None, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never via an http_proxy
    if auth:
        s.auth = auth
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def client(node: NodeProcess, **kw) -> DICOMwebClient:
    return DICOMwebClient(url=node.web_url + "/dicom-web", session=session(**kw))


def study_files(folder: Path, n: int, study_uid: str | None = None) -> tuple[str, list[Path]]:
    study_uid = study_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        p = folder / f"{i}.dcm"
        make_cxr(p, study_uid=study_uid)
        files.append(p)
    return study_uid, files


def multipart(files: list[bytes], boundary: str = "dicomnodeboundary", types: list[str] | None = None) -> bytes:
    out = b""
    for i, data in enumerate(files):
        ctype = types[i] if types else "application/dicom"
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def raw_request(
    node: NodeProcess, body_parts: list[bytes], content_length: int, pause_s: float = 0.0, complete: bool = True
) -> bytes:
    """POST over a raw socket: headers announcing ``content_length``, then ``body_parts`` (a pause between each);
    returns what the node answered (b"" if it closed without answering)."""
    url = urllib.parse.urlsplit(node.web_url)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Basic {auth}\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=dicomnodeboundary\r\n'
        f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head)
        for chunk in body_parts:
            try:
                s.sendall(chunk)
            except OSError:
                break
            time.sleep(pause_s)
        answer = b""
        if not complete:
            return answer  # a client that goes away half way
        try:
            while data := s.recv(65536):
                answer += data
        except OSError:
            pass
    return answer


def tmp_files(node: NodeProcess) -> list[str]:
    """Partial files left in tmp/ (each process writes in a folder of its own there: tmp/<name>/)."""
    tmp = Path(node.config["storage"]["root"]) / "tmp"
    return [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()] if tmp.exists() else []


def instances(node: NodeProcess) -> set[str]:
    return {r["sop_instance_uid"] for r in node.rows("SELECT sop_instance_uid FROM instances")}


def uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


# ---- the node alone (no worker): stores, answers, refuses --------------------------------------------------------
@pytest.fixture
def stow_node(node_factory, password_hash):
    # a long stability wait: a job queued at once proves the request completed the study
    return node_factory(studies={"stable_after_s": 60}, dicomweb=stow_config(password_hash, max_request_mb=1))


def test_dicomweb_client_and_curl_store_and_the_study_is_complete_at_once(stow_node, tmp_path):
    node = stow_node
    study_uid, files = study_files(tmp_path / "a", 2)
    t0 = time.monotonic()
    answer = client(node, auth=(USER, PASSWORD)).store_instances([pydicom.dcmread(f) for f in files])
    assert {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence} == uids(files)
    assert "FailedSOPSequence" not in answer and study_uid in str(answer.RetrieveURL)
    assert uids(files) <= instances(node)
    wait_for(lambda: node.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 1, 15, what="a job, without waiting 60 s")
    assert time.monotonic() - t0 < 30
    assert node.rows("SELECT stable_due_at FROM studies")[0]["stable_due_at"] is None

    # curl, with a bearer token, to /studies/{uid}
    study2, files2 = study_files(tmp_path / "b", 1)
    body = tmp_path / "body.bin"
    body.write_bytes(multipart([f.read_bytes() for f in files2]))
    r = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}", "-X", "POST",
         f"{node.web_url}/dicom-web/studies/{study2}",
         "-H", f"Authorization: Bearer {TOKEN}", "-H", "Accept: application/dicom+json",
         "-H", 'Content-Type: multipart/related; type="application/dicom"; boundary=dicomnodeboundary',
         "--data-binary", f"@{body}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text, code = r.stdout.rsplit("\n", 1)
    assert code == "200", r.stdout + r.stderr
    refs = json.loads(text)[REFERENCED_SOP_SEQUENCE]["Value"]
    assert {i["00081155"]["Value"][0] for i in refs} == uids(files2) and uids(files2) <= instances(node)
    # the same instance under another study than the URL names: a per-instance failure (0xA900), 409
    other = study_files(tmp_path / "c", 1)[1]
    r = session(token=TOKEN).post(
        f"{node.web_url}/dicom-web/studies/{study2}",
        data=multipart([other[0].read_bytes()]),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=dicomnodeboundary'},
    )
    assert r.status_code == 409 and r.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xA900]
    metrics = session().get(node.web_url + "/metrics").text
    assert 'dicom_node_stow_requests_total{status="200"} 2.0' in metrics
    assert 'calling_ae="STOW:pacs",status="0x0000"' in metrics and 'calling_ae="STOW:token"' in metrics
    audit = (Path(node.config["storage"]["root"]) / "audit.jsonl").read_text()
    assert '"transport": "STOW-RS"' in audit and '"stow_request"' in audit
    assert tmp_files(node) == []


def test_wrong_credentials_non_dicom_part_oversized_and_truncated_bodies(stow_node, tmp_path):
    node = stow_node
    study_uid, files = study_files(tmp_path / "a", 1)
    data = [files[0].read_bytes()]
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=dicomnodeboundary'}
    url = f"{node.web_url}/dicom-web/studies"
    for s in (session(), session(auth=(USER, "wrong-password")), session(token="not-the-token-xxxxxxxx")):
        r = s.post(url, data=multipart(data), headers=headers)
        assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"], r.status_code
    assert instances(node) == set()

    # a non-DICOM part beside a good one: 202, the good one stored, the other in FailedSOPSequence
    r = session(token=TOKEN).post(url, data=multipart([b"not dicom at all", data[0]]), headers=headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(body[REFERENCED_SOP_SEQUENCE]["Value"]) == 1
    assert body[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xC210]
    r = session(token=TOKEN).post(url, data=multipart([data[0]], types=["text/plain"]), headers=headers)
    assert r.status_code == 409 and r.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xC210]
    assert session(token=TOKEN).post(url, data=b"x", headers={"Content-Type": "application/dicom"}).status_code == 415

    # oversized (max_request_mb: 1): 413 from the announced length, before any body is read
    answer = raw_request(node, [b"x" * 1000], content_length=2 << 20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # truncated: a complete HTTP body whose multipart has no closing boundary -> 400, nothing stored of it
    _, more = study_files(tmp_path / "b", 1)
    cut = multipart([more[0].read_bytes()])[:-40]
    answer = raw_request(node, [cut], content_length=len(cut))
    assert answer.startswith(b"HTTP/1.1 400") and b"truncated" in answer, answer[:300]
    # the client goes away half way through the body: nothing stored of it
    raw_request(node, [cut[: len(cut) // 2]], content_length=len(cut) + 100, complete=False)
    time.sleep(0.5)
    assert not (uids(more) & instances(node))
    assert tmp_files(node) == []
    assert "Traceback" not in node.log()


NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"


def xml_attribute(parent: ET.Element, tag: str, vr: str, keyword: str) -> ET.Element:
    """The one ``DicomAttribute`` child of ``parent`` with this tag, checking its vr and keyword."""
    found = [a for a in parent.findall(f"{NATIVE}DicomAttribute") if a.get("tag") == tag]
    assert len(found) == 1, (tag, ET.tostring(parent))
    assert (found[0].get("vr"), found[0].get("keyword")) == (vr, keyword)
    return found[0]


def xml_values(attr: ET.Element) -> list[str]:
    values = attr.findall(f"{NATIVE}Value")
    assert [v.get("number") for v in values] == [str(i) for i in range(1, len(values) + 1)]
    return [v.text or "" for v in values]


def xml_items(attr: ET.Element) -> list[ET.Element]:
    items = attr.findall(f"{NATIVE}Item")
    assert [i.get("number") for i in items] == [str(i) for i in range(1, len(items) + 1)]
    return items


def test_store_response_in_xml_when_accept_asks_for_it_and_406_when_nothing_fits(stow_node, tmp_path):
    node = stow_node
    study_uid, files = study_files(tmp_path / "a", 2)
    body = tmp_path / "body.bin"
    body.write_bytes(multipart([b"not dicom at all", *(f.read_bytes() for f in files)]))

    def curl(accept: str) -> tuple[int, str, str]:
        r = subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "-o", str(tmp_path / "answer"), "-w", "%{http_code} %{content_type}",
             "-X", "POST", f"{node.web_url}/dicom-web/studies", "-H", f"Authorization: Bearer {TOKEN}",
             "-H", f"Accept: {accept}",
             "-H", 'Content-Type: multipart/related; type="application/dicom"; boundary=dicomnodeboundary',
             "--data-binary", f"@{body}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        code, _, ctype = r.stdout.partition(" ")
        return int(code), ctype, (tmp_path / "answer").read_text()

    # PS3.18 Table 10.5.3-1 in the Native DICOM Model (PS3.19 A.1): 202, one stored, the non-DICOM part failed
    code, ctype, text = curl("application/dicom+xml")
    assert code == 202 and ctype.startswith("application/dicom+xml"), (code, ctype, text)
    root = ET.fromstring(text)
    assert root.tag == f"{NATIVE}NativeDicomModel"
    assert xml_values(xml_attribute(root, "00081190", "UR", "RetrieveURL")) == [
        f"{node.web_url}/dicom-web/studies/{study_uid}"
    ]
    referenced = xml_items(xml_attribute(root, REFERENCED_SOP_SEQUENCE, "SQ", "ReferencedSOPSequence"))
    assert {xml_values(xml_attribute(i, "00081155", "UI", "ReferencedSOPInstanceUID"))[0] for i in referenced} == (
        uids(files)
    )
    for item in referenced:
        sop = xml_values(xml_attribute(item, "00081155", "UI", "ReferencedSOPInstanceUID"))[0]
        assert xml_values(xml_attribute(item, "00081150", "UI", "ReferencedSOPClassUID")) == [
            "1.2.840.10008.5.1.4.1.1.1.1"
        ]
        assert xml_values(xml_attribute(item, "00081190", "UR", "RetrieveURL")) == [
            f"{node.web_url}/dicom-web/studies/{study_uid}/instances/{sop}"
        ]
    (failed,) = xml_items(xml_attribute(root, FAILED_SOP_SEQUENCE, "SQ", "FailedSOPSequence"))
    assert xml_values(xml_attribute(failed, FAILURE_REASON, "US", "FailureReason")) == [str(0xC210)]
    assert [a.get("tag") for a in root] == sorted(a.get("tag") for a in root)  # in tag order
    assert uids(files) <= instances(node)

    # JSON for */* and for a JSON-or-XML Accept that prefers JSON (the same instances again: stored once, 202)
    for accept in ("*/*", "application/dicom+json, application/dicom+xml;q=0.5"):
        code, ctype, text = curl(accept)
        assert code == 202 and ctype.startswith("application/dicom+json"), (accept, code, ctype)
        assert len(json.loads(text)[REFERENCED_SOP_SEQUENCE]["Value"]) == 2
    # an Accept the node cannot answer: 406 before the body is read, nothing stored
    study2, files2 = study_files(tmp_path / "b", 1)
    body.write_bytes(multipart([files2[0].read_bytes()]))
    for accept in ("text/html", "application/dicom+xml;q=0, application/dicom+json;q=0"):
        code, _, text = curl(accept)
        assert code == 406 and "application/dicom+xml" in text, (accept, code, text)
    assert not (uids(files2) & instances(node)) and tmp_files(node) == []
    assert 'dicom_node_stow_requests_total{status="406"} 2.0' in session().get(node.web_url + "/metrics").text


def test_a_body_that_stalls_is_cut_off(node_factory, password_hash, tmp_path):
    node = node_factory(dicomweb=stow_config(password_hash, read_timeout_s=1))
    _, files = study_files(tmp_path / "a", 1)
    body = multipart([files[0].read_bytes()])
    t0 = time.monotonic()
    answer = raw_request(node, [body[:1000], body[1000:]], content_length=len(body), pause_s=3)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 10 and instances(node) == set() and tmp_files(node) == []


def test_kill_9_mid_upload_keeps_what_was_acknowledged_and_nothing_else(node_factory, password_hash, tmp_path):
    node = node_factory(dicomweb=stow_config(password_hash))
    _, acked = study_files(tmp_path / "acked", 2)
    assert client(node, token=TOKEN).store_instances([pydicom.dcmread(f) for f in acked]).ReferencedSOPSequence
    _, pending = study_files(tmp_path / "pending", 4)
    body = multipart([f.read_bytes() for f in pending])
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    sent = {"n": 0}

    def slow_client():
        url = urllib.parse.urlsplit(node.web_url)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=dicomnodeboundary\r\n'
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            with socket.create_connection((url.hostname, url.port), timeout=30) as s:
                s.sendall(head)
                for c in chunks:
                    s.sendall(c)
                    sent["n"] += 1
                    time.sleep(0.05)
        except OSError:
            pass

    t = threading.Thread(target=slow_client, daemon=True)
    t.start()
    wait_for(lambda: sent["n"] >= len(chunks) * 3 // 4, 60, interval=0.01, what="most of the body sent")
    node.kill()
    t.join(30)
    assert sent["n"] < len(chunks), "the whole body went before the kill"
    node.start()
    wait_for(lambda: "listening" in node.log(), 30)
    assert instances(node) == uids(acked)  # the acknowledged ones, nothing of the cut request
    for uid in uids(acked):
        assert node.store().instance_file(uid).is_file()
    assert tmp_files(node) == []


# ---- with Orthanc's DICOMweb plugin as the peer ----------------------------------------------------------------
def dicomweb_options(**more) -> dict:
    return {"DicomWeb": {**json.loads(DOCS_CONFIG.read_text())["DicomWeb"], **more}}


@pytest.mark.slow
def test_orthanc_pushes_a_study_over_stow_rs_and_it_is_analysed_without_a_stability_wait(
    node_factory, models, password_hash, tmp_path
):
    node = node_factory(
        studies={"stable_after_s": 60},
        workers={"count": 1},
        inference={"models": models},
        dicomweb=stow_config(password_hash),
    )
    servers = {"node": [node.web_url + "/dicom-web/", USER, PASSWORD]}
    with Orthanc(tmp_path / "orthanc", route=False, extra_config=dicomweb_options(Servers=servers)) as pacs:
        study_uid, files = study_files(tmp_path / "a", 2)
        pacs.storescu(*files, check=True)
        t0 = time.monotonic()
        pacs.post("/dicom-web/servers/node/stow", json.dumps({"Resources": [pacs.find_study(study_uid)]}))
        wait_for(
            lambda: node.rows("SELECT count(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] == 1,
            45,
            what="the pushed study analysed",
        )
        assert time.monotonic() - t0 < 45  # the 60 s stability wait did not apply
        assert instances(node) == uids(files)
        assert "STOW-RS from 127.0.0.1 (pacs): 2 stored, 0 failed" in node.log()


@pytest.mark.slow
def test_backfill_over_qido_and_wado_pulls_analyses_and_sends_nothing(node_factory, models, tmp_path):
    studies = make_real_studies(tmp_path / "archive", 4, start_date="20261101")
    with Orthanc(tmp_path / "orthanc", route=False) as pacs:
        pacs.storescu(*[s.path for s in studies], check=True)
        before = pacs.count_instances()
        node = node_factory(
            studies={"stable_after_s": 60},
            workers={"count": 1},
            inference={"models": models},
            destinations=[dict(pacs.as_destination(outputs=("sr", "sc", "gsps")), mode="live")],
            backfill={"source": {"dicomweb": pacs.dicomweb_url}, "check_interval_s": 0.2, "retry_initial_s": 1},
        )
        r = node.cli("backfill", "--from", "2026-11-02", "--to", "2026-11-04")
        wanted = {s.study_uid for s in studies if "20261102" <= s.study_date <= "20261104"}
        assert "found 3 studies, already held 0, moved 3 (3 images), failed 0" in r.stdout, r.stdout + r.stderr
        wait_for(
            lambda: node.rows("SELECT count(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] == 3,
            50,
            what="3 studies analysed, without the 60 s stability wait",
        )
        assert {r["study_uid"] for r in node.rows("SELECT study_uid FROM jobs")} == wanted
        assert node.rows("SELECT count(*) AS n FROM deliveries")[0]["n"] == 0
        assert pacs.count_instances() == before
        assert "WADO-RS" in node.log() and tmp_files(node) == []
