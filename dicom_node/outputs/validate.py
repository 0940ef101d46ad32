"""Check written output objects with the standard's reference tools (used by tests, and by operators).

- ``dciodvfy`` (dicom3tools) checks a file against its IOD: lines "Error - ..." are errors,
  "Warning - ..." warnings.
- ``dsrdump`` (dcmtk) renders an SR document as text; it must read what the node writes.
- PixelMed's ``DicomSRValidator`` (Debian pixelmed-apps) checks an SR against its templates (TID 1500 ...):
  lines "Error: ..." are errors, "Warning: ..." warnings.

Both tools are optional at run time: :func:`tools_available` says whether they are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import EncodingError

__all__ = ["IodReport", "dciodvfy", "dsrdump", "sr_validator", "tools_available", "assert_valid"]

PIXELMED_JAR = "/usr/share/java/pixelmed.jar"


@dataclass(frozen=True)
class IodReport:
    iod: str  # the IOD dciodvfy recognised (its first output line)
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    @property
    def ok(self) -> bool:
        return not self.errors


def tools_available() -> dict[str, bool]:
    tools = {tool: shutil.which(tool) is not None for tool in ("dciodvfy", "dsrdump")}
    tools["DicomSRValidator"] = shutil.which("java") is not None and Path(PIXELMED_JAR).is_file()
    return tools


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise EncodingError(f"{args[0]} is not installed (Debian: dicom3tools / dcmtk)")
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise EncodingError(f"{args[0]} did not finish within {timeout_s:.0f} s") from exc


def dciodvfy(path: str | os.PathLike, *, timeout_s: float = 60) -> IodReport:
    """Run dciodvfy on ``path`` and split its findings into errors and warnings."""
    proc = _run(["dciodvfy", str(Path(path))], timeout_s)
    text = (proc.stdout or "") + (proc.stderr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = tuple(ln for ln in lines if ln.startswith("Error"))
    warnings = tuple(ln for ln in lines if ln.startswith("Warning"))
    iod = next((ln for ln in lines if not ln.startswith(("Error", "Warning"))), "")
    return IodReport(iod=iod, errors=errors, warnings=warnings, output=text)


def dsrdump(path: str | os.PathLike, *options: str, timeout_s: float = 60) -> str:
    """The dsrdump rendering of an SR (default options: long values, instance UIDs, templates).

    Raises :class:`EncodingError` if dsrdump cannot read the document.
    """
    opts = list(options) or ["+Pl", "+Pu", "+Pt"]
    proc = _run(["dsrdump", *opts, str(Path(path))], timeout_s)
    if proc.returncode != 0:
        raise EncodingError(f"dsrdump cannot read {Path(path).name}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def sr_validator(path: str | os.PathLike, *, timeout_s: float = 120) -> IodReport:
    """PixelMed's DicomSRValidator on an SR: IOD and template (TID 1500, 1410, ...) errors and warnings.

    Run through java directly: its XSLT exceeds the JDK's default XPath operator limits, which the Debian
    wrapper script does not lift."""
    if not Path(PIXELMED_JAR).is_file():
        raise EncodingError(f"{PIXELMED_JAR} is missing (Debian: pixelmed-apps)")
    limits = [f"-Djdk.xml.{k}=0" for k in ("xpathExprGrpLimit", "xpathExprOpLimit", "xpathTotalOpLimit")]
    # One document per JVM, which lives a few seconds: the quick compiler alone halves the CPU time it takes.
    quick = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
    proc = _run(
        ["java", *quick, *limits, "-cp", PIXELMED_JAR, "com.pixelmed.validate.DicomSRValidator", str(Path(path))],
        timeout_s,
    )
    text = (proc.stdout or "") + (proc.stderr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if proc.returncode != 0 or not any(ln.startswith("Found Root Template") for ln in lines):
        raise EncodingError(f"DicomSRValidator could not check {Path(path).name}:\n{text[-2000:]}")
    errors = tuple(ln for ln in lines if ln.startswith("Error"))
    warnings_ = tuple(ln for ln in lines if ln.startswith("Warning"))
    iod = next((ln for ln in lines if ln.startswith("Found") and "IOD" in ln), "")
    return IodReport(iod=iod, errors=errors, warnings=warnings_, output=text)


def assert_valid(path: str | os.PathLike) -> IodReport:
    """dciodvfy with zero errors, else :class:`EncodingError` listing them."""
    report = dciodvfy(path)
    if report.errors:
        raise EncodingError(f"{Path(path).name} fails {report.iod or 'IOD'} validation:\n" + "\n".join(report.errors))
    return report
