"""dicom-node: networking, DICOM encoding, CLI and the composition root."""

__version__ = "0.1.0"
