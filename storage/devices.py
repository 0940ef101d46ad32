"""How the node names an acquiring device in site validation, drift watching, the console and ``/metrics``."""

from __future__ import annotations


def device_label(manufacturer: str, model_name: str, station_name: str) -> str:
    """``Acme Medical DR-1000 @ XR-ROOM-1``: Manufacturer and Model Name, then the station; "unknown device" when
    the header names none of them."""
    make = " ".join(p.strip() for p in (manufacturer, model_name) if p and p.strip())
    station = (station_name or "").strip()
    if make and station:
        return f"{make} @ {station}"
    return make or (f"@ {station}" if station else "unknown device")
