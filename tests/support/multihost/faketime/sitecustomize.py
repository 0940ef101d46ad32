"""Loaded (PYTHONPATH) by the processes of a host whose clock libfaketime skews: ``time.sleep`` through ``select``.

Python 3.11's ``time.sleep`` waits with ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``, which Debian 12's
libfaketime 0.9.10 fails with EINVAL when ``FAKETIME_DONT_FAKE_MONOTONIC=1`` (and without that setting, waits on
locks and events never end). ``select`` with a relative timeout is not affected, nor is anything else the node
uses: the wall clock (``time.time``, ``datetime.now``) is skewed, the monotonic clock and every timeout are not.
"""

import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
