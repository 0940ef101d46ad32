"""Sending notification payloads: HL7 v2 over MLLP, FHIR and webhooks over HTTP(S), email over SMTP.

The analyser made each payload when it analysed the study (:mod:`dicom_node.outputs.messages`); the sender hands
it here with its destination. A channel returns when the peer took it and raises
:class:`~dicom_node.errors.TransientDeliveryError` (retried with backoff) or
:class:`~dicom_node.errors.PermanentDeliveryError` (failed at once; ``dicom-node retry`` or the console re-queues):

- MLLP (python-hl7's asyncio client, optional TLS): the ACK's MSA-1 AA (or CA) is delivered; AE (CE) is retried;
  AR (CR) is failed. No ACK, a timeout, a refused or closed connection, an ACK to another message: retried.
- HTTP (FHIR, webhooks, Teams, Slack): 2xx delivered; 408, 425, 429 and 5xx, timeouts and connection errors
  retried; any other status failed (4xx: the request is wrong, the token or the URL; 3xx: redirects are not
  followed, configure the final URL).
- SMTP: 4xx replies and connection errors retried; 5xx replies (a refused sender, recipient or login) failed.

Secrets (bearer token, HMAC key, SMTP password) are read from the configuration or the environment when a message
is sent, and never logged. A webhook body is signed: ``X-Dicom-Node-Signature-256: sha256=<hex>``, the HMAC-SHA256
of the exact body bytes with the destination's key (README: how to verify).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import smtplib
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import hl7
from hl7.mllp import open_hl7_connection

from dicom_node.config import (
    EmailDestinationConfig,
    FHIRDestinationConfig,
    HL7DestinationConfig,
    NotificationConfig,
    WebhookDestinationConfig,
    secret,
)
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.net.tls import client_context

__all__ = ["Channels", "PeerUnreachable", "signature", "SIGNATURE_HEADER"]

SIGNATURE_HEADER = "X-Dicom-Node-Signature-256"
DELIVERY_HEADER = "X-Dicom-Node-Delivery"
TRANSIENT_HTTP = {408, 425, 429}


class PeerUnreachable(TransientDeliveryError):
    """The peer could not be reached or did not answer in time (the sender tries the rest of its batch later)."""


def signature(key: str | bytes, body: bytes) -> str:
    """The value of the signature header: ``sha256=`` and the hex HMAC-SHA256 of ``body`` under ``key``."""
    raw = key.encode() if isinstance(key, str) else key
    return "sha256=" + hmac.new(raw, body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a POST is never turned into a GET elsewhere: the 3xx is reported as it is


class Channels:
    """Sends one notification payload to its destination (contexts for TLS made once, at start)."""

    def __init__(self, destinations: list[NotificationConfig]):
        self._tls: dict[str, ssl.SSLContext] = {}
        for d in destinations:
            if d.tls is not None:
                self._tls[d.name] = client_context(d.tls, d.name)
            elif d.type in ("fhir", "webhook") or (d.type == "email" and d.security != "none"):
                self._tls[d.name] = ssl.create_default_context()

    def send(self, dest: NotificationConfig, payload: bytes, delivery_id: int) -> str:
        """Send ``payload``; returns what the peer said (for the log). Raises a DeliveryError."""
        if isinstance(dest, HL7DestinationConfig):
            return self._mllp(dest, payload)
        if isinstance(dest, FHIRDestinationConfig):
            token = secret(dest.token, dest.token_env)
            if dest.token_env and not token:
                raise PermanentDeliveryError(f"the environment variable {dest.token_env} (token_env) is not set")
            headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            return self._post(dest, dest.url, payload, headers)
        if isinstance(dest, WebhookDestinationConfig):
            key = secret(dest.hmac_key, dest.hmac_key_env)
            if dest.hmac_key_env and not key:
                raise PermanentDeliveryError(f"the environment variable {dest.hmac_key_env} (hmac_key_env) is not set")
            headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(delivery_id)}
            if key:
                headers[SIGNATURE_HEADER] = signature(key, payload)
            return self._post(dest, dest.url, payload, headers)
        if isinstance(dest, EmailDestinationConfig):
            return self._smtp(dest, payload)
        raise PermanentDeliveryError(f"no channel for destination type {getattr(dest, 'type', '?')!r}")

    # ---- MLLP ------------------------------------------------------------------------------------------------
    def _mllp(self, dest: HL7DestinationConfig, payload: bytes) -> str:
        try:
            control_id = hl7.parse(payload.decode("ascii")).segment("MSH")(10)
        except (UnicodeDecodeError, hl7.ParseException, KeyError, IndexError) as exc:
            raise PermanentDeliveryError(f"the stored HL7 message does not parse ({type(exc).__name__})") from exc
        try:
            ack = asyncio.run(self._exchange(dest, payload))
        except TimeoutError:
            raise PeerUnreachable(f"no ACK from {dest.host}:{dest.port} within {dest.timeout_s:g} s") from None
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            raise PeerUnreachable(f"cannot send to {dest.host}:{dest.port} ({type(exc).__name__}: {exc})") from None
        except (hl7.ParseException, ValueError) as exc:
            raise TransientDeliveryError(f"the answer is not an HL7 ACK ({type(exc).__name__})") from None
        try:
            code = str(ack.segment("MSA")(1)).upper()
            acked = str(ack.segment("MSA")(2))
            text = str(ack.segment("MSA")(3)) if len(ack.segment("MSA")) > 3 else ""
        except (KeyError, IndexError):
            raise TransientDeliveryError("the answer has no MSA segment") from None
        why = f"ACK {code}" + (f": {text[:200]}" if text else "")
        if acked != str(control_id):
            raise TransientDeliveryError(f"ACK for another message ({acked[:40]!r}, sent {str(control_id)!r})")
        if code in ("AA", "CA"):
            return why
        if code in ("AR", "CR"):
            raise PermanentDeliveryError(f"rejected by {dest.host}:{dest.port}: {why}")
        if code in ("AE", "CE"):
            raise TransientDeliveryError(f"application error at {dest.host}:{dest.port}: {why}")
        raise TransientDeliveryError(f"unknown acknowledgment code: {why}")

    async def _exchange(self, dest: HL7DestinationConfig, payload: bytes) -> hl7.Message:
        ctx = self._tls.get(dest.name)
        extra: dict[str, Any] = {}
        if ctx is not None:
            extra = {"ssl": ctx, "server_hostname": (dest.tls.server_name if dest.tls else None) or dest.host}
        async with asyncio.timeout(dest.timeout_s):
            reader, writer = await open_hl7_connection(dest.host, dest.port, encoding="ascii", **extra)
            try:
                writer.writeblock(payload)
                await writer.drain()
                return await reader.readmessage()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ssl.SSLError):
                    pass

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def _post(self, dest: Any, url: str, payload: bytes, headers: dict[str, str]) -> str:
        handlers: list[Any] = [_NoRedirect()]
        if url.startswith("https:"):
            handlers.append(urllib.request.HTTPSHandler(context=self._tls.get(dest.name)))
        opener = urllib.request.build_opener(*handlers)
        where = urlsplit(url).netloc  # never the path: a Teams or Slack webhook URL's path is its secret
        request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=dest.timeout_s) as response:
                response.read(65536)
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            status = exc.code
            why = f"HTTP {status} {exc.reason} from {where}"
            if status in TRANSIENT_HTTP or status >= 500:
                raise TransientDeliveryError(why) from None
            raise PermanentDeliveryError(why) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timeout, TLS
            reason = getattr(exc, "reason", exc)
            raise PeerUnreachable(f"cannot POST to {where} ({reason})") from None

    # ---- SMTP ------------------------------------------------------------------------------------------------
    def _smtp(self, dest: EmailDestinationConfig, payload: bytes) -> str:
        password = secret(dest.password, dest.password_env)
        if dest.password_env and not password:
            raise PermanentDeliveryError(f"the environment variable {dest.password_env} (password_env) is not set")
        ctx = self._tls.get(dest.name)
        try:
            smtp: smtplib.SMTP
            if dest.security == "tls":
                smtp = smtplib.SMTP_SSL(dest.host, dest.port, timeout=dest.timeout_s, context=ctx)
            else:
                smtp = smtplib.SMTP(dest.host, dest.port, timeout=dest.timeout_s)
            with smtp:
                if dest.security == "starttls":
                    smtp.starttls(context=ctx)
                if dest.username:
                    smtp.login(dest.username, password or "")
                refused = smtp.sendmail(dest.from_address, list(dest.to), payload)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            error = TransientDeliveryError if all(400 <= c < 500 for c in codes) else PermanentDeliveryError
            raise error(f"SMTP: every recipient refused ({', '.join(map(str, codes))})") from None
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused, login refused, ...
            error = TransientDeliveryError if 400 <= exc.smtp_code < 500 else PermanentDeliveryError
            raise error(f"SMTP {exc.smtp_code} from {dest.host}:{dest.port}") from None
        except smtplib.SMTPNotSupportedError as exc:  # e.g. no STARTTLS or AUTH: the configuration is wrong
            raise PermanentDeliveryError(f"SMTP server {dest.host}:{dest.port}: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:  # disconnected, refused, timeout, TLS
            raise PeerUnreachable(f"cannot send mail via {dest.host}:{dest.port} ({type(exc).__name__})") from None
        if refused:
            return f"accepted for {len(dest.to) - len(refused)} of {len(dest.to)} recipients"
        return "accepted"
