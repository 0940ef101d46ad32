"""The new series each output starts: its Series Description and its Series Date/Time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["SERIES_DESCRIPTION", "series_dates"]

# One Series Description per output kind, the distinguishing words first: viewers cut the text short, and three
# rows reading "AI result - not for primar..." told nobody which is which.
SERIES_DESCRIPTION = {
    "sr": "AI findings report (SR) - not for primary diagnosis",
    "sc": "AI overlay image (SC) - not for primary diagnosis",
    "gsps": "AI boxes to toggle (PR) - not for primary diagnosis",
}
assert all(len(v) <= 64 for v in SERIES_DESCRIPTION.values())  # LO


def series_dates(*, has_content_date: bool = True) -> dict[str, Any]:
    """Keyword arguments for a highdicom constructor that date the output's series.

    Series Date/Time (Type 3, but viewers and PACS file series under them) = the object's Content Date/Time, both
    now. ``has_content_date=False`` for an IOD without Content Date/Time (the GSPS: highdicom refuses them there):
    the series date and time alone, to the second."""
    now = datetime.now()
    if not has_content_date:
        return {"series_date": now.strftime("%Y%m%d"), "series_time": now.strftime("%H%M%S")}
    date, time_ = now.date(), now.time()
    return {"content_date": date, "content_time": time_, "series_date": date, "series_time": time_}
