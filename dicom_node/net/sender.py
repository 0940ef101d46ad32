"""The sender: delivers stored result objects to their destinations, and never loses one.

Each (result object, destination) pair is a persisted delivery. An apscheduler job polls for due deliveries and
groups them by destination. A DICOM destination gets its batch by C-STORE over one association; a DICOMweb
destination gets each study's share of the batch in one STOW-RS request (:mod:`dicom_node.net.stowrs`, which says
how HTTP statuses and per-instance failures are classified); a notification
destination (HL7, FHIR, webhook, email) gets each stored message through its channel
(:mod:`dicom_node.net.channels`, which says how each protocol's answers are classified). Every failure is
classified:

- transient (refused connection, timeout, abort, association rejected-transient, 0xA7xx out of resources,
  no response): retried with exponential backoff and jitter, up to ``delivery.max_attempts``;
- permanent (association rejected-permanent, 0xA9xx, 0xCxxx, SOP class not supported): failed at once, no
  retry storm.
  ``dicom-node retry`` re-queues failed deliveries.
"""

from __future__ import annotations

import logging
import random
import threading
from datetime import datetime, timedelta
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node import audit, metrics
from dicom_node.config import Config, DestinationConfig, DicomWebDestinationConfig, NotificationConfig
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.logs import safe_traceback
from dicom_node.net.channels import Channels, PeerUnreachable
from dicom_node.net.fastpath import no_delay
from dicom_node.net.pynetdicom_internals import rejection_result
from dicom_node.net.stowrs import StowClient
from dicom_node.net.tls import client_context
from storage import Store
from storage.base import utcnow
from storage.errors import StorageError
from storage.outbox import DueDelivery
from storage.states import QueuePriority

log = logging.getLogger(__name__)

SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
PERMANENT_STATUSES = {0x0122, 0x0124}  # SOP class not supported, not authorized
DICOM_KINDS = {"sr", "sc", "gsps"}  # the result kinds that are DICOM objects (the others are messages)


def classify_status(status: int) -> type[Exception] | None:
    """None for success; else the error class for a C-STORE response status."""
    if status in SUCCESS_OR_WARNING:
        return None
    if (status & 0xF000) == 0xC000 or (status & 0xFF00) == 0xA900 or status in PERMANENT_STATUSES:
        return PermanentDeliveryError
    return TransientDeliveryError


class Sender:
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self.destinations: dict[str, DestinationConfig | DicomWebDestinationConfig | NotificationConfig] = {
            d.name: d for d in config.destinations
        }
        # TLS contexts made once, at start: a certificate that cannot be loaded stops the start with the reason
        self._tls = {
            d.name: (client_context(d.tls, d.name), d.tls.server_name or d.host)
            for d in config.dicom_destinations
            if d.tls is not None
        }
        self.channels = Channels(config.notification_destinations)
        self.stow = {d.name: StowClient(d) for d in config.destinations if isinstance(d, DicomWebDestinationConfig)}
        self._lock = threading.Lock()

    def run_due(self) -> int:
        """Deliver everything that is due now; returns the number delivered."""
        if not self._lock.acquire(blocking=False):
            return 0
        delivered = 0
        try:
            due = self.store.due_deliveries(limit=200)
            by_destination: dict[str, list[DueDelivery]] = {}  # in the outbox's order: urgent first, then oldest
            for d in due:
                by_destination.setdefault(d.destination, []).append(d)
            for name, batch in by_destination.items():
                delivered += self._deliver_batch(name, batch)
        except StorageError as exc:  # nothing is lost: undelivered rows stay pending and are tried next poll
            log.error("sender: storage failure, retrying: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the sender's schedule; say where it is
            log.error("sender: unexpected error, retrying:\n%s", safe_traceback(exc))
        finally:
            self._lock.release()
        return delivered

    def _deliver_batch(self, name: str, batch: list[DueDelivery]) -> int:
        dest = self.destinations.get(name)
        if dest is None:
            for d in batch:
                self.store.mark_failed(d.id, f"destination {name!r} is not in the configuration")
            return 0
        if dest.mode == "silent":  # switched from live to silent: what was still pending is held, not sent
            held = self.store.hold([d.id for d in batch])
            log.warning(
                "destination %s is silent: %d pending deliveries held (dicom-node release sends them)", name, held
            )
            return 0
        if isinstance(dest, DicomWebDestinationConfig):
            return self._stow(dest, batch)
        if not isinstance(dest, DestinationConfig):
            return self._notify(dest, batch)
        datasets = {}
        for d in batch:
            if d.kind not in DICOM_KINDS:  # a destination renamed from another type: its message is no DICOM object
                self._failed(d, PermanentDeliveryError(f"a {d.kind.upper()} message cannot go to a DICOM destination"))
                continue
            try:
                datasets[d.id] = dcmread(d.path)
            except Exception as exc:  # noqa: BLE001 - a missing/corrupt result file cannot be sent
                self.store.mark_failed(d.id, f"result file unreadable: {exc}")
        if not datasets:
            return 0
        ae = AE(ae_title=self.config.node.ae_title)
        ae.acse_timeout = self.config.delivery.connect_timeout_s
        ae.connection_timeout = self.config.delivery.connect_timeout_s
        ae.dimse_timeout = self.config.delivery.dimse_timeout_s
        ae.network_timeout = self.config.delivery.dimse_timeout_s
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=self._tls.get(dest.name))
        if assoc.is_established:
            no_delay(getattr(assoc.dul.socket, "socket", None))
        else:
            rejected = rejection_result(assoc)
            if rejected == 0x01:
                err: Exception = PermanentDeliveryError(f"association rejected by {dest.ae_title}")
            elif rejected == 0x02:  # rejected-transient: e.g. the PACS is at its association limit
                err = TransientDeliveryError(f"association rejected (transient) by {dest.ae_title}")
            else:
                err = TransientDeliveryError(f"cannot connect to {dest.ae_title} at {dest.host}:{dest.port}")
            for d in batch:
                if d.id in datasets:
                    self._failed(d, err)
            return 0
        delivered = 0
        try:
            for d in batch:
                if d.id not in datasets:
                    continue
                if not assoc.is_established:
                    self._failed(d, TransientDeliveryError("association aborted"))
                    continue
                try:
                    high = d.priority == QueuePriority.URGENT  # an urgent study's results: C-STORE Priority HIGH
                    rsp = assoc.send_c_store(datasets[d.id], priority=1 if high else 0)
                except (ValueError, AttributeError) as exc:  # pynetdicom: no accepted presentation context,
                    # the object cannot be encoded, or it lacks its UIDs: sending it again would not help
                    self._failed(d, PermanentDeliveryError(f"cannot send: {exc}"))
                    continue
                except Exception as exc:  # noqa: BLE001 - anything else (socket, encoding): retry, keep the trace
                    log.error("delivery %d: unexpected error while sending:\n%s", d.id, safe_traceback(exc))
                    self._failed(d, TransientDeliveryError(f"cannot send ({type(exc).__name__})"))
                    continue
                status = getattr(rsp, "Status", None)
                if status is None:
                    self._failed(d, TransientDeliveryError("no response (timeout or abort)"))
                    continue
                problem = classify_status(int(status))
                if problem is None:
                    self._delivered(d)
                    delivered += 1
                else:
                    self._failed(d, problem(f"C-STORE status 0x{int(status):04X}"))
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered

    def _stow(self, dest: DicomWebDestinationConfig, batch: list[DueDelivery]) -> int:
        """``batch`` grouped by study (in the outbox's order), each study's results in one STOW-RS request."""
        by_study: dict[str, list[tuple[DueDelivery, str, bytes]]] = {}
        for d in batch:
            if d.kind not in DICOM_KINDS:  # a destination renamed from another type: its message is no DICOM object
                self._failed(d, PermanentDeliveryError(f"a {d.kind.upper()} message cannot go to a DICOM destination"))
                continue
            try:
                data = d.path.read_bytes()
                header = dcmread(BytesIO(data), stop_before_pixels=True)
                study, sop = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
            except Exception as exc:  # noqa: BLE001 - a missing/corrupt result file cannot be sent
                self.store.mark_failed(d.id, f"result file unreadable: {exc}")
                continue
            by_study.setdefault(study, []).append((d, sop, data))
        client = self.stow[dest.name]
        delivered = 0
        unreachable: PeerUnreachable | None = None
        for items in by_study.values():
            jitter = (random.uniform(0.5, 1.0), utcnow())  # a study's results retried together stay in one request
            if unreachable is not None:  # the archive is down or silent: the other studies wait for the next try
                for d, _, _ in items:
                    self._failed(d, unreachable, jitter)
                continue
            try:
                status, outcomes = client.store([(sop, data) for _, sop, data in items])
            except (TransientDeliveryError, PermanentDeliveryError) as exc:
                if isinstance(exc, PeerUnreachable):
                    unreachable = exc
                for d, _, _ in items:
                    self._failed(d, exc, jitter)
                continue
            except Exception as exc:  # noqa: BLE001 - anything else: retry, keep the trace
                log.error("STOW-RS to %s: unexpected error while sending:\n%s", dest.name, safe_traceback(exc))
                for d, _, _ in items:
                    self._failed(d, TransientDeliveryError(f"cannot send ({type(exc).__name__})"), jitter)
                continue
            log.info(
                "STOW-RS to %s: %d result objects of a study in one request: HTTP %d", dest.name, len(items), status
            )
            for d, sop, _ in items:
                problem = outcomes.get(sop)
                if problem is None:
                    self._delivered(d, f"STOW-RS HTTP {status}")
                    delivered += 1
                else:
                    self._failed(d, problem, jitter)
        return delivered

    def _notify(self, dest: NotificationConfig, batch: list[DueDelivery]) -> int:
        """Each stored message of ``batch`` through the destination's channel, one after the other."""
        delivered = 0
        unreachable: PeerUnreachable | None = None
        for d in batch:
            if unreachable is not None:  # the peer is down or silent: the rest of the batch waits for the next try
                self._failed(d, unreachable)
                continue
            if d.kind != dest.type:  # a destination renamed from another type
                self._failed(
                    d, PermanentDeliveryError(f"a {d.kind.upper()} result cannot go to a {dest.type} destination")
                )
                continue
            try:
                payload = d.path.read_bytes()
            except OSError as exc:
                self.store.mark_failed(d.id, f"result file unreadable: {exc.strerror or exc}")
                continue
            try:
                said = self.channels.send(dest, payload, d.id)
            except (TransientDeliveryError, PermanentDeliveryError) as exc:
                if isinstance(exc, PeerUnreachable):
                    unreachable = exc
                self._failed(d, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - anything else: retry, keep the trace
                log.error("delivery %d: unexpected error while sending:\n%s", d.id, safe_traceback(exc))
                self._failed(d, TransientDeliveryError(f"cannot send ({type(exc).__name__})"))
                continue
            self._delivered(d, said)
            delivered += 1
        return delivered

    def _delivered(self, d: DueDelivery, said: str = "") -> None:
        self.store.mark_delivered(d.id)
        metrics.DELIVERIES.labels(d.destination, "delivered").inc()
        audit.event("delivery_done", delivery=d.id, destination=d.destination, kind=d.kind)
        log.info("delivered %s to %s%s", d.kind.upper(), d.destination, f" ({said})" if said else "")

    def _failed(self, d: DueDelivery, err: Exception, together: tuple[float, datetime] | None = None) -> None:
        """Failed for good, or retried later (``together``: the jitter and the time the delay counts from, the same
        for deliveries that must be retried together)."""
        cfg = self.config.delivery
        attempts = d.attempts + 1
        if isinstance(err, PermanentDeliveryError) or attempts >= cfg.max_attempts:
            why = "permanent" if isinstance(err, PermanentDeliveryError) else f"gave up after {attempts} attempts"
            log.error("delivery %d of %s to %s failed (%s): %s", d.id, d.kind.upper(), d.destination, why, err)
            self.store.mark_failed(d.id, f"{err} ({why})")
            metrics.DELIVERIES.labels(d.destination, "failed").inc()
            audit.event(
                "delivery_failed", delivery=d.id, destination=d.destination, kind=d.kind, error=f"{err} ({why})"
            )
            return
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempts - 1))
        jitter, now = together or (random.uniform(0.5, 1.0), utcnow())  # many results do not retry in lock-step
        delay *= jitter
        log.warning(
            "delivery %d of %s to %s: %s; retry %d in %.1f s", d.id, d.kind.upper(), d.destination, err, attempts, delay
        )
        self.store.mark_retry(d.id, now + timedelta(seconds=delay), str(err))
        metrics.DELIVERIES.labels(d.destination, "retry").inc()
