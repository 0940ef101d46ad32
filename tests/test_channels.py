"""Notification channels (issue 21): HL7 v2.5.1 ORU^R01 over MLLP, a FHIR R4 transaction Bundle, signed webhooks
(JSON, Teams, Slack) and email, each a destination type on the durable outbox.

Every peer is real and listens on 127.0.0.1: an MLLP server from python-hl7 (``hl7.mllp``) that answers AA, AE or
AR as the test wants, an HTTP receiver that validates the FHIR Bundle with fhir.resources and checks the bearer
token, a webhook receiver whose HMAC the test verifies, and an aiosmtpd SMTP server. Tests of the sender alone run
a node without a worker and hand it the payloads through the store, as a worker does; the slow test analyses a
study in a worker with tiny models.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import pytest
from aiosmtpd.controller import Controller
from fhir.resources.R4B.bundle import Bundle
from hl7.mllp import start_hl7_server
from pydicom.uid import generate_uid

from dicom_node.config import (
    DestinationConfig,
    EmailDestinationConfig,
    FHIRDestinationConfig,
    HL7DestinationConfig,
    WebhookDestinationConfig,
    load_config,
    parse_config,
)
from dicom_node.errors import ConfigError
from dicom_node.net.channels import SIGNATURE_HEADER
from dicom_node.outputs.messages import PAYLOAD_SUFFIX, StudySummary, payload_for, summarise
from dicom_node.passwords import hash_password
from inference.types import Finding, Prediction
from storage.jobs import ResultSpec
from support.dicom_factory import make_cxr
from support.node import NodeProcess, free_port, wait_for

CANARY_NAME = "CANARYFAMILY^CANARYGIVEN"
CANARY_ID = "CANARY-PID-8731"
CANARIES = ("CANARYFAMILY", "CANARYGIVEN", "CANARY-PID-8731", "canaryfamily", "Canaryfamily")
ACCESSION = "ACC-20261207-17"
TOKEN = "fhir-token-for-tests"
HMAC_KEY = "webhook-key-for-tests"
PASSWORD = "correct horse battery"


# ---- peers --------------------------------------------------------------------------------------------------------
class MLLPPeer:
    """python-hl7's asyncio MLLP server in a thread: records each message and answers ``ack`` (AA, AE, AR)."""

    def __init__(self, ack: str = "AA", tls: ssl.SSLContext | None = None):
        self.ack = ack
        self.tls = tls
        self.received: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None
        self.port = 0

    def start(self, port: int = 0) -> MLLPPeer:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_hl7_server(self._client, "127.0.0.1", port, ssl=self.tls), self.loop
        ).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader, writer) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.received.append(str(message))
                writer.writemessage(message.create_ack(self.ack))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class HTTPPeer(ThreadingHTTPServer):
    """Records each POST (path, headers, body) and answers ``status``; on /fhir it checks the bearer token and
    validates the Bundle with fhir.resources first (401 / 400 when they are wrong)."""

    def __init__(self, status: int = 200):
        self.status = status
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.problems: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        self.received.append((path, headers, body))
        if path.startswith("/fhir") and self.status == 200:
            if headers.get("Authorization") != f"Bearer {TOKEN}":
                self.problems.append("bearer token")
                return 401, b'{"resourceType": "OperationOutcome"}'
            try:
                Bundle.model_validate_json(body)
            except ValueError as exc:
                self.problems.append(f"bundle: {exc}")
                return 400, b'{"resourceType": "OperationOutcome"}'
            return 200, b'{"resourceType": "Bundle", "type": "transaction-response"}'
        return self.status, b"{}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, answer = self.server.answer(self.path, dict(self.headers.items()), body)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


class SMTPPeer:
    """aiosmtpd on 127.0.0.1: records each message's envelope and bytes, or answers ``reply`` (e.g. "451 ...")."""

    def __init__(self, reply: str | None = None):
        self.reply = reply
        self.received: list[tuple[str, list[str], bytes]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.reply:
            return self.reply
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"

    @property
    def port(self) -> int:
        return self.controller.port

    def start(self) -> SMTPPeer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def peers():
    started: list = []

    def make(peer, **start):
        started.append(peer)
        return peer.start(**start) if isinstance(peer, MLLPPeer | SMTPPeer) else peer

    yield make
    for p in started:
        p.stop()


# ---- what the tests send -----------------------------------------------------------------------------------------
def strong_prediction(rows: int = 256, cols: int = 256) -> Prediction:
    finding = Finding(12, "Pneumothorax", 0.91, (20.0, 30.0, 120.0, 140.0), 0.88)
    return Prediction(0.93, 0.07, (finding,), "soft", (), (rows, cols))


def canary_image(path: Path | None = None, **kw):
    return make_cxr(path, patient_name=CANARY_NAME, patient_id=CANARY_ID, AccessionNumber=ACCESSION, **kw)


URGENT_WHY = ("suspected Pneumothorax (0.91)",)


def summary(priority: str = "urgent") -> StudySummary:
    ds = canary_image()
    return summarise([(ds, strong_prediction())], priority, URGENT_WHY, "https://node.example.org/")


def email_dest(port: int, **kw) -> dict:
    """The SMTP destination of the end-to-end tests: one radiologist's address, on the test's own SMTP server."""
    return {
        "type": "email",
        "name": "mail",
        "host": "127.0.0.1",
        "port": port,
        "from_address": "ai@node.org",
        "to": ["radiologist@hospital.org"],
        **kw,
    }


def hl7_dest(port: int, **kw) -> dict:
    return {
        "type": "hl7",
        "name": "ris",
        "host": "127.0.0.1",
        "port": port,
        "mode": "live",
        "when": "always",
        "sending_facility": "XRAY",
        "receiving_application": "RIS",
        "receiving_facility": "HOSP",
        "timeout_s": 3,
        **kw,
    }


def assert_no_canary(data: bytes | str, where: str) -> None:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    for canary in CANARIES:
        assert canary not in text, f"{canary!r} in {where}"


# ---- configuration ------------------------------------------------------------------------------------------------
def test_destination_types_in_the_configuration(tmp_path):
    cfg = parse_config(
        {
            "web": {"public_url": "https://node.example.org"},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104},  # no type: DICOM, as before
                hl7_dest(2575),
                {"type": "fhir", "name": "fhir", "url": "https://fhir.example.org/r4", "token_env": "RIS_TOKEN"},
                {"type": "webhook", "name": "hook", "url": "https://hooks.example.org/x", "hmac_key_env": "K"},
                {
                    "type": "webhook",
                    "name": "teams",
                    "url": "https://t.example.org/x",
                    "format": "teams",
                    "template": "teams.j2",
                },
                {"type": "email", "name": "mail", "host": "smtp", "from_address": "ai@x.org", "to": ["r@x.org"]},
            ],
        },
        tmp_path,
    )
    types = [type(d) for d in cfg.destinations]
    assert types == [
        DestinationConfig,
        HL7DestinationConfig,
        FHIRDestinationConfig,
        WebhookDestinationConfig,
        WebhookDestinationConfig,
        EmailDestinationConfig,
    ]
    assert [d.name for d in cfg.dicom_destinations] == ["pacs"]
    assert [d.name for d in cfg.notification_destinations] == ["ris", "fhir", "hook", "teams", "mail"]
    fhir = cfg.notification_destinations[1]
    assert fhir.when == "urgent" and fhir.include_phi is False and fhir.mode == "silent"  # the defaults
    assert cfg.notification_destinations[3].template == tmp_path / "teams.j2"  # relative to the config file
    for bad, says in [
        ({"type": "fax", "name": "x"}, "type must be dicom (the default), dicomweb, hl7, fhir, webhook or email"),
        ({"type": "hl7", "name": "x", "host": "h", "port": 1, "outputs": ["sr"]}, "destinations.0.outputs"),
        ({"type": "fhir", "name": "x", "url": "ftp://x"}, "http:// or https://"),
        ({"type": "webhook", "name": "x", "url": "http://x", "template": "t.j2"}, "template is for format"),
        ({"name": "x", "ae_title": "A", "host": "h"}, "destinations.0.port"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config({"destinations": [bad]}, tmp_path)
        assert says in str(err.value), str(err.value)


# ---- payloads ---------------------------------------------------------------------------------------------------
def test_payloads_state_the_result_and_carry_patient_data_only_when_asked(tmp_path):
    s = summary()
    assert (
        s.verdict.verdict == "abnormal" and s.priority == "urgent" and [f.name for f in s.findings] == ["Pneumothorax"]
    )
    assert s.statement.startswith("URGENT (suspected Pneumothorax (0.91)): AI: abnormality suspected")
    assert s.console_url == f"https://node.example.org/studies/{s.study_uid}"
    kinds = {
        "hl7": hl7_dest(2575),
        "fhir": {"type": "fhir", "name": "f", "url": "http://x/fhir"},
        "json": {"type": "webhook", "name": "w", "url": "http://x/w"},
        "teams": {"type": "webhook", "name": "t", "url": "http://x/t", "format": "teams"},
        "slack": {"type": "webhook", "name": "s", "url": "http://x/s", "format": "slack"},
        "email": {"type": "email", "name": "e", "host": "h", "from_address": "ai@x.org", "to": ["r@x.org"]},
    }
    for phi in (False, True):
        cfg = parse_config({"destinations": [dict(d, include_phi=phi) for d in kinds.values()]}, tmp_path)
        payloads = {k: payload_for(d, s) for k, d in zip(kinds, cfg.destinations)}
        for kind, data in payloads.items():
            text = data.decode()
            assert ACCESSION in text and "Pneumothorax" in text, kind
            if phi:
                assert "CANARYFAMILY" in text and CANARY_ID in text, kind
            else:
                assert_no_canary(data, f"the {kind} payload")
        oru = hl7.parse(payloads["hl7"].decode())
        assert str(oru.segment("MSH")(9)) == "ORU^R01^ORU_R01" and oru["MSH.12"] == "2.5.1"
        assert (oru["MSH.4"], oru["MSH.5"], oru["MSH.6"]) == ("XRAY", "RIS", "HOSP")
        assert oru["OBR.2"] == oru["OBR.3"] == ACCESSION and oru["OBR.5"] == "S" and oru["OBR.25"] == "P"
        obx = {str(seg(3)(1)(1)): seg for seg in oru.segments("OBX")}
        assert str(obx["AI-VERDICT"](8)) == "A" and s.statement == oru.unescape(str(obx["AI-VERDICT"](5)))
        assert str(obx["110180"](5)) == s.study_uid and str(obx["AI-PRIORITY"](5)) == "urgent"
        assert str(obx["36118008"](5)) == "0.9100" and str(obx["36118008"](8)) == "A"
        assert (oru["PID.3.1.1"], oru["PID.5.1.1"]) == ((CANARY_ID, "CANARYFAMILY") if phi else ("", ""))
        bundle = Bundle.model_validate_json(payloads["fhir"])
        report = bundle.entry[0].resource
        assert report.status == "preliminary" and report.category[0].coding[1].code == "RAD"
        assert report.imagingStudy[0].identifier.value == f"urn:oid:{s.study_uid}"
        assert (report.subject is not None) == phi
        (observation,) = [e.resource for e in bundle.entry[1:]]
        assert observation.code.text == "Pneumothorax" and float(observation.valueQuantity.value) == pytest.approx(0.91)
        assert observation.bodySite.coding[0].display == "Chest"
        webhook = json.loads(payloads["json"])
        assert webhook["priority"] == "urgent" and webhook["verdict"] == "abnormal"
        assert webhook["findings"] == [
            {"name": "Pneumothorax", "probability": 0.91, "code": "36118008", "scheme": "SCT"}
        ]
        assert ("patient" in webhook) == phi
        assert json.loads(payloads["teams"])["attachments"][0]["content"]["type"] == "AdaptiveCard"
        assert "URGENT" in json.loads(payloads["slack"])["text"]
        assert b"\n" not in payloads["email"].replace(b"\r\n", b"")  # CRLF only: smtplib sends bytes as they are
        mail = email.message_from_bytes(payloads["email"])
        assert mail["Subject"] == f"URGENT: AI chest X-ray result: Abnormal (accession {ACCESSION})"


def _says(kind: str, data: bytes) -> tuple[str, str, list[tuple[str, float]], str]:
    """(the statement, the priority, the findings (name, probability), everything as text) of a payload, read as
    its receiver reads it."""
    if kind == "hl7":
        oru = hl7.parse(data.decode())
        obx = [(str(seg(2)), str(seg(3)(1)(1)), seg) for seg in oru.segments("OBX")]
        by_id = {ident: seg for _, ident, seg in obx}
        findings = [(oru.unescape(str(seg(3)(1)(2))), float(str(seg(5)))) for vt, _, seg in obx if vt == "NM"]
        statement = oru.unescape(str(by_id["AI-VERDICT"](5)))
        return statement, str(by_id["AI-PRIORITY"](5)), findings, data.decode()
    if kind == "fhir":
        bundle = Bundle.model_validate_json(data)
        report = bundle.entry[0].resource
        findings = [(e.resource.code.text, float(e.resource.valueQuantity.value)) for e in bundle.entry[1:]]
        priority = "urgent" if report.meta.tag[0].code == "S" else "routine"
        return report.conclusion, priority, findings, data.decode()
    if kind == "email":
        body = email.message_from_bytes(data, policy=email.policy.default)
        text = body["Subject"].strip() + "\n" + body.get_content()
        return text, "urgent" if text.startswith("URGENT") else "routine", [], text
    doc = json.loads(data)
    findings = [(f["name"], f["probability"]) for f in doc.get("findings", [])]
    return doc.get("statement", ""), doc.get("priority", ""), findings, json.dumps(doc)


def test_every_message_states_the_verdict_priority_and_findings_of_the_study(tmp_path):
    """The messages agree with the study verdict (dicom_node.outputs.verdict, which the SR, SC and GSPS state; see
    tests/test_agreement.py) for an abnormal study with boxes, one without a box, a normal one and one whose image
    could not be judged, each routine and urgent."""
    box = Finding(12, "Pneumothorax", 0.91, (20.0, 30.0, 120.0, 140.0), 0.88)
    heart = Finding(3, "Cardiomegaly", 0.66, (60.0, 120.0, 150.0, 220.0), 0.6)
    studies = {
        "abnormal with boxes": Prediction(0.91, 0.09, (box, heart), "soft", (), (256, 256)),
        "abnormal without a box": Prediction(0.85, 0.15, (), "soft", (), (256, 256)),
        "normal": Prediction(0.07, 0.93, (), "soft", (), (256, 256)),
        "not analysable": Prediction.unanalysable("blank or nearly constant image", "soft", (), (256, 256)),
    }
    contradictions = {
        "abnormal": ("No abnormality", "no abnormality", "not analysable", "Not analysable", "Indeterminate"),
        "no abnormality": ("Abnormal", "abnormality suspected", "not analysable", "Not analysable", "Indeterminate"),
        "not analysable": ("Abnormal", "abnormality suspected", "No abnormality", "no abnormality", "P(abnormal)"),
    }
    kinds = {
        "hl7": hl7_dest(2575),
        "fhir": {"type": "fhir", "name": "f", "url": "http://x/fhir"},
        "json": {"type": "webhook", "name": "w", "url": "http://x/w"},
        "teams": {"type": "webhook", "name": "t", "url": "http://x/t", "format": "teams"},
        "slack": {"type": "webhook", "name": "s", "url": "http://x/s", "format": "slack"},
        "email": {"type": "email", "name": "e", "host": "h", "from_address": "ai@x.org", "to": ["r@x.org"]},
    }
    cfg = parse_config({"destinations": list(kinds.values())}, tmp_path)
    for name, prediction in studies.items():
        for priority, reasons in (("routine", ()), ("urgent", URGENT_WHY)):
            s = summarise([(canary_image(), prediction)], priority, reasons)
            v = s.verdict
            expected = [(f.name, round(f.probability, 4)) for f in v.findings]
            for kind, dest in zip(kinds, cfg.destinations):
                data = payload_for(dest, s)
                statement, said_priority, findings, everything = _says(dest.type if kind != "email" else kind, data)
                where = f"{kind}, {name}, {priority}"
                if kind in ("hl7", "fhir", "json", "email"):
                    assert v.statement in statement, (where, statement)
                else:  # Teams, Slack: the statement and the headline in the card's text
                    assert v.statement in everything and v.headline in everything, where
                if kind in ("hl7", "fhir", "json", "email"):
                    assert said_priority == priority, where
                if kind in ("hl7", "fhir", "json"):
                    assert [(n, round(p, 4)) for n, p in findings] == expected, where
                else:
                    assert all(f.name in everything for f in v.findings), where
                for word in contradictions[v.verdict]:
                    assert word not in everything, (where, word)
                assert ("URGENT" in everything) == (priority == "urgent"), where


# ---- the sender against real peers ----------------------------------------------------------------------------
def notification_node(node_factory, destinations: list[dict], tmp_path, **over) -> NodeProcess:
    return node_factory(
        destinations=destinations,
        delivery={"backoff_initial_s": 0.3, "backoff_max_s": 0.6, "connect_timeout_s": 3},
        web={"port": 0, "users": {"alice": hash_password(PASSWORD)}, "public_url": "https://node.example.org"},
        **over,
    )


def hand_over(node: NodeProcess, tmp_path: Path, priority: str = "urgent") -> str:
    """A canary study sent to the node; its job finished through the store with one payload per notification
    destination, as a worker does. Returns the Study UID."""
    study = generate_uid()
    image = canary_image(tmp_path / f"{study}.dcm", study_uid=study)
    assert node.storescu(tmp_path / f"{study}.dcm").returncode == 0
    store = node.store()
    job = wait_for(lambda: store.claim_job("test-worker", 60), 30, what="the study's job")
    cfg = load_config(node.config_path)
    s = summarise(
        [(image, strong_prediction())], priority, URGENT_WHY if priority == "urgent" else (), cfg.web.public_url
    )
    specs = [
        ResultSpec(d.type, generate_uid(), "", "", None, payload_for(d, s), (d.name,), suffix=PAYLOAD_SUFFIX[d.type])
        for d in cfg.notification_destinations
    ]
    store.finish_job(job.id, "test-worker", specs)
    return study


def by_destination(node: NodeProcess) -> dict[str, dict]:
    return {d["destination"]: d for d in node.rows("SELECT * FROM deliveries")}


def test_each_channel_delivers_to_its_peer(node_factory, peers, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_FHIR_TOKEN", TOKEN)  # token_env: read by the node when it sends
    ris, http, smtp = peers(MLLPPeer("AA")), peers(HTTPPeer()), peers(SMTPPeer())
    common = {"mode": "live", "when": "always", "timeout_s": 3}
    node = notification_node(
        node_factory,
        [
            hl7_dest(ris.port),
            {"type": "fhir", "name": "fhir", "url": http.url("/fhir"), "token_env": "TEST_FHIR_TOKEN", **common},
            {"type": "webhook", "name": "hook", "url": http.url("/hook"), "hmac_key": HMAC_KEY, **common},
            {"type": "webhook", "name": "teams", "url": http.url("/teams"), "format": "teams", **common},
            {"type": "webhook", "name": "slack", "url": http.url("/slack"), "format": "slack", **common},
            email_dest(smtp.port, **common),
        ],
        tmp_path,
    )
    study = hand_over(node, tmp_path)
    got = wait_for(
        lambda: (d := by_destination(node)) and all(x["state"] == "delivered" for x in d.values()) and d,
        30,
        what="six deliveries",
    )
    assert len(got) == 6 and not http.problems
    # HL7: one ORU, parsed by the peer, ACKed, naming the accession number and the finding
    (oru_text,) = ris.received
    oru = hl7.parse(oru_text)
    assert (
        oru["OBR.3"] == ACCESSION
        and "Pneumothorax" in oru_text
        and "AI: abnormality suspected" in str(oru.segment("OBX")(5))
    )
    posts = {path: (headers, body) for path, headers, body in http.received}
    assert set(posts) == {"/fhir", "/hook", "/teams", "/slack"}
    # FHIR: the receiver validated the Bundle and the bearer token (else 401/400 and no delivery)
    assert Bundle.model_validate_json(posts["/fhir"][1]).entry[0].resource.get_resource_type() == "DiagnosticReport"
    headers, body = posts["/hook"]
    expected = "sha256=" + hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    assert json.loads(body)["console_url"] == f"https://node.example.org/studies/{study}"
    ((sender, rcpts, mail),) = smtp.received
    assert sender == "ai@node.org" and rcpts == ["radiologist@hospital.org"] and ACCESSION.encode() in mail
    # patient data: never in a stored payload or in what a peer received (no destination includes it)
    for row in node.rows("SELECT path FROM results WHERE kind IN ('hl7', 'fhir', 'webhook', 'email')"):
        assert_no_canary(Path(row["path"]).read_bytes(), row["path"])
    for what in [*ris.received, *(b for _, _, b in http.received), *(m for _, _, m in smtp.received)]:
        assert_no_canary(what, "a message a peer received")
    audit = (Path(node.config["storage"]["root"]) / "audit.jsonl").read_text()
    assert sum('"delivery_done"' in line for line in audit.splitlines()) == 6
    with urllib.request.urlopen(f"{node.web_url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'dicom_node_delivery_attempts_total{destination="ris",result="delivered"} 1.0' in metrics


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1 (ca.pem, server.pem, server.key), made by openssl."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=ris")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")  # fmt: skip
    return d


def test_hl7_over_tls_is_delivered_and_an_unknown_certificate_is_not(node_factory, peers, pki, tmp_path):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki / "server.pem", pki / "server.key")
    ris = peers(MLLPPeer("AA", tls=server))
    node = notification_node(
        node_factory,
        [
            hl7_dest(ris.port, tls={"ca_certificates": str(pki / "ca.pem")}),
            hl7_dest(ris.port, name="ris-untrusted", tls={"ca_certificates": str(pki / "server.pem")}),
        ],
        tmp_path,
    )
    hand_over(node, tmp_path)
    wait_for(
        lambda: (d := by_destination(node)) and d["ris"]["state"] == "delivered" and d["ris-untrusted"]["attempts"],
        30,
        what="the TLS delivery, and a try of the untrusted one",
    )
    assert len(ris.received) == 1 and hl7.parse(ris.received[0])["OBR.3"] == ACCESSION
    untrusted = by_destination(node)["ris-untrusted"]
    assert untrusted["state"] == "pending" and "CERTIFICATE_VERIFY_FAILED" in untrusted["last_error"]


def console_page(node: NodeProcess, path: str) -> str:
    """A console page, logged in (as tests/test_backfill.py does it)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
    with opener.open(f"{node.web_url}/login", timeout=10) as r:
        cookie = r.headers["Set-Cookie"].split(";")[0]
        token = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    form = urllib.parse.urlencode({"username": "alice", "password": PASSWORD, "csrf": token}).encode()
    try:
        opener.open(urllib.request.Request(f"{node.web_url}/login", data=form, headers={"Cookie": cookie}), timeout=10)
        raise AssertionError("the login was not redirected")
    except urllib.error.HTTPError as e:
        assert e.code == 303, e.code
        cookie = e.headers["set-cookie"].split(";")[0]
    with opener.open(urllib.request.Request(f"{node.web_url}{path}", headers={"Cookie": cookie}), timeout=10) as r:
        return r.read().decode()


def test_down_ae_and_ar_peers_are_retried_or_failed_and_the_console_shows_it(node_factory, peers, tmp_path):
    accepting_later, ae, ar = free_port(), peers(MLLPPeer("AE")), peers(MLLPPeer("AR"))
    http_busy, http_refusing = peers(HTTPPeer(503)), peers(HTTPPeer(404))
    smtp_busy, smtp_refusing = peers(SMTPPeer("451 4.3.0 try again later")), peers(SMTPPeer("554 5.7.1 no"))
    common = {"mode": "live", "when": "always", "timeout_s": 2}
    mail = {"type": "email", "host": "127.0.0.1", "from_address": "ai@node.org", "to": ["r@h.org"], **common}
    node = notification_node(
        node_factory,
        [
            hl7_dest(accepting_later, name="ris-down"),
            hl7_dest(ae.port, name="ris-ae"),
            hl7_dest(ar.port, name="ris-ar"),
            {"type": "fhir", "name": "fhir-503", "url": http_busy.url("/fhir"), "token": TOKEN, **common},
            {"type": "webhook", "name": "hook-404", "url": http_refusing.url("/hook"), **common},
            dict(mail, name="mail-451", port=smtp_busy.port),
            dict(mail, name="mail-554", port=smtp_refusing.port),
        ],
        tmp_path,
    )
    study = hand_over(node, tmp_path)
    retried, failed = ("ris-down", "ris-ae", "fhir-503", "mail-451"), ("ris-ar", "hook-404", "mail-554")

    def settled():
        d = by_destination(node)
        return (
            len(d) == 7
            and all(d[n]["state"] == "pending" and d[n]["attempts"] >= 2 for n in retried)
            and all(d[n]["state"] == "failed" for n in failed)
            and d
        )

    d = wait_for(settled, 60, what="retries and failures")
    assert all(d[n]["attempts"] == 1 for n in failed)  # a permanent failure is not retried
    assert "cannot send" in d["ris-down"]["last_error"] and "ACK AE" in d["ris-ae"]["last_error"]
    assert "ACK AR" in d["ris-ar"]["last_error"] and "HTTP 503" in d["fhir-503"]["last_error"]
    assert "HTTP 404" in d["hook-404"]["last_error"] and "SMTP 451" in d["mail-451"]["last_error"]
    assert "SMTP 554" in d["mail-554"]["last_error"]
    assert len(ae.received) >= 2 and len(ar.received) == 1
    page = console_page(node, f"/studies/{study}")
    for name in retried + failed:
        row = re.search(rf"<tr class=\"state-(\w+)\"[^>]*><td>(\w+)</td><td>{name}</td>", page)
        assert row, name
        assert row.group(1) == ("pending" if name in retried else "failed") and row.group(2) in (
            "HL7",
            "FHIR",
            "WEBHOOK",
            "EMAIL",
        )
    assert "ACK AR" in page  # the reason is shown
    with urllib.request.urlopen(f"{node.web_url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'dicom_node_delivery_attempts_total{destination="ris-ar",result="failed"} 1.0' in metrics
    assert 'dicom_node_deliveries_by_destination{destination="ris-ae",state="pending"} 1.0' in metrics
    audit = [json.loads(line) for line in (Path(node.config["storage"]["root"]) / "audit.jsonl").open()]
    assert sorted(e["destination"] for e in audit if e.get("event") == "delivery_failed") == sorted(failed)
    # the peer that was down comes up: the ORU is delivered on a later try, once
    late = peers(MLLPPeer("AA"), port=accepting_later)
    wait_for(lambda: by_destination(node)["ris-down"]["state"] == "delivered", 30, what="delivery after the peer is up")
    assert len(late.received) == 1 and hl7.parse(late.received[0])["OBR.3"] == ACCESSION


# ---- the whole flow: a worker analyses the study ------------------------------------------------------------------
@pytest.fixture(scope="module")
def strong_models(tmp_path_factory) -> dict[str, str]:
    """Tiny models that call every image abnormal (0.97) with confident boxes."""
    from support.models import make_tiny_models

    clf, det = make_tiny_models(tmp_path_factory.mktemp("strong-models"), p_abnormal=0.97, detector_logit=4.0)
    return {"classifier": str(clf), "detector": str(det)}


# The site's rule here: P(abnormal) 0.9 or more is urgent (no finding floor: the tiny detector's classes are random)
PRIORITY = {"findings": {}, "p_abnormal": 0.9, "sender_request": False}


def channel_node(node_factory, models, tmp_path, ris, http, smtp) -> NodeProcess:
    """A node with a worker and four notification destinations, each ``when: urgent`` (the default)."""
    common = {"mode": "live", "timeout_s": 5}
    return notification_node(
        node_factory,
        [
            hl7_dest(ris.port, when="urgent"),
            {"type": "fhir", "name": "fhir", "url": http.url("/fhir"), "token": TOKEN, **common},
            {"type": "webhook", "name": "hook", "url": http.url("/hook"), "hmac_key": HMAC_KEY, **common},
            email_dest(smtp.port, **common),
        ],
        tmp_path,
        workers={"count": 1, "job_lease_s": 5},
        inference={"models": models},
        priority=PRIORITY,
    )


@pytest.mark.slow  # worker processes load models
def test_an_urgent_study_reaches_every_channel_within_seconds_and_a_routine_one_none(
    node_factory, peers, strong_models, models, tmp_path
):
    ris, http, smtp = peers(MLLPPeer("AA")), peers(HTTPPeer()), peers(SMTPPeer())
    node = channel_node(node_factory, strong_models, tmp_path, ris, http, smtp)
    study = generate_uid()
    canary_image(tmp_path / "chest.dcm", study_uid=study)
    assert node.storescu(tmp_path / "chest.dcm").returncode == 0
    t0 = time.monotonic()
    wait_for(
        lambda: (d := by_destination(node)) and len(d) == 4 and all(x["state"] == "delivered" for x in d.values()),
        120,
        what="four messages delivered",
    )
    took = time.monotonic() - t0
    labels = {r["label"] for r in node.rows("SELECT label FROM findings")}
    assert labels, "the tiny detector marked nothing"
    assert took < 30, f"{took:.1f} s from the last image to the last message"  # stable_after_s is 1 s here
    (oru_text,) = ris.received
    oru = hl7.parse(oru_text)
    assert oru["OBR.3"] == ACCESSION and oru["OBR.5"] == "S" and any(label in oru_text for label in labels)
    assert not http.problems
    posts = {path: (headers, body) for path, headers, body in http.received}
    bundle = Bundle.model_validate_json(posts["/fhir"][1])
    assert {e.resource.code.text for e in bundle.entry[1:]} == labels
    assert bundle.entry[0].resource.meta.tag[0].code == "S"
    headers, body = posts["/hook"]
    assert headers[SIGNATURE_HEADER] == "sha256=" + hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()
    hook = json.loads(body)
    assert hook["study_instance_uid"] == study and hook["priority"] == "urgent" and len(smtp.received) == 1
    assert hook["statement"].startswith("URGENT (P(abnormal) 0.9")
    for row in node.rows("SELECT path FROM results WHERE kind IN ('hl7', 'fhir', 'webhook', 'email')"):
        assert_no_canary(Path(row["path"]).read_bytes(), row["path"])
    for what in [*ris.received, *(b for _, _, b in http.received), *(m for _, _, m in smtp.received)]:
        assert_no_canary(what, "a message a peer received")

    # a routine study (P(abnormal) 0.8 is below the site's 0.9): analysed, no message made or sent
    quiet = [peers(MLLPPeer("AA")), peers(HTTPPeer()), peers(SMTPPeer())]
    routine = channel_node(node_factory, models, tmp_path, *quiet)
    canary_image(tmp_path / "routine.dcm")
    assert routine.storescu(tmp_path / "routine.dcm").returncode == 0
    wait_for(lambda: routine.status()["jobs"]["done"] == 1, 120, what="the routine study analysed")
    kinds = {r["kind"] for r in routine.rows("SELECT kind FROM results")}
    assert "sr" in kinds and not kinds & {"hl7", "fhir", "webhook", "email"}
    assert not routine.rows("SELECT * FROM deliveries")
    time.sleep(1)
    assert not quiet[0].received and not quiet[1].received and not quiet[2].received
