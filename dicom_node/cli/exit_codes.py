"""Exit codes of the ``dicom-node`` command, the one table that maps errors to them, and :class:`UsageError`.

Exit codes (:data:`EXIT_CODES`, first match wins): 0 ok; 2 bad usage (argparse's own errors, and
:class:`UsageError`: options that do not go together) or bad configuration; 1 any other failure the node reports
on purpose (a :class:`~dicom_node.errors.DicomNodeError`: missing model file, storage failure, unknown study, ...);
70 an unexpected error, a bug (its traceback is printed); 130 interrupted.

A leaf of the CLI package: every command module imports it, it imports nothing of them.
"""

from __future__ import annotations

from dicom_node.errors import ConfigError, DicomNodeError

EXIT_OK = 0
EXIT_USAGE = 2  # what argparse exits with on a usage error
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)
EXIT_INTERRUPTED = 130


class UsageError(DicomNodeError):
    """Options that do not go together, or one that a command needs and did not get (exit 2, as argparse's own
    usage errors)."""


EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (DicomNodeError, 1),
)


def exit_code(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_INTERNAL_ERROR
