"""The listener's association server, built with pynetdicom's public API only.

:func:`start_acceptor` is ``AE.start_server(block=False)`` with the server made by ``AE.make_server`` (public:
"allows the use of a custom association server class", its extra keywords going to that class) as an
:class:`AcceptorServer`, whose per-connection handler is
:class:`~dicom_node.net.pynetdicom_internals.AcceptorRequestHandler` (the ``request_handler`` keyword of
``AssociationServer``). :class:`AcceptorServer` overrides documented hooks of pynetdicom's
``ThreadedAssociationServer`` and of ``socketserver``:

- ``verify_request``: a connection over the limits of :class:`~dicom_node.net.admission.Admission` is closed on
  accept, before a thread exists for it;
- ``get_request``: TCP_NODELAY on every connection; a TLS connection is only wrapped here, its handshake happens
  in the connection's own thread (:mod:`dicom_node.net.tls`), so one client that stalls it stops nobody else;
- ``shutdown``: as pynetdicom's, without taking the server off the AE's list of the servers ``start_server``
  made (``make_server`` does not put it there).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.net.admission import Admission
from dicom_node.net.fastpath import no_delay
from dicom_node.net.pynetdicom_internals import AcceptorRequestHandler, check_version
from dicom_node.net.spoolfile import cleanup_receive_files
from dicom_node.net.tls import TLSAccept, wrap_accepted


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connections counted by ``admission`` and TLS accepted as ``tls_accept``
    says (see the module)."""

    def __init__(
        self, *args: Any, admission: Admission | None = None, tls_accept: TLSAccept | None = None, **kwargs: Any
    ) -> None:
        self.admission = admission
        self.tls_accept = tls_accept
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook, called on accept: False closes the connection before a thread exists for it."""
        return self.admission is None or self.admission.connection_opened(client_address[0])

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
