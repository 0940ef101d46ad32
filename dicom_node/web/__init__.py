"""The node's HTTP side (``web.host``/``web.port``, served by ``serve``): ``/healthz``, ``/readyz`` and ``/metrics``,
which carry no patient data (:mod:`dicom_node.web.server`, :mod:`dicom_node.web.metrics`)."""
