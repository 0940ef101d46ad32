"""The C-STORE handler: a received data set in, a committed spool file and row out, then the status.

A C-STORE is answered 0x0000 only after the received bytes (never decoded and re-encoded) are fsync'd in the
spool and the instance row is committed. pynetdicom streams each received data set straight into a file in
the spool's tmp folder (``STORE_RECV_CHUNKED_DATASET``, set by the composition root: preamble, file meta, then
the bytes as received), so the handler reads only the header and hard-links that file into place: no copy of
the pixel data in memory.

The handler never raises into pynetdicom: every failure becomes the status that
:mod:`dicom_node.ingest.statuses` gives its error, with an ErrorComment, and the reason is logged without PHI.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from dicom_node import audit, metrics
from dicom_node.config import Config
from dicom_node.errors import (
    InflatedTooLargeError,
    InstanceRejected,
    InvalidUIDError,
    MissingUIDError,
    UIDMismatchError,
    UndecodableInstanceError,
)
from dicom_node.ingest.selection import device_fields, header_fields, select
from dicom_node.ingest.statuses import STORED, StoreStatus, status_for
from dicom_node.logs import safe_traceback
from dicom_node.net.fastpath import start_flush
from dicom_node.net.spoolfile import full_disk_error
from storage import Store
from storage.errors import DiskFullError, StorageError
from storage.ingest import InstanceMeta

log = logging.getLogger(__name__)

IMAGE_CLASSES_ANALYSED = {
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
}

_KNOWN_VRS = frozenset(v.value for v in VR)
# Digits and dots, no empty component, at most 64 characters. Components with leading zeros are not valid either,
# but old modalities write them and PACS accept them: refusing those would lose real images.
_UID_CHARS = re.compile(r"[0-9]+(\.[0-9]+)*")
PIXEL_DATA = 0x7FE00010
C_STORE_HIGH = 1  # the C-STORE request's Priority: 0 MEDIUM (what most senders send), 1 HIGH, 2 LOW


def _element_label(tag) -> str:
    """An element named for a status or the log: its tag, then its keyword when the dictionary has one."""
    keyword = keyword_for_tag(tag)
    return f"{Tag(tag)} {keyword}" if keyword else str(Tag(tag))


def _vr_text(vr: bytes | str | None) -> str:
    """A VR as received, quoted when it is printable ASCII, else in hex (it is the peer's garbage)."""
    if vr is None:
        return "?"
    raw = vr.encode("latin-1", "replace") if isinstance(vr, str) else vr
    text = raw.decode("latin-1")
    return f"'{text}'" if text.isascii() and text.isprintable() else f"0x{raw.hex()}"


def bad_vr_error(tag, vr: bytes | str | None) -> UndecodableInstanceError:
    """The refusal of a data set with an element whose VR is not a DICOM VR. The element comes first in the
    message: the ErrorComment keeps only 64 characters."""
    return UndecodableInstanceError(f"dataset cannot be decoded: bad VR {_vr_text(vr)} in {_element_label(tag)}")


def check_explicit_vrs(ds: Dataset, path: Path | None) -> None:
    """In an explicit VR data set, no element may lose its VR part way through.

    pydicom reads an element whose VR is not two capital letters (``config.assume_implicit_vr_switch``) as if
    the writer had switched to implicit VR there, and goes on: the VR's two bytes become half of a length, the
    rest of the data set is misread from there and may silently end early - the Pixel Data with it. Such an
    element is the first one read without a VR (``RawDataElement.VR`` None) after elements read with theirs;
    it is refused, named, with the VR as received (read back from ``path``; None: not available, as in a
    deflated data set). A data set implicit from its first element (explicit VR announced, implicit VR
    written: old writers do that) is read as implicit VR, as before; :func:`check_complete` still catches a
    misreading of it."""
    if ds.original_encoding[0] is not False:  # implicit VR transfer syntax: no element has a VR of its own
        return
    explicit = None  # whether the first element read as received carried its VR
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement):
            continue  # converted already by pydicom (Specific Character Set)
        if explicit is None:
            explicit = raw.VR is not None
        elif explicit and raw.VR is None:
            vr = None
            if path is not None and raw.value_tell is not None and raw.value_tell >= 4:
                with open(path, "rb") as f:  # read as implicit: tag (4), length (4, the VR's 2 bytes first)
                    f.seek(raw.value_tell - 4)
                    vr = f.read(2) or None
            raise bad_vr_error(tag, vr)


def check_decodable(ds: Dataset) -> None:
    """pydicom parses lazily: find broken data now rather than in the worker later. Every element must have
    a known VR (implicit VR data sets get theirs from the dictionary) and every sequence must parse, item by
    item; plain values (deferred Pixel Data included) are left as received."""
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)  # never load a deferred value (Pixel Data) here
        if isinstance(raw, RawDataElement):
            if raw.VR is not None and raw.VR not in _KNOWN_VRS:
                raise bad_vr_error(tag, raw.VR)
            if tag == PIXEL_DATA or (raw.VR not in (None, "SQ", "UN") and raw.length != 0xFFFFFFFF):
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                check_decodable(item)


def _priority_value(ds: Dataset) -> str:
    """Requested Procedure Priority as received (upper case; "" when absent), without pydicom's validation."""
    elem = ds.get_item("RequestedProcedurePriority")
    value = elem.value if elem is not None else ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip(" \x00").upper()


def requested_priority(ds: Dataset, c_store_priority: int | None) -> str:
    """What the sender asked for urgently (:mod:`dicom_node.work.priority`): "STAT" (Requested Procedure Priority,
    at the top level or in an item of the Request Attributes Sequence), "HIGH" (the C-STORE request's Priority),
    "STAT, HIGH" for both, "" for neither."""
    asked = []
    values = [_priority_value(ds)]
    try:
        values += [_priority_value(item) for item in ds.get("RequestAttributesSequence") or ()]
    except Exception:  # noqa: BLE001 - a malformed sequence asks for nothing
        pass
    if "STAT" in values:
        asked.append("STAT")
    if c_store_priority == C_STORE_HIGH:
        asked.append("HIGH")
    return ", ".join(asked)


def sop_class_name(uid: str) -> str:
    try:
        return UID(uid).name
    except Exception:  # noqa: BLE001 - a name is only for the log
        return uid


def _io_failure(exc: BaseException) -> bool:
    """An error of our own disk (it carries an errno), not pydicom's complaint about the bytes (it raises
    OSError without one for truncated data)."""
    return isinstance(exc, OSError) and exc.errno is not None


INFLATE_STEP = 16 << 20  # at most this much inflated data in memory at once while measuring


def check_inflated_size(path: Path, limit_bytes: int) -> int:
    """The size of a received deflated data set once inflated, measured with bounded memory; raises
    InflatedTooLargeError beyond ``limit_bytes`` (pydicom would inflate all of it into memory at once)."""
    with open(path, "rb") as f:
        head = f.read(144)  # preamble, "DICM", then (0002,0000) UL: the file meta group length
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            raise UndecodableInstanceError("dataset cannot be decoded (no file meta group length)")
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := f.read(1 << 20):
                while chunk:
                    total += len(inflater.decompress(chunk, INFLATE_STEP))
                    if total > limit_bytes:
                        raise InflatedTooLargeError(
                            f"deflated data set inflates beyond {limit_bytes >> 20} MB (node.max_inflated_mb)"
                        )
                    chunk = inflater.unconsumed_tail
        except zlib.error as exc:
            raise UndecodableInstanceError("dataset cannot be decoded (broken deflate stream)") from exc
    return total


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _element_name(tag) -> str:
    return keyword_for_tag(tag) or str(Tag(tag))


def check_complete(ds: Dataset, path: Path) -> None:
    """The parsed data set must account for the whole file: pydicom reads lazily and stops quietly where the
    bytes stop making sense. A value that runs past the end of the file (a truncated transfer or a lying length)
    or bytes after the last element it could parse (other than zero padding) are refused, naming the element."""
    size = path.stat().st_size
    tags = list(ds.keys())
    if not tags:
        raise UndecodableInstanceError("dataset cannot be parsed: no element after the file meta")

    def extent(tag) -> tuple[int, int] | None:
        """(offset, length) of a value still as read from the file, when its length is defined."""
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value_tell is not None and raw.length != 0xFFFFFFFF:
            return raw.value_tell, raw.length
        return None

    for tag in tags:
        where = extent(tag)
        if where is not None and where[0] + where[1] > size:
            raise UndecodableInstanceError(
                f"dataset ends inside {_element_name(tag)} ({size - where[0]} of {where[1]} bytes)"
            )
    where = extent(tags[-1])
    if where is not None and sum(where) < size:
        with open(path, "rb") as f:
            f.seek(sum(where))
            rest = f.read(1 << 16)
        if len(rest) < 1 << 16 and not rest.strip(b"\0"):
            return  # zero padding after the data set: harmless
        raise UndecodableInstanceError(
            f"dataset cannot be parsed after {_element_name(tags[-1])} ({size - sum(where)} bytes left)"
        )


def file_transfer_syntax(path: Path) -> str:
    """The Transfer Syntax UID of a Part 10 file's meta group (header only); "" when it has none."""
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[Tag(0x0002, 0x0010)]).file_meta
    except Exception as exc:
        if _io_failure(exc):
            raise StorageError(f"cannot read the received file ({type(exc).__name__})") from exc
        raise UndecodableInstanceError(f"not a DICOM file ({type(exc).__name__})") from exc
    return str(meta.get("TransferSyntaxUID", "") or "")


def read_received(path: Path) -> Dataset:
    """The header of a received file, checked. Our own I/O failure is a StorageError (the sender may retry);
    anything wrong with the bytes the peer sent is an UndecodableInstanceError that says what."""
    try:
        ds = dcmread(path, defer_size=4096)  # header only: large values stay on disk
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian  # inflated offsets
        check_explicit_vrs(ds, None if deflated else path)
        if not deflated:
            check_complete(ds, path)  # before check_decodable, which replaces the raw elements it reads
        check_decodable(ds)
    except UndecodableInstanceError:
        raise
    except Exception as exc:
        if _io_failure(exc):
            errno = getattr(exc, "errno", None)
            raise StorageError(f"cannot read the received file ({type(exc).__name__}, errno {errno})") from exc
        raise UndecodableInstanceError(f"dataset cannot be decoded ({type(exc).__name__})") from exc
    return ds


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one received file, whatever carried it (C-STORE, STOW-RS, WADO-RS)."""

    status: StoreStatus
    comment: str | None  # the ErrorComment / FailureReason text sent back (None: the status's own)
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    duplicate: bool = False

    @property
    def stored(self) -> bool:
        return self.status is STORED


class StoreHandler:
    """``EVT_C_STORE`` handler. ``on_stored(study_uid, due_at)`` re-arms the study's stable timer.

    :meth:`store_file` is the same storing logic without a pynetdicom event: STOW-RS and the DICOMweb backfill
    hand it a complete file in the spool's tmp folder (which they still own and delete afterwards)."""

    def __init__(self, config: Config, store: Store, on_stored: Callable[[str, datetime], None] | None = None):
        self.config = config
        self.store = store
        self.on_stored = on_stored

    def __call__(self, event) -> Dataset | int:
        try:
            path = Path(event.dataset_path)
            sop_class = str(event.request.AffectedSOPClassUID)
            syntax = str(event.context.transfer_syntax)
            announced = str(event.request.AffectedSOPInstanceUID or "")
        except Exception:  # noqa: BLE001 - as store_file: a broken request is a status, never an exception
            path, sop_class, syntax, announced = Path(), "", "", ""
        outcome = self.store_file(
            path,
            calling=event.assoc.requestor.ae_title,
            peer=event.assoc.requestor.address,
            sop_class=sop_class,
            transfer_syntax=syntax,
            announced_sop_uid=announced,
            c_store_priority=getattr(getattr(event, "request", None), "Priority", None),
        )
        return STORED.code if outcome.stored else outcome.status.dataset(outcome.comment)

    def store_file(
        self,
        path: Path,
        *,
        calling: str,
        peer: str,
        sop_class: str | None = None,
        transfer_syntax: str | None = None,
        announced_sop_uid: str = "",
        expected_study_uid: str | None = None,
        transport: str = "C-STORE",
        c_store_priority: int | None = None,
    ) -> StoreOutcome:
        """Store one received file: checks, selection, the durable store, status, audit, metrics and the study's
        timer. ``sop_class`` and ``transfer_syntax`` are the command's (C-STORE); None = the file's own (STOW-RS,
        WADO-RS). ``expected_study_uid``: the study the request named (STOW-RS ``/studies/{uid}``). Never raises."""
        t0 = time.perf_counter()
        info: dict[str, str] = {"sop_class": sop_class or "", "sop_uid": "", "study_uid": ""}
        extra = {} if transport == "C-STORE" else {"transport": transport}
        try:
            stored, eligible, reason, study_uid = self._store(
                path, sop_class, transfer_syntax, announced_sop_uid, expected_study_uid, calling, info, c_store_priority
            )
        except Exception as exc:  # noqa: BLE001 - never raise into pynetdicom: every failure is a status
            sop_class = info["sop_class"]
            status = status_for(exc)
            metrics.CSTORES.labels(f"0x{status.code:04X}", calling).inc()
            audit.event(
                "instance_refused",
                peer=peer,
                calling_ae=calling,
                sop_class=sop_class_name(sop_class),
                status=f"0x{status.code:04X}",
                reason=str(exc) if isinstance(exc, (InstanceRejected, StorageError)) else status.comment,
                **extra,
            )
            if isinstance(exc, InstanceRejected):
                log.warning("%s %s from %s refused: %s", transport, sop_class_name(sop_class), calling, exc)
            elif isinstance(exc, StorageError):
                log.error("%s %s from %s refused: %s", transport, sop_class_name(sop_class), calling, exc)
            else:
                log.error(
                    "%s %s from %s failed (0x%04X):\n%s",
                    transport,
                    sop_class_name(sop_class),
                    calling,
                    status.code,
                    safe_traceback(exc),
                )
            return StoreOutcome(
                status,
                str(exc) if isinstance(exc, InstanceRejected) else None,
                sop_class,
                info["sop_uid"],
                info["study_uid"],
            )
        sop_class = info["sop_class"]
        size = _size(stored.path)
        metrics.CSTORES.labels("0x0000", calling).inc()
        if size and not stored.duplicate:
            metrics.RECEIVED_BYTES.inc(size)
        audit.event(
            "instance_stored",
            peer=peer,
            calling_ae=calling,
            sop_class=sop_class_name(sop_class),
            study=audit.study_key(study_uid),
            bytes=size,
            duplicate=stored.duplicate,
            eligible=eligible,
            **extra,
        )
        outcome = StoreOutcome(STORED, None, sop_class, info["sop_uid"], study_uid, stored.duplicate)
        if stored.duplicate:
            log.info("%s %s from %s: already stored", transport, sop_class_name(sop_class), calling)
            return outcome
        log.info(
            "%s %s from %s: stored (%s) in %.0f ms",
            transport,
            sop_class_name(sop_class),
            calling,
            "eligible" if eligible else f"skipped: {reason}",
            (time.perf_counter() - t0) * 1000,
        )
        if stored.stable_due_at is not None:
            self._arm(study_uid, stored.stable_due_at)
        return outcome

    def study_complete(self, study_uid: str) -> None:
        """The whole study arrived in one piece (one STOW-RS request, one WADO-RS retrieve): its timer is due now,
        with no stability wait. Call it only after every instance's row is committed."""
        due = self.store.study_complete(study_uid)
        if due is not None:
            self._arm(study_uid, due)

    def _arm(self, study_uid: str, due: datetime) -> None:
        if self.on_stored is None:
            return
        try:
            self.on_stored(study_uid, due)
        except Exception as exc:  # noqa: BLE001 - the row is committed; the timer is restored on restart
            log.error("could not arm the study timer:\n%s", safe_traceback(exc))

    def _store(
        self,
        received: Path,
        sop_class: str | None,
        transfer_syntax: str | None,
        announced: str,
        expected_study_uid: str | None,
        calling: str,
        info: dict[str, str],
        c_store_priority: int | None = None,  # the C-STORE request's Priority (1 = HIGH)
    ):
        if full_disk_error(str(received)) is not None:
            received.unlink(missing_ok=True)
            raise DiskFullError("no space left on the storage while receiving")
        start_flush(received)
        if transfer_syntax is None:  # the file's own (STOW-RS, WADO-RS): read from its file meta
            transfer_syntax = file_transfer_syntax(received)
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            check_inflated_size(received, self.config.node.max_inflated_mb << 20)
        ds = read_received(received)
        if sop_class is None:
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
        info["sop_class"] = sop_class
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")  # never the command's: the file must say what it is
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        info["sop_uid"], info["study_uid"] = sop_uid, study_uid
        missing = [
            k
            for k, v in (
                ("StudyInstanceUID", study_uid),
                ("SeriesInstanceUID", series_uid),
                ("SOPInstanceUID", sop_uid),
            )
            if not v
        ]
        if missing:
            raise MissingUIDError(f"missing {', '.join(missing)}")
        if announced and announced != sop_uid:
            raise UIDMismatchError("SOP Instance UID differs from the command")
        if expected_study_uid and expected_study_uid != study_uid:
            raise UIDMismatchError("Study Instance UID differs from the request's")
        uids = (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid))
        invalid = [k for k, v in uids if len(v) > 64 or not _UID_CHARS.fullmatch(v)]
        if invalid:
            raise InvalidUIDError(f"invalid {', '.join(invalid)}")
        try:
            fields = header_fields(ds)
            device = device_fields(ds)
        except Exception as exc:
            raise UndecodableInstanceError(f"dataset cannot be decoded ({type(exc).__name__})") from exc
        # The node's outputs are SR, SC and PR objects: only those need the lookup in its results table.
        own = sop_class not in IMAGE_CLASSES_ANALYSED and self.store.is_own_output(sop_uid)
        try:
            eligible, reason = select(ds, self.config.selection, own_output=own)
        except Exception as exc:  # noqa: BLE001 - malformed attribute values (e.g. NumberOfFrames "abc")
            eligible, reason = False, f"header could not be read ({type(exc).__name__})"
        requested = ""
        if self.config.priority.sender_request:  # the study is queued urgent (analysed first)
            try:
                requested = requested_priority(ds, c_store_priority)
            except Exception:  # noqa: BLE001 - an unreadable priority is no request
                requested = ""
        meta = InstanceMeta(
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(transfer_syntax),
            calling_ae=calling,
            eligible=eligible,
            skip_reason=reason,
            **{k: v[:64] for k, v in fields.items()},
            **device,
            requested_priority=requested,
        )
        stored = self.store.add_instance(received, meta, self.config.studies.stable_after_s)
        return stored, eligible, reason, study_uid
