"""Sending to a node under test with pynetdicom: a file's bytes exactly as they are."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

__all__ = ["send_file"]


def send_file(node, path, syntaxes: list[str] | None = None) -> Dataset:
    """C-STORE of a file's bytes as they are; the command's SOP Instance UID comes from the file meta.
    ``syntaxes``: the transfer syntaxes to propose (default: pynetdicom's)."""
    from pynetdicom import _config

    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, syntaxes)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return status
