"""DICOM TLS (PS3.15 Annex B, BCP 195: TLS 1.2 or later) for the listener and the sender.

- :func:`server_context` from ``node.tls``: the node's certificate and key; with ``ca_certificates``, client
  certificates are verified against them (required with ``require_client_certificate``).
- :func:`client_context` from a destination's ``tls``: the destination's certificate must chain to its
  ``ca_certificates`` and name its host (or ``server_name``); the node's own certificate is offered when given.
- :func:`peer_names`: the names a verified client certificate carries (subject CN, DNS and IP SANs), which
  ``allowed_client_names`` is checked against.
- :class:`TLSAccept`, :func:`wrap_accepted`, :func:`finish_handshake`: how the listener accepts a TLS connection.
  pynetdicom completes the handshake in the server's only accepting thread, where one client that connects
  and says nothing stops every other TLS client. Here the accepting thread only wraps the socket
  (:class:`dicom_node.net.acceptor.AcceptorServer`); the handshake happens in that connection's own thread,
  bounded by ``node.acse_timeout_s``, so a client that stalls it holds up nobody else.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from dicom_node import audit
from dicom_node.config import DestinationTLSConfig, TLSConfig
from dicom_node.errors import ConfigError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TLSAccept:
    """How the TLS listener finishes a connection in its own thread: the handshake within
    ``handshake_timeout_s``, then reads bounded by ``read_timeout_s``; ``allowed_names``: when not empty, the
    client certificate must carry one of these names (CN, DNS or IP)."""

    handshake_timeout_s: float
    read_timeout_s: float
    allowed_names: frozenset[str] = frozenset()


def wrap_accepted(ctx: ssl.SSLContext, client: socket.socket) -> ssl.SSLSocket:
    """An accepted connection wrapped for TLS, its handshake left to :func:`finish_handshake`."""
    return ctx.wrap_socket(client, server_side=True, do_handshake_on_connect=False)


def finish_handshake(sock: ssl.SSLSocket, accept: TLSAccept, host: str) -> bool:
    """Complete the TLS handshake (bounded), check the client's names; False: the connection is refused (the
    reason is logged and audited)."""
    try:
        sock.settimeout(accept.handshake_timeout_s)
        sock.do_handshake()
        sock.settimeout(accept.read_timeout_s)  # stalls inside a PDU end the connection
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "reason", None) or "timeout"
        return _refused(host, f"TLS handshake failed ({type(exc).__name__}: {why})")
    return client_allowed(sock, accept, host)


def client_allowed(sock: ssl.SSLSocket, accept: TLSAccept, host: str) -> bool:
    """After the handshake: does the client certificate carry one of ``allowed_names`` (when there are any)?
    False is logged and audited."""
    if accept.allowed_names:
        names = peer_names(sock)
        if not names & accept.allowed_names:
            return _refused(host, f"client certificate {sorted(names)} not in node.tls.allowed_client_names")
    return True


def _refused(host: str, reason: str) -> bool:
    log.warning("connection from %s refused: %s", host, reason)
    audit.event("connection_refused", peer=host, reason=reason)
    return False
