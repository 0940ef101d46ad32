"""STOW-RS ingest (PS3.18 10.5): ``POST /dicom-web/studies`` and ``POST /dicom-web/studies/{uid}`` on the node's web
server, ``multipart/related; type="application/dicom"``.

- **Same path as C-STORE.** Each part is streamed into its own file in the spool's tmp folder (python-multipart's
  streaming parser; never the whole body in memory) and, once the whole body has arrived, handed to
  :meth:`dicom_node.ingest.store_handler.StoreHandler.store_file`: the same checks, selection, durable store,
  statuses, audit trail and metrics, with the calling name ``STOW:<user>``.
- **Durable before it answers.** 200 (all stored) or 202 (some failed) only after every stored file is fsync'd and
  its row committed; 409 when none was stored. A body that is truncated, stalls longer than
  ``dicomweb.read_timeout_s``, exceeds ``dicomweb.max_request_mb`` or is not multipart stores nothing of it and
  leaves nothing in tmp/ (400, 408, 413, 415).
- **A study in one request is complete** when the request ends: its timer is due at once (no stability wait).
- **Never anonymous.** Bearer tokens or HTTP Basic users (``dicomweb`` in config.yaml, or the environment); wrong or
  missing credentials get 401 with ``WWW-Authenticate``; repeated failures from one address wait (429).

The response is the PS3.18 store response: ReferencedSOPSequence (with RetrieveURL), and FailedSOPSequence with
each FailureReason, which is the C-STORE status the same instance would have got (0xA700 out of resources, 0xA900
does not match, 0xC210 cannot understand, ...). It is DICOM JSON (``application/dicom+json``), or the Native DICOM
Model of PS3.19 Annex A (``application/dicom+xml``) when the client's Accept prefers it; an Accept that allows
neither gets 406 before the body is read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicom_node import audit, metrics
from dicom_node.config import Config
from dicom_node.ingest.statuses import UNDECODABLE
from dicom_node.ingest.store_handler import StoreHandler, StoreOutcome
from dicom_node.passwords import verify_password
from dicom_node.web.auth import LoginThrottle

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
# what a store response can be, in the server's order of preference (plain application/json: for clients that ask
# for JSON without naming DICOM's media type)
RESPONSE_TYPES = (DICOM_JSON, DICOM_XML, "application/json")
REALM = 'Basic realm="dicom-node STOW-RS", Bearer realm="dicom-node STOW-RS"'
MAX_PART_HEADERS = 16


class BodyError(Exception):
    """The request body cannot be taken: ``status`` and a short reason for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class Part:
    path: Path
    content_type: str = ""
    complete: bool = False


@dataclass
class _Reader:
    """python-multipart callbacks writing each part into its own file in ``tmp``."""

    tmp: Path
    parts: list[Part] = field(default_factory=list)
    ended: bool = False
    _file: IO[bytes] | None = None
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _headers: dict[str, str] = field(default_factory=dict)

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, a, b: self._field.extend(d[a:b]),
            "on_header_value": lambda d, a, b: self._value.extend(d[a:b]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self._headers = {}

    def header_end(self) -> None:
        if len(self._headers) >= MAX_PART_HEADERS:
            raise BodyError(400, "too many part headers")
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def headers_finished(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".stow.part")
        self._file = os.fdopen(fd, "wb")
        ctype = parse_options_header(self._headers.get("content-type", ""))[0].decode("latin-1").lower()
        self.parts.append(Part(Path(name), ctype))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])

    def part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.parts[-1].complete = True

    def end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for p in self.parts:
            p.path.unlink(missing_ok=True)


class Credentials:
    """Who may store: bearer tokens and HTTP Basic users. A verified Basic password is remembered (as an HMAC under
    a per-process key) so that a client storing many requests pays the scrypt check once."""

    def __init__(self, config: Config):
        self.tokens = [t.encode() for t in config.dicomweb.all_tokens()]
        self.users = config.dicomweb.all_users()
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}

    @property
    def any(self) -> bool:
        return bool(self.tokens or self.users)

    def user(self, header: str) -> str | None:
        """The authenticated name ("token" for a bearer token), or None."""
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            sent = value.encode()
            ok = False
            for t in self.tokens:  # compare with every token: no early exit that times which one matched
                ok |= hmac.compare_digest(sent, t)
            return "token" if ok else None
        if scheme.lower() == "basic" and value:
            try:
                name, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            hashed = self.users.get(name)
            if not sep or hashed is None:
                return None
            mac = hmac.new(self._key, f"{name}\0{password}\0{hashed}".encode(), hashlib.sha256).digest()
            known = self._verified.get(name)
            if known is not None and hmac.compare_digest(known, mac):
                return name
            if verify_password(password, hashed):
                self._verified[name] = mac
                return name
        return None


def store_response(
    outcomes: list[StoreOutcome], failed_parts: list[tuple[str, str, int]], base_url: str
) -> tuple[int, Dataset]:
    """The PS3.18 store response (Table 10.5.3-1) and its HTTP status: 200 all stored, 202 some, 409 none."""
    ds = Dataset()
    referenced, failed = [], []
    studies = set()
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class_uid
        item.ReferencedSOPInstanceUID = o.sop_instance_uid
        if o.stored:
            studies.add(o.study_uid)
            item.RetrieveURL = f"{base_url}/studies/{o.study_uid}/instances/{o.sop_instance_uid}"
            referenced.append(item)
        else:
            item.FailureReason = o.status.code
            failed.append(item)
    for sop_class, sop_uid, code in failed_parts:  # parts that are not DICOM at all: no UIDs to name
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        item.FailureReason = code
        failed.append(item)
    if len(studies) == 1:
        ds.RetrieveURL = f"{base_url}/studies/{next(iter(studies))}"
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    status = 200 if not failed else 202 if referenced else 409
    return status, ds


def native_dicom_xml(ds: Dataset) -> bytes:
    """``ds`` in the Native DICOM Model (PS3.19 Annex A.1): ``NativeDicomModel`` holding one ``DicomAttribute``
    (tag, vr, keyword) per element in tag order, its values as ``Value number="n"`` and a sequence's items as
    ``Item number="n"``; an empty element has neither."""
    root = ET.Element("NativeDicomModel", xmlns=NATIVE_DICOM_NS)
    root.set("xml:space", "preserve")
    _xml_attributes(root, ds)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _xml_attributes(parent: ET.Element, ds: Dataset) -> None:
    for elem in ds:  # a Dataset iterates in tag order
        attr = ET.SubElement(parent, "DicomAttribute", {"tag": f"{elem.tag:08X}", "vr": elem.VR})
        keyword = keyword_for_tag(elem.tag)
        if keyword:
            attr.set("keyword", keyword)
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value, 1):
                _xml_attributes(ET.SubElement(attr, "Item", number=str(n)), item)
            continue
        if elem.value is None or elem.value == "":
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        for n, v in enumerate(values, 1):
            ET.SubElement(attr, "Value", number=str(n)).text = str(v)


def negotiate(accept: str) -> str | None:
    """The store response's media type for the request's Accept header (RFC 9110 12.5.1: the most specific range
    that matches gives a type its quality; the highest quality wins, ties in :data:`RESPONSE_TYPES` order), or None
    when the client accepts none of them (406). No Accept, or ``*/*``: DICOM JSON."""
    if not accept.strip():
        return DICOM_JSON
    ranges: list[tuple[str, str, float]] = []
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        kind, _, sub = media.strip().lower().partition("/")
        if not kind:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        ranges.append((kind, sub.strip() or "*", q))
    best, best_q = None, 0.0
    for offer in RESPONSE_TYPES:
        kind, _, sub = offer.partition("/")
        quality = None  # of the most specific range that matches: type/subtype, then type/*, then */*
        for pattern in ((kind, sub), (kind, "*"), ("*", "*")):
            quality = next((q for k, st, q in ranges if (k, st) == pattern), None)
            if quality is not None:
                break
        if quality is not None and quality > best_q:
            best, best_q = offer, quality
    return best


class Stow:
    """The STOW-RS routes, bound to the node's store handler."""

    def __init__(self, config: Config, handler: StoreHandler):
        self.config = config
        self.handler = handler
        self.tmp = handler.store.spool.tmp
        self.credentials = Credentials(config)
        self.throttle = LoginThrottle()
        self.max_bytes = int(config.dicomweb.max_request_mb * (1 << 20))
        if config.dicomweb.enabled and not self.credentials.any:
            log.warning(
                "dicomweb.enabled but no bearer token or user is configured: every STOW-RS request gets 401 "
                "(dicomweb.tokens, dicomweb.users, DICOM_NODE_STOW_TOKENS, DICOM_NODE_STOW_USERS)"
            )

    def routes(self) -> list[Route]:
        return [
            Route("/dicom-web/studies", self.post, methods=["POST"]),
            Route("/dicom-web/studies/{study_uid}", self.post, methods=["POST"]),
        ]

    def _error(self, status: int, reason: str, peer: str, user: str | None, **headers: str) -> Response:
        metrics.STOW_REQUESTS.labels(str(status)).inc()
        audit.event("stow_request", peer=peer, user=user, status=status, reason=reason)
        log.warning("STOW-RS from %s (%s): %d %s", peer, user or "not authenticated", status, reason)
        return JSONResponse({"error": reason}, status_code=status, headers=headers or None)

    async def post(self, request: Request) -> Response:
        t0 = time.perf_counter()
        peer = request.client.host if request.client else "?"
        if self.throttle.blocked(peer):
            return self._error(429, "too many failed authentications; try later", peer, None)
        user = self.credentials.user(request.headers.get("authorization", "")) if self.credentials.any else None
        if user is None:
            self.throttle.failed(peer)
            return self._error(401, "authentication required", peer, None, **{"WWW-Authenticate": REALM})
        self.throttle.succeeded(peer)
        answer_type = negotiate(request.headers.get("accept", ""))
        if answer_type is None:
            return self._error(406, f"Accept allows neither {DICOM_JSON} nor {DICOM_XML}", peer, user)
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if ctype.lower() != b"multipart/related" or not boundary:
            return self._error(415, 'expected multipart/related; type="application/dicom"', peer, user)
        part_type = params.get(b"type", b"application/dicom").decode("latin-1").lower()
        if part_type != "application/dicom":
            return self._error(415, f"type={part_type} is not supported (application/dicom only)", peer, user)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return self._error(413, self._too_big(), peer, user)
        reader = _Reader(self.tmp)
        try:
            parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
            await self._read_body(request, reader, parser)
        except BodyError as exc:
            await run_in_threadpool(reader.discard)
            return self._error(exc.status, str(exc), peer, user)
        except BaseException:
            await run_in_threadpool(reader.discard)
            raise
        calling = f"STOW:{user}"[:64]
        expected = request.path_params.get("study_uid")
        try:
            outcomes, bad_parts = await run_in_threadpool(self._store_parts, reader, calling, peer, expected)
        finally:
            await run_in_threadpool(reader.discard)
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        status, answer = store_response(outcomes, bad_parts, base)
        stored = sum(1 for o in outcomes if o.stored)
        failed = len(outcomes) - stored + len(bad_parts)
        metrics.STOW_REQUESTS.labels(str(status)).inc()
        audit.event("stow_request", peer=peer, user=user, status=status, stored=stored, failed=failed)
        log.info(
            "STOW-RS from %s (%s): %d stored, %d failed in %.0f ms -> %d",
            peer,
            user,
            stored,
            failed,
            (time.perf_counter() - t0) * 1000,
            status,
        )
        if answer_type == DICOM_XML:
            return Response(native_dicom_xml(answer), status_code=status, media_type=DICOM_XML)
        return JSONResponse(answer.to_json_dict(), status_code=status, media_type=answer_type)

    def _too_big(self) -> str:
        return f"request larger than dicomweb.max_request_mb ({self.max_bytes >> 20} MB)"

    async def _read_body(self, request: Request, reader: _Reader, parser: MultipartParser) -> None:
        """Feed the body to the parser as it arrives; BodyError when it is too big, stalls, ends early or is not
        multipart."""
        received = 0
        timeout = self.config.dicomweb.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), timeout)
            except TimeoutError:
                raise BodyError(408, f"no data for {timeout:g} s (dicomweb.read_timeout_s)") from None
            if message["type"] == "http.disconnect":
                raise BodyError(400, "the client went away before the end of the body")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                raise BodyError(413, self._too_big())
            if chunk:
                try:
                    await run_in_threadpool(parser.write, chunk)
                except BodyError:
                    raise
                except Exception as exc:
                    if isinstance(exc, OSError) and exc.errno is not None:
                        raise BodyError(503, f"cannot write the body to the spool ({exc.strerror})") from exc
                    raise BodyError(400, f"malformed multipart body ({type(exc).__name__})") from exc
            if not message.get("more_body", False):
                break
        if not reader.ended:
            raise BodyError(400, "truncated multipart body (no closing boundary)")
        if not reader.parts:
            raise BodyError(400, "no part in the multipart body")

    def _store_parts(
        self, reader: _Reader, calling: str, peer: str, expected: str | None
    ) -> tuple[list[StoreOutcome], list[tuple[str, str, int]]]:
        """Each complete part through the C-STORE path; then each study that got an instance is complete now."""
        outcomes: list[StoreOutcome] = []
        bad: list[tuple[str, str, int]] = []
        for part in reader.parts:
            if part.content_type not in ("", "application/dicom"):
                log.warning("STOW-RS from %s: a part of type %s refused", calling, part.content_type[:40])
                metrics.CSTORES.labels(f"0x{UNDECODABLE.code:04X}", calling).inc()
                audit.event(
                    "instance_refused",
                    peer=peer,
                    calling_ae=calling,
                    status=f"0x{UNDECODABLE.code:04X}",
                    reason="part is not application/dicom",
                    transport="STOW-RS",
                )
                bad.append(("", "", UNDECODABLE.code))
                continue
            outcome = self.handler.store_file(
                part.path, calling=calling, peer=peer, expected_study_uid=expected, transport="STOW-RS"
            )
            outcomes.append(outcome)
        for study_uid in {o.study_uid for o in outcomes if o.stored}:
            self.handler.study_complete(study_uid)
        return outcomes, bad
