"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class and the common transfer syntaxes.

A C-STORE is answered 0x0000 only after the received bytes (never decoded and re-encoded) are fsync'd in the
spool and the instance row is committed. pynetdicom streams each received data set straight into a file in
the spool's tmp folder (``STORE_RECV_CHUNKED_DATASET``: preamble, file meta, then the bytes as received), so
the handler reads only the header and hard-links that file into place: no copy of the pixel data in memory. The handler never raises into
pynetdicom: every failure becomes a status with an ErrorComment, and the reason is logged without PHI.

Statuses: 0x0000 stored (or already stored: duplicates are stored once); 0xA700 out of resources (disk below
the watermark, or storage failing); 0xC210 dataset cannot be decoded; 0xC211 a required UID is missing.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from storage import Store
from storage.errors import DiskFullError, StorageError
from storage.repository import InstanceMeta

from dicom_node.config import Config
from dicom_node.ingest.selection import header_fields, select
from dicom_node.net.transport import FastThreadedAssociationServer, start_flush

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.valuerep import VR
from pynetdicom import _config as pynetdicom_config

try:  # JPEG Lossless (Process 14, non-SV1) exists under this name in pydicom 3
    from pydicom.uid import JPEGLossless
except ImportError:  # pragma: no cover
    JPEGLossless = UID("1.2.840.10008.1.2.4.57")

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

IMAGE_CLASSES_ANALYSED = {
    "1.2.840.10008.5.1.4.1.1.1",      # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",    # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
}

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
MISSING_UID = 0xC211


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]   # LO: 64 characters
    return ds


_KNOWN_VRS = frozenset(v.value for v in VR)
PIXEL_DATA = 0x7FE00010


def _check_decodable(ds: Dataset) -> None:
    """pydicom parses lazily: find broken data now rather than in the worker later. Every element must have
    a known VR (implicit VR data sets get theirs from the dictionary) and every sequence must parse, item by
    item; plain values (deferred Pixel Data included) are left as received."""
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)   # never load a deferred value (Pixel Data) here
        if isinstance(raw, RawDataElement):
            if raw.VR is not None and raw.VR not in _KNOWN_VRS:
                raise ValueError(f"unknown VR {raw.VR!r} in {tag}")
            if tag == PIXEL_DATA or (raw.VR not in (None, "SQ", "UN") and raw.length != 0xFFFFFFFF):
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _check_decodable(item)


def _sop_class_name(uid: str) -> str:
    try:
        return UID(uid).name
    except Exception:  # noqa: BLE001 - a name is only for the log
        return uid


class StoreSCP:
    """Runs the pynetdicom AE in its own threads; ``on_stored(study_uid, due_at)`` re-arms study timers."""

    def __init__(self, config: Config, store: Store, on_stored: Callable[[str, object], None] | None = None):
        self.config = config
        self.store = store
        self.on_stored = on_stored
        self._server = None
        self.ae = self._make_ae()
        # Received data sets go to files in the spool's tmp folder, on the spool's filesystem, so that they
        # can be hard-linked into place. Both settings are process-wide: this process is the node.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(store.spool.tmp)

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if node.allowed_calling_aets:
            ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_bytes
        return ae

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.node.port

    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port (useful with port 0)."""
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted)]
        self._server = self.ae.make_server((self.config.node.host, self.config.node.port),
                                           evt_handlers=handlers, server_class=FastThreadedAssociationServer)
        self.ae._servers.append(self._server)   # as AE.start_server does: the server removes itself at shutdown
        threading.Thread(target=self._server.serve_forever, name="dicom-scp", daemon=True).start()
        log.info("listening as %s on %s:%d", self.config.node.ae_title, self.config.node.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ---- handlers ----------------------------------------------------------------------------------
    @staticmethod
    def _on_echo(event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    @staticmethod
    def _on_rejected(event) -> None:
        log.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    @staticmethod
    def _on_aborted(event) -> None:
        log.warning("association with %s aborted", event.assoc.requestor.ae_title)

    def _on_store(self, event) -> Dataset | int:
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            received = event.dataset_path
            start_flush(received)
            ds = dcmread(received, defer_size=4096)   # header only: large values stay on disk
            _check_decodable(ds)
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            sop_uid = str(ds.get("SOPInstanceUID", "") or event.request.AffectedSOPInstanceUID or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            eligible_fields = header_fields(ds)
        except Exception as exc:  # noqa: BLE001 - anything undecodable is the peer's data, not our crash
            log.warning("C-STORE %s from %s: dataset cannot be decoded (%s)", _sop_class_name(sop_class),
                        calling, type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "dataset cannot be decoded")
        missing = [k for k, v in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                                  ("SOPInstanceUID", sop_uid)) if not v]
        if missing:
            log.warning("C-STORE %s from %s refused: missing %s", _sop_class_name(sop_class), calling,
                        ", ".join(missing))
            return _status(MISSING_UID, f"missing {', '.join(missing)}")
        try:
            # The node's outputs are SR, SC and PR objects: only those need the lookup in its results table.
            own = sop_class not in IMAGE_CLASSES_ANALYSED and self.store.is_own_output(sop_uid)
            eligible, reason = select(ds, self.config.selection, own_output=own)
        except Exception as exc:  # noqa: BLE001 - malformed attribute values (e.g. NumberOfFrames "abc")
            eligible, reason = False, f"header could not be read ({type(exc).__name__})"
        meta = InstanceMeta(
            sop_instance_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, sop_class_uid=sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax), calling_ae=calling,
            eligible=eligible, skip_reason=reason, **{k: v[:64] for k, v in eligible_fields.items()})
        try:
            stored = self.store.add_instance(received, meta, self.config.studies.stable_after_s)
        except DiskFullError as exc:
            log.error("C-STORE from %s refused: %s", calling, exc)
            return _status(OUT_OF_RESOURCES, "out of disk space")
        except StorageError as exc:
            log.error("C-STORE from %s refused: storage failure: %s", calling, exc)
            return _status(OUT_OF_RESOURCES, "storage failure")
        except Exception as exc:  # noqa: BLE001 - database errors etc.: refuse, never crash the association
            log.error("C-STORE from %s refused: storage failure (%s: %s)", calling, type(exc).__name__, exc)
            return _status(OUT_OF_RESOURCES, "storage failure")
        if stored.duplicate:
            log.info("C-STORE %s from %s: already stored", _sop_class_name(sop_class), calling)
        else:
            log.info("C-STORE %s from %s: stored (%s) in %.0f ms", _sop_class_name(sop_class), calling,
                     "eligible" if eligible else f"skipped: {reason}", (time.perf_counter() - t0) * 1000)
            if stored.stable_due_at is not None and self.on_stored is not None:
                try:
                    self.on_stored(study_uid, stored.stable_due_at)
                except Exception:  # noqa: BLE001 - the row is committed; the timer is restored on restart
                    log.exception("could not arm the study timer")
        return SUCCESS
