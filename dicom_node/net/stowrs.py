"""The node as a STOW-RS client: a study's result objects (SR, SC, GSPS) stored in a DICOMweb archive in ONE request
(``destinations[].type: dicomweb``).

The body is multipart/related; type="application/dicom", each part a result file's bytes exactly as the node
stored them (Part 10: nothing decoded or re-encoded), POSTed to ``{url}/studies`` with a Content-Length (no chunked
transfer, which not every archive takes), asking for a DICOM JSON store response. The outcome, per instance:

- HTTP 200: all delivered (an instance the archive nevertheless lists in FailedSOPSequence: by its reason);
- HTTP 202 / 409, or any FailedSOPSequence: each instance listed there by its FailureReason (0xA7xx out of resources:
  retried; any other reason: failed for good), each listed in ReferencedSOPSequence delivered. One in neither list:
  retried after a 202 (the archive did not say it has it), failed after a 409;
- HTTP 408, 429, 5xx, a refused connection, a timeout: the whole request is retried with backoff;
- HTTP 400, 401, 403, 404 and every other 4xx, 3xx (redirects are not followed): failed for good (wrong URL,
  credentials or request: retrying would not help; ``dicom-node retry`` after fixing it).

Messages name the archive's host and the statuses, never a secret, a study or a patient.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import requests

from dicom_node.config import DicomWebDestinationConfig
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.net.channels import PeerUnreachable

FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"
TRANSIENT_HTTP = {408, 429}
Outcome = Exception | None  # per instance: None delivered, else the error (transient or permanent)


def where(url: str) -> str:
    """The archive's host and port (never user:password@, never a query)."""
    parts = urlsplit(url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "the archive"


def classify_reason(reason: int | None, host: str) -> Exception:
    """The error for an instance the archive lists in FailedSOPSequence."""
    if reason is None:
        return PermanentDeliveryError(f"STOW-RS: {host} refused the instance (no FailureReason)")
    if (reason & 0xFF00) == 0xA700:  # out of resources: the archive may take it later
        return TransientDeliveryError(f"STOW-RS: {host} is out of resources (FailureReason 0x{reason:04X})")
    return PermanentDeliveryError(f"STOW-RS: {host} refused the instance (FailureReason 0x{reason:04X})")


def _json_items(body: Any, tag: str) -> list[dict[str, Any]]:
    element = body.get(tag) if isinstance(body, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values or [] if isinstance(v, dict)]


def _json_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if values else None


def parse_store_response(body: bytes, content_type: str) -> tuple[set[str], dict[str, int | None]]:
    """(referenced SOP Instance UIDs, {failed SOP Instance UID: FailureReason}) from a PS3.18 store response, in DICOM
    JSON or in XML (native DICOM model); empty when the body is neither."""
    referenced: set[str] = set()
    failed: dict[str, int | None] = {}
    if not body.strip():
        return referenced, failed
    if "xml" in content_type.lower():
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return referenced, failed
        for seq in root.iter():
            tag = seq.get("tag") if seq.tag.endswith("DicomAttribute") else None
            if tag not in (FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE):
                continue
            for item in (child for child in seq if child.tag.endswith("Item")):
                values: dict[str, str] = {}
                for attr in item:
                    value = attr.find("{*}Value")  # in any namespace, or none
                    if attr.get("tag") and value is not None and value.text:
                        values[str(attr.get("tag"))] = value.text.strip()
                uid = values.get(REFERENCED_SOP_INSTANCE_UID)
                if not uid:
                    continue
                if tag == REFERENCED_SOP_SEQUENCE:
                    referenced.add(uid)
                else:
                    reason = values.get(FAILURE_REASON, "")
                    failed[uid] = int(reason) if reason.isdigit() else None
        return referenced, failed
    try:
        parsed = json.loads(body)
    except ValueError:
        return referenced, failed
    if isinstance(parsed, list) and parsed:  # some archives answer a list of one dataset
        parsed = parsed[0]
    for entry in _json_items(parsed, REFERENCED_SOP_SEQUENCE):
        uid = _json_value(entry, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            referenced.add(str(uid))
    for entry in _json_items(parsed, FAILED_SOP_SEQUENCE):
        uid = _json_value(entry, REFERENCED_SOP_INSTANCE_UID)
        reason = _json_value(entry, FAILURE_REASON)
        if uid:
            failed[str(uid)] = int(reason) if isinstance(reason, int | float) else None
    return referenced, failed


def multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    chunks: list[bytes] = []
    for data in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


class StowClient:
    """STOW-RS to one ``dicomweb`` destination."""

    def __init__(self, dest: DicomWebDestinationConfig):
        self.dest = dest
        self.host = where(dest.url)

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # never via an http_proxy or a .netrc of the environment
        dest = self.dest
        if dest.username:
            password = dest.secret_password()
            if dest.password_env and password is None:
                raise PermanentDeliveryError(f"the environment variable {dest.password_env} (password_env) is not set")
            session.auth = (dest.username, password or "")
        elif dest.token or dest.token_env:
            token = dest.secret_token()
            if not token:
                raise PermanentDeliveryError(f"the environment variable {dest.token_env} (token_env) is not set")
            session.headers["Authorization"] = f"Bearer {token}"
        if dest.certificate is not None and dest.private_key is not None:
            session.cert = (str(dest.certificate), str(dest.private_key))
        if dest.ca_certificates is not None:
            session.verify = str(dest.ca_certificates)
        return session

    def store(self, instances: Sequence[tuple[str, bytes]]) -> tuple[int, dict[str, Outcome]]:
        """POST ``instances`` ((SOP Instance UID, Part 10 bytes), all of one study) in one request; returns the HTTP
        status and each instance's outcome. Raises for a failure of the whole request (PeerUnreachable for a peer
        that is down or silent)."""
        boundary = f"dicomnode-{uuid.uuid4().hex}"
        body = multipart([data for _, data in instances], boundary)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        session = self._session()
        try:
            response = session.post(
                self.dest.url + "/studies",
                data=body,
                headers=headers,
                timeout=self.dest.timeout_s,
                allow_redirects=False,
            )
            answer = response.content[: 16 * 1024 * 1024]
        except requests.Timeout:
            raise PeerUnreachable(f"STOW-RS: {self.host} did not answer in {self.dest.timeout_s:g} s") from None
        except requests.exceptions.SSLError:
            raise PeerUnreachable(f"STOW-RS: TLS with {self.host} failed") from None
        except requests.RequestException as exc:  # refused, reset, unreachable
            raise PeerUnreachable(f"STOW-RS: cannot connect to {self.host} ({type(exc).__name__})") from None
        finally:
            session.close()
        code = response.status_code
        if code not in (200, 202, 409):
            why = f"STOW-RS: HTTP {code} from {self.host}"
            if code in TRANSIENT_HTTP or code >= 500:
                raise TransientDeliveryError(why)
            if code in (401, 403):
                why += " (check the destination's credentials)"
            raise PermanentDeliveryError(why)
        referenced, failed = parse_store_response(answer, response.headers.get("Content-Type", ""))
        outcomes: dict[str, Outcome] = {}
        for uid, _ in instances:
            if uid in failed:
                outcomes[uid] = classify_reason(failed[uid], self.host)
            elif code == 200 or uid in referenced:
                outcomes[uid] = None
            elif code == 202:
                outcomes[uid] = TransientDeliveryError(f"STOW-RS: HTTP 202 from {self.host} without this instance")
            else:
                outcomes[uid] = PermanentDeliveryError(f"STOW-RS: HTTP 409 from {self.host}")
        return code, outcomes
