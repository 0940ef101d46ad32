"""The node's own Prometheus counters, counted where things happen in ``serve`` (listener, C-STORE handler,
sender). ``/metrics`` (:mod:`dicom_node.web.metrics`) serves them with the figures it reads from the database.
Labels carry no patient data: statuses, calling AE titles, destination names, results."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)
CSTORES = Counter(
    "dicom_node_cstore",
    "C-STORE requests answered, by status and calling AE",
    ["status", "calling_ae"],
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter("dicom_node_received_bytes", "bytes of data sets stored", registry=REGISTRY)
ASSOCIATIONS = Counter(
    "dicom_node_associations", "association requests, by result (accepted, rejected)", ["result"], registry=REGISTRY
)
DELIVERIES = Counter(
    "dicom_node_delivery_attempts",
    "delivery attempts, by destination and result (delivered, retry, failed)",
    ["destination", "result"],
    registry=REGISTRY,
)
ACTIVE = Gauge("dicom_node_associations_active", "associations holding a slot now", registry=REGISTRY)
STOW_REQUESTS = Counter(
    "dicom_node_stow_requests",
    "STOW-RS requests answered, by HTTP status (each instance also counts in dicom_node_cstore_total, calling_ae "
    "STOW:<user>)",
    ["status"],
    registry=REGISTRY,
)
