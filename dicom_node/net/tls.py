"""DICOM TLS (PS3.15 Annex B, BCP 195: TLS 1.2 or later) for the listener and the sender.

- :func:`server_context` from ``node.tls``: the node's certificate and key; with ``ca_certificates``, client
  certificates are verified against them (required with ``require_client_certificate``).
- :func:`client_context` from a destination's ``tls``: the destination's certificate must chain to its
  ``ca_certificates`` and name its host (or ``server_name``); the node's own certificate is offered when given.
- :func:`peer_names`: the names a verified client certificate carries (subject CN, DNS and IP SANs), which
  ``allowed_client_names`` is checked against.

The handshake of an accepted connection happens in that connection's own thread, bounded by
``node.acse_timeout_s`` (:mod:`dicom_node.net.transport`), so a client that stalls it holds up nobody else.
"""

from __future__ import annotations

import ssl
from typing import Any

from dicom_node.config import DestinationTLSConfig, TLSConfig
from dicom_node.errors import ConfigError


def _load(what: str, call) -> None:
    try:
        call()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot be loaded ({getattr(exc, 'strerror', None) or exc})") from exc


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("node.tls.certificate/private_key", lambda: ctx.load_cert_chain(str(tls.certificate), str(tls.private_key)))
    if tls.ca_certificates is not None:
        _load("node.tls.ca_certificates", lambda: ctx.load_verify_locations(str(tls.ca_certificates)))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: DestinationTLSConfig, destination: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    where = f"destinations[{destination}].tls"
    _load(f"{where}.ca_certificates", lambda: ctx.load_verify_locations(str(tls.ca_certificates)))
    if tls.certificate is not None:
        key = str(tls.private_key) if tls.private_key is not None else None  # None: the key is in the certificate file
        _load(f"{where}.certificate/private_key", lambda: ctx.load_cert_chain(str(tls.certificate), key))
    return ctx


def peer_names(sock: ssl.SSLSocket) -> set[str]:
    cert: Any = sock.getpeercert() or {}
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")}
    return names
