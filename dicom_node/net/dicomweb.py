"""The node as a DICOMweb client of an archive, for backfills: QIDO-RS study search and WADO-RS study retrieve, with
dicomweb-client (the highdicom authors' maintained client).

- :meth:`DicomWebQueryClient.find_studies`: the same search as the DIMSE client's (StudyDate range, one query per
  ModalitiesInStudy, per AccessionNumber or StudyInstanceUID when a list is given), all pages, merged by UID (paged
  here: Orthanc's DICOMweb plugin 1.7 ignores ``offset`` with some filters, and dicomweb-client's ``get_remaining``
  then never ends);
- :meth:`DicomWebQueryClient.retrieve_study`: the study's instances one at a time (streamed, in the transfer
  syntax the archive holds), each written to a file in ``tmp`` and handed to ``store(path)``, which returns
  whether it was stored; the caller owns the file afterwards.

Every failure is a :class:`~dicom_node.net.query.QueryError`, classified as the DIMSE client classifies its own:
refused connection, timeout, HTTP 408/429/5xx, an instance the node could not store now: transient; HTTP 401/403
(credentials), 400/404/405/501 (the archive does not offer the service at that URL): permanent. Messages name the
URL and statuses, never an identifier of a study or a patient.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.config import DicomWebSourceConfig
from dicom_node.net.query import (
    MoveResult,
    PermanentQueryError,
    QueryError,
    StudyMatch,
    TransientQueryError,
    study_queries,
)

PERMANENT_HTTP = {400, 401, 403, 404, 405, 406, 410, 501}
PAGE = 100  # QIDO-RS results asked for at once (limit/offset)
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # as the archive holds them: no transcoding on its side


def classify(exc: BaseException, where: str, what: str) -> QueryError:
    """A QueryError for a failure of requests / dicomweb-client."""
    if isinstance(exc, QueryError):
        return exc
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        kind = PermanentQueryError if code in PERMANENT_HTTP else TransientQueryError
        hint = " (check backfill.source's credentials)" if code in (401, 403) else ""
        return kind(f"{what}: HTTP {code} from {where}{hint}")
    if isinstance(exc, requests.Timeout):
        return TransientQueryError(f"{what}: {where} did not answer in time")
    if isinstance(exc, requests.ConnectionError):
        return TransientQueryError(f"{what}: cannot connect to {where}")
    return TransientQueryError(f"{what} from {where} failed ({type(exc).__name__})")


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]).strip() if values and not isinstance(values[0], dict) else ""


def _match(item: dict[str, Any]) -> StudyMatch | None:
    uid = _value(item, "0020000D")
    if not uid:
        return None
    mods = tuple(str(m) for m in (item.get("00080061", {}).get("Value") or []) if m)
    count = _value(item, "00201208")
    return StudyMatch(
        study_uid=uid,
        accession_number=_value(item, "00080050"),
        study_date=_value(item, "00080020")[:8],
        modalities=mods,
        instances=int(count) if count.isdigit() else None,
    )


class DicomWebQueryClient:
    """QIDO-RS / WADO-RS client of one archive (``backfill.source: {dicomweb: URL, ...}``)."""

    def __init__(self, source: DicomWebSourceConfig):
        self.source = source
        self._where = source.dicomweb
        self._stopping = threading.Event()

    def _client(self) -> DICOMwebClient:
        """A client with its own session (one per thread: requests sessions are not shared across threads)."""
        session = requests.Session()
        session.trust_env = False  # never via an http_proxy of the environment
        password, token = self.source.secret_password(), self.source.secret_token()
        if self.source.username:
            session.auth = (self.source.username, password or "")
        elif token:
            session.headers["Authorization"] = f"Bearer {token}"
        if self.source.ca_certificates is not None:
            session.verify = str(self.source.ca_certificates)
        return DICOMwebClient(url=self.source.dicomweb, session=session, timeout=self.source.timeout_s)

    def abort_all(self) -> None:
        """Stop retrievals under way after their current instance (the node is stopping)."""
        self._stopping.set()

    # ---- QIDO-RS ----------------------------------------------------------------------------------------------
    def find_studies(
        self,
        *,
        date_range: str = "",
        modalities: Iterable[str] = ("CR", "DX"),
        accession_numbers: Iterable[str] = (),
        study_uids: Iterable[str] = (),
    ) -> list[StudyMatch]:
        found: dict[str, StudyMatch] = {}
        client = self._client()
        try:
            for key, modality in study_queries(modalities, accession_numbers, study_uids):
                filters = dict(key)
                if date_range:
                    filters["StudyDate"] = date_range
                if modality:
                    filters["ModalitiesInStudy"] = modality
                offset = 0
                while True:  # our own paging: an archive that ignores offset must not loop for ever
                    page = client.search_for_studies(
                        search_filters=filters,
                        fields=["NumberOfStudyRelatedInstances", "ModalitiesInStudy"],
                        limit=PAGE,
                        offset=offset,
                    )
                    new = 0
                    for item in page:
                        match = _match(item)
                        if match is not None and match.study_uid not in found:
                            found[match.study_uid] = match
                            new += 1
                    if len(page) < PAGE or not new:
                        break
                    offset += len(page)
        except Exception as exc:
            raise classify(exc, self._where, "QIDO-RS search") from exc
        finally:
            client._session.close()
        return list(found.values())

    # ---- WADO-RS ----------------------------------------------------------------------------------------------
    def retrieve_study(self, study_uid: str, tmp: Path, store: Callable[[Path], bool]) -> MoveResult:
        """Retrieve one study, each instance into a file in ``tmp`` handed to ``store``; raises QueryError unless
        every instance was stored (the retry retrieves the study again; the store ignores what it has)."""
        completed = failed = 0
        client = self._client()
        try:
            for ds in client.iter_study(study_uid, media_types=ANY_TRANSFER_SYNTAX):
                if self._stopping.is_set():
                    raise TransientQueryError(f"WADO-RS retrieve from {self._where}: stopped by the node's shutdown")
                path = _write(ds, tmp)
                try:
                    if store(path):
                        completed += 1
                    else:
                        failed += 1
                finally:
                    path.unlink(missing_ok=True)
        except Exception as exc:
            raise classify(exc, self._where, "WADO-RS retrieve") from exc
        finally:
            client._session.close()
        if failed:
            raise TransientQueryError(
                f"WADO-RS retrieve from {self._where}: {failed} of the study's {completed + failed} images were not "
                "stored"
            )
        return MoveResult(completed=completed, failed=failed, warning=0, status=0)


def _write(ds: Dataset, tmp: Path) -> Path:
    """A retrieved instance as a Part 10 file in ``tmp`` (pydicom writes the elements as received: pixel data is
    not re-encoded)."""
    fd, name = tempfile.mkstemp(dir=tmp, suffix=".wado.part")
    try:
        with os.fdopen(fd, "wb") as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)
