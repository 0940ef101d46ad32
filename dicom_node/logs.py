"""Logging without patient identifiers.

The node logs job ids, AE titles, SOP class names, statuses and timings only. pynetdicom would otherwise
log request/response identifiers (and at DEBUG level whole datasets), so it is kept at WARNING and its
identifier logging is switched off.
"""

from __future__ import annotations

import logging
import sys
import traceback

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
        handler.addFilter(ThirdPartyRedaction())
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party loggers: pynetdicom and highdicom would log identifiers at INFO/DEBUG.
    for noisy in (
        "pynetdicom",
        "highdicom",
        "apscheduler",
        "PIL",
        "matplotlib",
        "urllib3",
        "ultralytics",
        "timm",
        "alembic",  # its INFO lines name every plugin at each start; storage.migrate logs an upgrade itself
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in ("apscheduler.executors.default", "apscheduler.scheduler"):  # "job skipped: still running"
        logging.getLogger(chatty).setLevel(logging.ERROR)


class ThirdPartyRedaction(logging.Filter):
    """Exception messages logged by the DICOM libraries themselves (pynetdicom logs ``LOGGER.exception(exc)``
    when a peer's bytes break its state machine) are replaced by their type, and their tracebacks by
    :func:`safe_traceback`: such a message may quote a header value."""

    LIBRARIES = ("pynetdicom", "pydicom", "highdicom")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in self.LIBRARIES:
            return True
        if isinstance(record.msg, BaseException):
            record.msg, record.args = _withheld(record.msg), ()
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{record.getMessage()}\n{safe_traceback(record.exc_info[1])}", ()
            record.exc_info, record.exc_text = None, None
        return True


def _withheld(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__} (message withheld: may hold patient data)"


def safe_traceback(exc: BaseException) -> str:
    """A traceback for the log without patient data: every frame (file, line, function, source line) of the
    exception and its causes, but the message only of the project's own errors, whose messages are written to
    carry none. A third-party message (pydicom quoting an element value, a driver quoting a row) is withheld:
    its type and where it was raised are what a developer needs."""
    from dicom_node.errors import DicomNodeError

    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__))
        text = f"{type(current).__name__}: {current}" if isinstance(current, DicomNodeError) else _withheld(current)
        parts.append(f"Traceback (most recent call last):\n{frames}{text}")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "\n\nwhich was caused by:\n".join(parts)
