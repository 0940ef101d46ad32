"""The ``dicom-node`` command line: :func:`main`, which dispatches a command and turns its failure into an exit code.

Exit codes (:data:`EXIT_CODES`, first match wins): 0 ok; 2 bad usage or configuration; 1 any other failure the
node reports on purpose (a :class:`~dicom_node.errors.DicomNodeError`: missing model file, storage failure,
unknown study, ...); 70 an unexpected error, a bug (its traceback is printed); 130 interrupted.

The package: :mod:`~dicom_node.cli.exit_codes` (the table), :mod:`~dicom_node.cli.node` (the node's commands and
the main parser), :mod:`~dicom_node.cli.command_table` (names and help of the training commands), and the
training commands, imported only when one of them runs: :mod:`~dicom_node.cli.offline` (their parser and
dispatch), :mod:`~dicom_node.cli.data_options`, :mod:`~dicom_node.cli.training`,
:mod:`~dicom_node.cli.tuning`, :mod:`~dicom_node.cli.models`, :mod:`~dicom_node.cli.onnx_export`.
"""

from __future__ import annotations

import sys
import traceback

from dicom_node.cli.command_table import TRAINING_COMMANDS
from dicom_node.cli.exit_codes import (
    EXIT_CODES,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    exit_code,
)
from dicom_node.cli.node import build_parser

__all__ = [
    "EXIT_CODES",
    "EXIT_INTERNAL_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "TRAINING_COMMANDS",
    "UsageError",
    "build_parser",
    "exit_code",
    "main",
]


def _run_training(argv: list[str]) -> int:
    from dicom_node.cli.offline import main as training_main  # lazy: the node never imports training code

    return training_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in TRAINING_COMMANDS:
            return _run_training(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place every command's failure becomes an exit code
        code = exit_code(exc)
        if code == EXIT_INTERNAL_ERROR:
            traceback.print_exc()
            print(
                f"dicom-node: internal error ({type(exc).__name__}); please report it with the traceback above",
                file=sys.stderr,
            )
        else:
            print(f"dicom-node: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
