"""The listener's association server, built with pynetdicom's public API only.

:func:`start_acceptor` is ``AE.start_server(block=False)`` with the server made by ``AE.make_server`` (public:
"allows the use of a custom association server class", its extra keywords going to that class) as an
:class:`AcceptorServer`, whose per-connection handler is
:class:`~dicom_node.net.pynetdicom_internals.AcceptorRequestHandler` (the ``request_handler`` keyword of
``AssociationServer``). :class:`AcceptorServer` overrides documented hooks of pynetdicom's
``ThreadedAssociationServer`` and of ``socketserver``:

- ``process_request``: a connection over the per-host limit of :class:`~dicom_node.net.admission.Admission`
  gets no thread: it goes to the server's :class:`~dicom_node.net.admission.Refuser`, which answers its
  association request with an A-ASSOCIATE-RJ "local limit exceeded" and closes it (on a TLS connection after
  a TLS handshake of its own, non-blocking in the refuser's thread);
- ``get_request``: TCP_NODELAY on every connection; a TLS connection is only wrapped here, its handshake happens
  in the connection's own thread (:mod:`dicom_node.net.tls`), so one client that stalls it stops nobody else;
- ``shutdown``: as pynetdicom's, without taking the server off the AE's list of the servers ``start_server``
  made (``make_server`` does not put it there); it also ends the refuser.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.net.admission import REQUEST_WAIT_S, Admission, Refuser
from dicom_node.net.fastpath import no_delay
from dicom_node.net.pynetdicom_internals import AcceptorRequestHandler, check_version
from dicom_node.net.spoolfile import cleanup_receive_files
from dicom_node.net.tls import TLSAccept, client_allowed, wrap_accepted


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connections counted by ``admission`` and TLS accepted as ``tls_accept``
    says (see the module)."""

    def __init__(
        self, *args: Any, admission: Admission | None = None, tls_accept: TLSAccept | None = None, **kwargs: Any
    ) -> None:
        self.admission = admission
        self.tls_accept = tls_accept
        self._refuser: Refuser | None = None
        self._refuser_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    @property
    def refuser(self) -> Refuser:
        """The :class:`Refuser` of this server's over-limit connections, made with the first one: it waits for
        their association requests at most :data:`~dicom_node.net.admission.REQUEST_WAIT_S` (or the AE's
        ``acse_timeout``, when shorter)."""
        with self._refuser_lock:
            if self._refuser is None:
                acse = getattr(self.ae, "acse_timeout", None)
                self._refuser = Refuser(
                    wait_s=min(REQUEST_WAIT_S, acse) if acse else REQUEST_WAIT_S,
                    tls_client_allowed=self._tls_client_allowed,
                )
            return self._refuser

    def _tls_client_allowed(self, sock: ssl.SSLSocket, host: str) -> bool:
        return self.tls_accept is None or client_allowed(sock, self.tls_accept, host)

    def process_request(self, request: Any, client_address: Any) -> None:
        """socketserver's hook, called on accept (after ``verify_request``, which accepts all): a connection over
        the per-host limit goes to the refuser, which answers and closes it (TLS too); any other gets its
        thread, as pynetdicom's server does."""
        host = client_address[0]
        if self.admission is not None and not self.admission.connection_opened(host):
            self.refuser.refuse(request, host)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (none left?): the connection is not served, give it back
            if self.admission is not None:
                self.admission.finished(None, host)
            raise

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = cast(socket.socket, self.socket).accept()
        no_delay(client)
        if self.ssl_context:
            return wrap_accepted(self.ssl_context, client), address
        return client, address

    def connection_ended(self, assoc: Any, host: str) -> None:
        """A connection is over (``assoc``: None when it never became an association): delete what is left of
        the association's receive files, give the connection and its slot back."""
        if assoc is not None:
            cleanup_receive_files(assoc)
        if self.admission is not None:
            self.admission.finished(assoc, host)

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        with self._refuser_lock:
            refuser, self._refuser = self._refuser, None
        if refuser is not None:
            refuser.close()


def start_acceptor(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    admission: Admission | None = None,
    *,
    ssl_context: Any = None,
    tls_accept: TLSAccept | None = None,
) -> AcceptorServer:
    """Start serving ``address`` in a thread of its own (as ``AE.start_server(block=False)`` does); returns the
    server, bound already. Refuses a pynetdicom other than the one :mod:`dicom_node.net.pynetdicom_internals`
    was checked against."""
    check_version()
    server = cast(
        AcceptorServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=AcceptorServer,
            request_handler=AcceptorRequestHandler,
            admission=admission,
            tls_accept=tls_accept,
        ),
    )
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True).start()
    return server
