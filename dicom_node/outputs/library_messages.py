"""What the libraries (highdicom, pydicom) say while an output is built, kept free of patient data.

Their exception messages and warnings can quote a header value (a name, a date): :func:`library_error` reports
an exception by its type and where it was raised, :func:`no_phi_warnings` silences the warnings that quote one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["library_error", "no_phi_warnings"]


def library_error(exc: BaseException) -> str:
    """A library's exception without its message (which can quote a header value, i.e. patient data): its type
    and the function that raised it, for logs and job reasons."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        where = f"{tb.tb_frame.f_code.co_name} ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]})"
        tb = tb.tb_next
    return f"{type(exc).__name__} in {where}" if where else type(exc).__name__


@contextlib.contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence library warnings that quote patient data (highdicom's person-name check prints the
    name) while an output object is built: no PHI in logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        yield
