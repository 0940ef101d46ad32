"""The node's HTTP side (``web.host``/``web.port``, served by ``serve``): the web console behind a login
(:mod:`dicom_node.web.console`, :mod:`dicom_node.web.auth`), and ``/healthz``, ``/readyz`` and ``/metrics``, which
carry no patient data (:mod:`dicom_node.web.server`, :mod:`dicom_node.web.metrics`)."""
