"""Model provenance and node identity for output tests (what the encoders copy into SR, SC and GSPS)."""

from __future__ import annotations

from dicom_node.outputs.equipment import NodeIdentity
from inference.types import ModelInfo

MODELS = (
    ModelInfo("classifier", "efficientnet_b0", "1.0.0", "a1" * 32),
    ModelInfo("detector", "yolov8n", "1.1.0", "b2" * 32),
)
IDENTITY = NodeIdentity(
    device_observer_uid="1.2.826.0.1.3680043.8.498.1",
    software_version="0.1.0",
    institution="Test Hospital",
    station_name="DICOM_NODE",
    models=MODELS,
)
