"""The DICOM listener: an association acceptor for C-ECHO and C-STORE of every storage SOP class, in the
common transfer syntaxes, served by :mod:`dicom_node.net.acceptor` (with the fast receive path engaged).

What a C-STORE does is the handler's business (:class:`dicom_node.ingest.store_handler.StoreHandler`, handed
in by the composition root); this module only speaks the protocol: AE titles, timeouts, association limits (counted by
:class:`dicom_node.net.admission.Admission`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import audit, metrics
from dicom_node.config import NodeConfig
from dicom_node.net.acceptor import start_acceptor
from dicom_node.net.admission import UNLIMITED, Admission, PeerPolicy
from dicom_node.net.tls import TLSAccept, server_context

try:  # JPEG Lossless (Process 14, non-SV1) exists under this name in pydicom 3
    from pydicom.uid import JPEGLossless
except ImportError:  # pragma: no cover
    JPEGLossless = UID("1.2.840.10008.1.2.4.57")

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# (source, diagnostic) of pynetdicom's own A-ASSOCIATE-RJ -> the reason in the audit trail
REJECT_REASONS: dict[tuple[object, object], str] = {
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised (node.allowed_calling_aets)",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}

StoreHandlerType = Callable[[evt.Event], "Dataset | int"]


class Listener:
    """Runs the pynetdicom AE in its own threads (``start`` returns at once with the bound port)."""

    def __init__(self, node: NodeConfig, on_store: StoreHandlerType):
        self.node = node
        self.on_store = on_store
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self.admission = Admission(
            node.max_associations,
            node.max_connections_per_peer,
            PeerPolicy((p.ae_title, p.hosts) for p in node.allowed_peers),
        )
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.node
        ae = AE(ae_title=node.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if node.allowed_calling_aets:
            ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.maximum_associations = UNLIMITED  # counted by self.admission instead (see dicom_node.net.admission)
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_bytes
        return ae

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.node.port

    @property
    def tls_port(self) -> int | None:
        return int(self._tls_server.server_address[1]) if self._tls_server else self.node.tls.port

    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port (the one the OS chose with ``node.port: 0``)."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self.admission.on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        tls = self.node.tls
        if tls.port is not None:
            context = server_context(tls)  # a bad certificate or key stops the start, with the reason
            self._tls_server = start_acceptor(
                self.ae,
                (self.node.host, tls.port),
                handlers,
                self.admission,
                ssl_context=context,
                tls_accept=TLSAccept(
                    self.node.acse_timeout_s, self.node.network_timeout_s, frozenset(tls.allowed_client_names)
                ),
            )
            log.info(
                "listening (DICOM TLS%s) as %s on %s:%d",
                ", client certificates required" if tls.require_client_certificate else "",
                self.node.ae_title,
                self.node.host,
                self.tls_port,
            )
        if not tls.only:
            self._server = start_acceptor(self.ae, (self.node.host, self.node.port), handlers, self.admission)
            log.info("listening as %s on %s:%d", self.node.ae_title, self.node.host, self.port)
        return self.port

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    @staticmethod
    def _on_echo(event: evt.Event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return 0x0000

    @staticmethod
    def _on_accepted(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        metrics.ASSOCIATIONS.labels("accepted").inc()
        audit.event(
            "association_accepted",
            peer=requestor.address,
            calling_ae=requestor.ae_title,
            called_ae=event.assoc.acceptor.ae_title,
        )

    @staticmethod
    def _on_rejected(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected", requestor.ae_title, requestor.address)
        primitive = event.assoc.acceptor.primitive
        diagnostic = getattr(primitive, "diagnostic", None)
        reason = REJECT_REASONS.get(
            (getattr(primitive, "result_source", None), diagnostic), f"rejected (diagnostic {diagnostic})"
        )
        metrics.ASSOCIATIONS.labels("rejected").inc()
        audit.event("association_rejected", peer=requestor.address, calling_ae=requestor.ae_title, reason=reason)

    @staticmethod
    def _on_aborted(event: evt.Event) -> None:
        log.warning("association with %s aborted", event.assoc.requestor.ae_title)
