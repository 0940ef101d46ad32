"""The node as a Query/Retrieve SCU (Study Root): study-level C-FIND and C-MOVE against a PACS, for backfills.

- :func:`find_studies`: one C-FIND per modality (CR, DX), and per accession number or Study Instance UID when a
  list is given (not every PACS matches a list of values in one key), merged by Study Instance UID;
- :func:`move_study`: one study-level C-MOVE to the node's own AE title; the PACS sends the images to the node's
  listener as ordinary C-STOREs. Returns the sub-operation counts.

Every failure is a :class:`QueryError`, classified as the sender classifies its own:

- :class:`TransientQueryError` (worth retrying later): refused connection, timeout, abort, association
  rejected-transient, no response, 0xA7xx (out of resources), 0xCxxx (unable to process: e.g. the PACS could not
  reach the node), 0xFE00 (cancelled), or sub-operations that failed;
- :class:`PermanentQueryError` (a configuration problem; retrying will not help): association rejected-permanent
  (the PACS does not know this AE title), 0xA801 (move destination unknown: the PACS does not know the node by
  ``backfill.move_destination``), 0xA900 (identifier does not match), 0x0122 (not supported).

Messages name AE titles, hosts and statuses, never an identifier of a study or a patient.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import BackfillSourceConfig
from dicom_node.errors import DicomNodeError
from dicom_node.net.pynetdicom_internals import rejection_result
from dicom_node.net.tls import client_context

PENDING = (0xFF00, 0xFF01)
PERMANENT_STATUSES = {0x0122, 0x0124, 0xA801}


def study_queries(
    modalities: Iterable[str], accession_numbers: Iterable[str], study_uids: Iterable[str]
) -> list[tuple[dict[str, str], str]]:
    """The study-level searches a backfill sends, C-FIND or QIDO-RS alike: (key, modality) for each modality ("":
    any), the key being one accession number or Study UID when lists are given, else none."""
    accession_numbers, study_uids = list(accession_numbers), list(study_uids)
    keys: list[dict[str, str]] = [{"AccessionNumber": a} for a in accession_numbers]
    keys += [{"StudyInstanceUID": u} for u in study_uids]
    return [(key, modality) for key in keys or [{}] for modality in list(modalities) or [""]]


class QueryError(DicomNodeError):
    """A C-FIND or C-MOVE against the PACS failed."""


class TransientQueryError(QueryError):
    """Worth retrying later: the PACS was unreachable, busy, slow, or some images did not arrive."""


class PermanentQueryError(QueryError):
    """Retrying will not help until someone changes a configuration (the PACS's or the node's)."""


@dataclass(frozen=True)
class StudyMatch:
    """One study of a C-FIND answer."""

    study_uid: str
    accession_number: str
    study_date: str  # YYYYMMDD, "" when not given
    modalities: tuple[str, ...]
    instances: int | None  # NumberOfStudyRelatedInstances, when the PACS gives it


@dataclass(frozen=True)
class MoveResult:
    completed: int
    failed: int
    warning: int
    status: int


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10
    dimse_s: float = 60  # for a C-FIND's responses
    move_s: float = 600  # a whole C-MOVE (its association is aborted after this)


def classify_status(status: int) -> type[QueryError] | None:
    """None for success or pending; else the error class for a C-FIND / C-MOVE response status."""
    if status == 0x0000 or status in PENDING:
        return None
    if (status & 0xFF00) == 0xA900 or status in PERMANENT_STATUSES:
        return PermanentQueryError
    return TransientQueryError  # A7xx, Cxxx, FE00 (cancelled), B000 (some sub-operations failed), others


class QueryClient:
    """Query/Retrieve SCU of one PACS, calling as ``calling_ae``."""

    def __init__(self, source: BackfillSourceConfig, calling_ae: str, timeouts: Timeouts):
        self.source = source
        self.calling_ae = calling_ae
        self.timeouts = timeouts
        # a certificate that cannot be loaded stops the start with the reason (ConfigError)
        self._tls = (
            (client_context(source.tls, "backfill.source"), source.tls.server_name or source.host)
            if source.tls is not None
            else None
        )
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        self._closed = False

    def abort_all(self) -> None:
        """Abort every association under way, and any opened from now on (the node is stopping)."""
        with self._lock:
            self._closed = True
            active = list(self._active)
        for assoc in active:
            assoc.abort()

    @property
    def _where(self) -> str:
        return f"{self.source.ae_title} at {self.source.host}:{self.source.port}"

    def _associate(self, context: str, dimse_timeout_s: float) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeouts.connect_s
        ae.connection_timeout = self.timeouts.connect_s
        ae.dimse_timeout = dimse_timeout_s
        ae.network_timeout = dimse_timeout_s
        ae.add_requested_context(context)
        assoc = ae.associate(self.source.host, self.source.port, ae_title=self.source.ae_title, tls_args=self._tls)
        if assoc.is_established:
            if not any(cx.abstract_syntax == context for cx in assoc.accepted_contexts):
                assoc.release()
                raise PermanentQueryError(f"{self._where} does not accept Study Root Query/Retrieve ({context})")
            with self._lock:
                closed = self._closed
                if not closed:
                    self._active.add(assoc)
            if closed:
                assoc.abort()
                raise TransientQueryError("the node is stopping")
            return assoc
        rejected = rejection_result(assoc)
        if rejected == 0x01:
            raise PermanentQueryError(
                f"association rejected by {self._where} (is the node, calling AE {self.calling_ae}, declared there?)"
            )
        if rejected == 0x02:
            raise TransientQueryError(f"association rejected (transient) by {self._where}")
        raise TransientQueryError(f"cannot connect to {self._where}")

    def _done(self, assoc: Association) -> None:
        with self._lock:
            self._active.discard(assoc)
        if assoc.is_established:
            assoc.release()

    # ---- C-FIND ------------------------------------------------------------------------------------------
    def find_studies(
        self,
        *,
        date_range: str = "",
        modalities: Iterable[str] = ("CR", "DX"),
        accession_numbers: Iterable[str] = (),
        study_uids: Iterable[str] = (),
    ) -> list[StudyMatch]:
        """Studies matching the date range ("YYYYMMDD-YYYYMMDD", "" = any date) and one of ``modalities``; when
        accession numbers or Study UIDs are given, only those (each its own C-FIND, on one association)."""
        found: dict[str, StudyMatch] = {}
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind, self.timeouts.dimse_s)
        try:
            for key, modality in study_queries(modalities, accession_numbers, study_uids):
                for match in self._find(assoc, date_range, modality, key):
                    if match.study_uid not in found:
                        found[match.study_uid] = match
        finally:
            self._done(assoc)
        return list(found.values())

    def _find(self, assoc: Association, date_range: str, modality: str, key: dict[str, str]) -> list[StudyMatch]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = key.get("StudyInstanceUID", "")
        ds.AccessionNumber = key.get("AccessionNumber", "")
        ds.StudyDate = date_range
        ds.ModalitiesInStudy = modality
        ds.NumberOfStudyRelatedInstances = ""
        out = []
        got_final = False
        for status, identifier in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise TransientQueryError(f"C-FIND: no response from {self._where} (timeout or abort)")
            problem = classify_status(int(code))
            if problem is not None:
                raise problem(f"C-FIND status 0x{int(code):04X} from {self._where}")
            if int(code) in PENDING and identifier is not None:
                match = _match(identifier)
                if match is not None:
                    out.append(match)
            elif int(code) == 0x0000:
                got_final = True
        if not got_final:
            raise TransientQueryError(f"C-FIND: {self._where} did not finish its answer (association aborted)")
        return out

    # ---- C-MOVE ------------------------------------------------------------------------------------------
    def move_study(self, study_uid: str, destination_ae: str) -> MoveResult:
        """C-MOVE one study to ``destination_ae``; raises :class:`QueryError` unless every sub-operation worked
        (a PACS that sends some images but not all: transient, the retry sends the rest)."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove, self.timeouts.move_s)
        timed_out = threading.Event()

        def give_up() -> None:
            timed_out.set()
            assoc.abort()

        timer = threading.Timer(self.timeouts.move_s, give_up)
        timer.daemon = True
        timer.start()
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        last: Any = None
        final: int | None = None
        try:
            for status, _identifier in assoc.send_c_move(
                ds, destination_ae, StudyRootQueryRetrieveInformationModelMove
            ):
                code = getattr(status, "Status", None)
                if code is None:
                    break
                last = status
                if int(code) not in PENDING:
                    final = int(code)
        finally:
            timer.cancel()
            self._done(assoc)
        counts = MoveResult(
            completed=int(getattr(last, "NumberOfCompletedSuboperations", 0) or 0),
            failed=int(getattr(last, "NumberOfFailedSuboperations", 0) or 0),
            warning=int(getattr(last, "NumberOfWarningSuboperations", 0) or 0),
            status=-1 if final is None else final,
        )
        if final is None:
            why = f"did not finish within {self.timeouts.move_s:g} s" if timed_out.is_set() else "no final response"
            raise MoveError(TransientQueryError, f"C-MOVE from {self._where}: {why} (timeout or abort)", counts)
        if final == 0xA801:
            raise MoveError(
                PermanentQueryError,
                f"C-MOVE status 0xA801 from {self._where}: move destination {destination_ae} unknown "
                "(declare the node there, or set backfill.move_destination)",
                counts,
            )
        problem = classify_status(final)
        if problem is not None:
            comment = _comment(last)
            raise MoveError(
                problem,
                f"C-MOVE status 0x{final:04X} from {self._where}{f': {comment}' if comment else ''} "
                f"({counts.completed} images sent, {counts.failed} failed)",
                counts,
            )
        if counts.failed:
            raise MoveError(TransientQueryError, f"C-MOVE: {counts.failed} of the study's images were not sent", counts)
        return counts


class MoveError(QueryError):
    """A C-MOVE that failed: ``kind`` (transient or permanent) and what it did move before."""

    def __init__(self, kind: type[QueryError], message: str, counts: MoveResult):
        super().__init__(message)
        self.kind = kind
        self.counts = counts

    @property
    def permanent(self) -> bool:
        return self.kind is PermanentQueryError


def _comment(status: Any) -> str:
    """The peer's Error Comment, short and without anything that looks like a UID or a long number."""
    text = str(getattr(status, "ErrorComment", "") or "").strip()
    return re.sub(r"[0-9][0-9.]{7,}", "...", text)[:120]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _match(identifier: Dataset) -> StudyMatch | None:
    uid = _text(identifier, "StudyInstanceUID")
    if not uid:
        return None
    raw = identifier.get("ModalitiesInStudy", "") or ""
    mods = tuple(m for m in ([raw] if isinstance(raw, str) else [str(v) for v in raw]) if m)
    count = _text(identifier, "NumberOfStudyRelatedInstances")
    return StudyMatch(
        study_uid=uid,
        accession_number=_text(identifier, "AccessionNumber"),
        study_date=_text(identifier, "StudyDate")[:8],
        modalities=mods,
        instances=int(count) if count.isdigit() else None,
    )
