"""DICOM TLS (PS3.15 Annex B) both ways, with certificates made here by openssl: dcmtk's echoscu/storescu talk TLS
to the node's TLS port while the plain port keeps working; mutual TLS with an allowlist of client names; a
client that stalls the TLS handshake holds up nobody; the sender delivers to an Orthanc that speaks only TLS."""

from __future__ import annotations

import io
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Config
from dicom_node.net.sender import Sender
from storage import Store
from storage.ingest import InstanceMeta
from storage.jobs import ResultSpec
from support.dicom_factory import make_cxr
from support.node import free_port, wait_for
from support.orthanc import Orthanc
from support.rawdicom import closed_by_peer, connect


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA; the node's server certificate (127.0.0.1, localhost); client certificates PACS-CLIENT and INTRUDER,
    and NODE-CLIENT for the node as a TLS client. Each NAME.pem with NAME.key."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for name, san in (
        ("server", "IP:127.0.0.1,DNS:localhost"),
        ("PACS-CLIENT", "DNS:pacs-client"),
        ("INTRUDER", "DNS:intruder"),
        ("NODE-CLIENT", "DNS:node-client"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def _tls_node(node_factory, pki: Path, node_settings: dict | None = None, **tls):
    port = free_port()
    node = node_factory(
        node={
            **(node_settings or {}),
            "acse_timeout_s": 2,
            "tls": {
                "port": port,
                "certificate": str(pki / "server.pem"),
                "private_key": str(pki / "server.key"),
                "ca_certificates": str(pki / "ca.pem"),
                **tls,
            },
        }
    )
    wait_for(lambda: "listening (DICOM TLS" in node.log(), 10, what="the TLS listener")
    return node, port


def echoscu(port: int, *tls: str) -> subprocess.CompletedProcess:
    cmd = ["echoscu", "-to", "5", "-ta", "5", *tls, "-aec", "DICOM_NODE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def client(pki: Path, name: str) -> tuple[str, ...]:
    return ("+tls", str(pki / f"{name}.key"), str(pki / f"{name}.pem"), "+cf", str(pki / "ca.pem"))


def test_dcmtk_talks_tls_to_the_node_beside_the_plain_port(node_factory, pki, tmp_path):
    node, port = _tls_node(node_factory, pki)
    assert echoscu(port, *client(pki, "PACS-CLIENT")).returncode == 0
    assert echoscu(port, "+tla", "+cf", str(pki / "ca.pem")).returncode == 0  # no client certificate: optional
    make_cxr(tmp_path / "a.dcm", rows=64, cols=64)
    r = subprocess.run(
        [
            "storescu",
            *client(pki, "PACS-CLIENT"),
            "-aec",
            "DICOM_NODE",
            "127.0.0.1",
            str(port),
            str(tmp_path / "a.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert node.status()["instances"]["total"] == 1
    assert echoscu(node.port).returncode == 0  # the plain listener still answers
    assert echoscu(port).returncode != 0  # plain DICOM on the TLS port gets nowhere
    assert node.proc.poll() is None


def test_mutual_tls_admits_only_the_named_clients(node_factory, pki):
    node, port = _tls_node(node_factory, pki, require_client_certificate=True, allowed_client_names=["PACS-CLIENT"])
    assert echoscu(port, *client(pki, "PACS-CLIENT")).returncode == 0
    assert echoscu(port, "+tla", "+cf", str(pki / "ca.pem")).returncode != 0  # no certificate
    assert echoscu(port, *client(pki, "INTRUDER")).returncode != 0  # signed by the CA, but not named
    wait_for(lambda: "not in node.tls.allowed_client_names" in node.log(), 5, what="the refusal in the log")
    assert "INTRUDER" in node.log()


def test_a_stalled_tls_handshake_holds_up_nobody(node_factory, pki):
    node, port = _tls_node(node_factory, pki)
    stalled = [connect(port, "127.0.0.5") for _ in range(3)]  # TCP open, no ClientHello
    assert echoscu(port, *client(pki, "PACS-CLIENT")).returncode == 0
    for s in stalled:
        assert closed_by_peer(s, 6) is not None
    assert "TLS handshake failed" in node.log()


def test_tls_connections_over_the_per_host_limit_get_the_transient_rejection(node_factory, pki):
    """A host at its connection limit on the TLS port: its next TLS association gets the A-ASSOCIATE-RJ a sender
    retries (after a TLS handshake), as on the plain port; a client certificate not on the list gets no answer,
    and one that never starts its handshake is just closed."""
    node, port = _tls_node(
        node_factory,
        pki,
        {"max_connections_per_peer": 1},
        require_client_certificate=True,
        allowed_client_names=["PACS-CLIENT"],
    )
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "PACS-CLIENT.pem"), str(pki / "PACS-CLIENT.key"))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE", tls_args=(ctx, "127.0.0.1"))
    assert held.is_established  # the host's one connection
    try:
        res = echoscu(port, *client(pki, "PACS-CLIENT"))
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "Rejected Transient" in out and "Local Limit Exceeded" in out, out
        intruder = echoscu(port, *client(pki, "INTRUDER"))  # signed by the CA, not on the list: no answer at all
        assert intruder.returncode != 0 and "Rejected" not in intruder.stdout + intruder.stderr
        wait_for(lambda: "not in node.tls.allowed_client_names" in node.log(), 5, what="the intruder's refusal")
        silent = connect(port)  # over the limit too, and no ClientHello: closed after the request wait (2 s)
        waited = closed_by_peer(silent, 6)
        assert waited is not None and waited < 4, waited
        assert held.send_c_echo().Status == 0x0000  # the held association is served meanwhile
    finally:
        held.release()
    wait_for(lambda: echoscu(port, *client(pki, "PACS-CLIENT")).returncode == 0, 5, what="the host served again")
    assert node.log().count("connections per host") >= 2 and node.proc.poll() is None


def test_results_reach_an_orthanc_that_speaks_only_tls(pki, tmp_path):
    pacs = Orthanc(
        tmp_path / "orthanc",
        route=False,
        dicomweb=False,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki / "server.pem"),
            "DicomTlsPrivateKey": str(pki / "server.key"),
            "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ).start()
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "var", 0)
    try:
        config = Config.model_validate(
            {
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": pacs.aet,
                        "host": "127.0.0.1",
                        "port": pacs.port,
                        "mode": "live",
                        "tls": {
                            "ca_certificates": str(pki / "ca.pem"),
                            "certificate": str(pki / "NODE-CLIENT.pem"),
                            "private_key": str(pki / "NODE-CLIENT.key"),
                        },
                    }
                ],
                "delivery": {"connect_timeout_s": 5, "dimse_timeout_s": 10},
            }
        )
        study = generate_uid()
        ds = make_cxr(rows=32, cols=32, study_uid=study)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        meta = InstanceMeta(ds.SOPInstanceUID, study, ds.SeriesInstanceUID, str(ds.SOPClassUID), "", "DX", "CHEST",
                            "PA", "PACS", True, None)  # fmt: skip
        store.add_instance(buf.getvalue(), meta, 0)
        job = store.study_stable(study)
        assert store.claim_job("w", 60) is not None
        result = ResultSpec("sc", ds.SOPInstanceUID, str(ds.SOPClassUID), ds.SeriesInstanceUID, None, buf.getvalue(),
                            ("pacs",))  # fmt: skip
        store.finish_job(job, "w", [result])
        assert Sender(config, store).run_due() == 1
        assert store.status()["deliveries"]["delivered"] == 1
        assert len(pacs.instances_by_modality(study, "DX")) == 1
        # plain DICOM is refused by that Orthanc: the TLS was real
        r = subprocess.run(["echoscu", "-to", "5", "-aec", pacs.aet, "127.0.0.1", str(pacs.port)], capture_output=True)
        assert r.returncode != 0
    finally:
        store.close()
        pacs.stop()
