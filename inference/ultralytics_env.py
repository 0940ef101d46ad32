"""Make ultralytics work offline. Import this module BEFORE any ``import ultralytics``.

On import it calls :func:`configure` once, which (respecting variables already set):

- sets ``YOLO_OFFLINE=1`` (no online checks, no hub, no downloads),
- sets ``YOLO_CONFIG_DIR`` (ultralytics' settings + fonts) and ``MPLCONFIGDIR`` (matplotlib
  cache), by default under ``<repo>/.yolo/`` when that is writable, else under the system temp
  folder (``dicom-node-yolo-<uid>``),
- copies matplotlib's DejaVuSans.ttf to ``$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf`` (and
  ``Arial.Unicode.ttf``) so that ultralytics' plotting never tries to download a font.

``DICOM_NODE_YOLO_DIR`` may name the base folder explicitly (a path override, like the other
``DICOM_NODE_*`` environment overrides). Environment variables are process-wide by nature; this
module holds no configuration of its own beyond what it writes into ``os.environ``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["configure", "default_base_dir"]

_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def default_base_dir() -> Path:
    if env := os.environ.get("DICOM_NODE_YOLO_DIR"):
        return Path(env).expanduser()
    local = Path(__file__).resolve().parents[1] / ".yolo"
    if _writable(local):
        return local
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"dicom-node-yolo-{uid}"


def _matplotlib_font() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")  # locate without importing matplotlib
    if spec is None or not spec.submodule_search_locations:
        return None
    ttf = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ttf if ttf.is_file() else None


def configure(base_dir: str | os.PathLike | None = None) -> Path:
    """Set the offline environment for ultralytics; return the YOLO_CONFIG_DIR in use."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    base = Path(base_dir) if base_dir is not None else None
    if "YOLO_CONFIG_DIR" not in os.environ or "MPLCONFIGDIR" not in os.environ:
        base = base or default_base_dir()
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(base)))
    os.environ.setdefault("MPLCONFIGDIR", str(Path(base or config_dir) / "matplotlib"))
    for d in (config_dir / "Ultralytics", Path(os.environ["MPLCONFIGDIR"])):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # ultralytics falls back to a temp dir itself; fonts then come from matplotlib's list
    src = _matplotlib_font()
    if src is not None:
        for name in _FONTS:
            dst = config_dir / "Ultralytics" / name
            if not dst.exists():
                try:
                    tmp = dst.with_name(f".{name}.{os.getpid()}")
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)
                except OSError:
                    pass
    return config_dir


configure()
