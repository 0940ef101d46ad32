"""Logging without patient identifiers.

The node logs job ids, AE titles, SOP class names, statuses and timings only. pynetdicom would otherwise
log request/response identifiers (and at DEBUG level whole datasets), so it is kept at WARNING and its
identifier logging is switched off.
"""
from __future__ import annotations

import logging
import sys

from pynetdicom import _config as pynetdicom_config

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    root = logging.getLogger()
    if not any(getattr(h, "_dicom_node", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._dicom_node = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party loggers: pynetdicom and highdicom would log identifiers at INFO/DEBUG.
    for noisy in ("pynetdicom", "highdicom", "apscheduler", "PIL", "matplotlib", "urllib3", "ultralytics", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in ("apscheduler.executors.default", "apscheduler.scheduler"):   # "job skipped: still running"
        logging.getLogger(chatty).setLevel(logging.ERROR)
