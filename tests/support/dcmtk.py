"""dcmtk's storescp as a receiving peer: the PACS the node delivers to, or a stand-in for the node."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pydicom

from support.node import free_port, wait_for


class DcmtkStoreSCP:
    """``storescp`` writing what it receives into ``folder/received``. ``refuse``: reject every association
    (``--refuse``). dcmtk cannot report a port the OS chose, so a free one is picked (and retried if taken)."""

    def __init__(self, folder: Path, aet: str = "PACS", port: int | None = None, refuse: bool = False):
        self.folder = Path(folder)
        self.out = self.folder / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.aet, self.port, self.refuse = aet, port, refuse
        self.proc: subprocess.Popen | None = None

    def start(self) -> DcmtkStoreSCP:
        for _ in range(5):
            port = self.port or free_port()
            log = open(self.folder / "storescp.log", "ab")
            cmd = [
                "storescp",
                "-aet",
                self.aet,
                "-od",
                str(self.out),
                *(["--refuse"] if self.refuse else []),
                str(port),
            ]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if (
                wait_for(
                    lambda p=port: self._listening(p) or self.proc.poll() is not None,
                    20,
                    interval=0.05,
                    what="storescp to listen",
                )
                and self.proc.poll() is None
            ):
                self.port = port
                return self
            if self.port:  # a fixed port that cannot be bound: say so
                break
        raise RuntimeError(f"storescp could not listen:\n{(self.folder / 'storescp.log').read_text()}")

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> list[pydicom.Dataset]:
        """The data sets storescp has finished writing (it writes in place: one still being written is left out
        until it is whole)."""
        whole = (_whole(p) for p in sorted(self.out.iterdir()) if p.is_file())
        return [ds for ds in whole if ds is not None]

    def dataset(self, sop_uid: str) -> pydicom.Dataset | None:
        """The received data set once storescp has finished writing it, else None."""
        for p in self.out.iterdir():
            if p.name.endswith("." + sop_uid):
                return _whole(p)
        return None

    def received_uids(self) -> set[str]:
        """SOP Instance UIDs received (storescp names files <modality>.<SOP Instance UID>)."""
        return {p.name.split(".", 1)[1] for p in self.out.iterdir()}


def _whole(path: Path) -> pydicom.Dataset | None:
    """The data set in ``path`` read to its end, or None while it is still being written."""
    try:
        ds = pydicom.dcmread(path)
        ds.get("PixelData")  # read everything, pixel data included
        return ds
    except Exception:  # noqa: BLE001 - still being written: truncated, no preamble yet
        return None
