"""A real Orthanc PACS for end-to-end tests: own folder, own free ports, the documented routing plugin.

``Orthanc(folder, node_aet=..., node_port=...)`` writes ``orthanc.json`` into ``folder`` built from the
user-facing example ``docs/orthanc/orthanc.json``: only paths, ports, AE titles, StableAge and the
``DicomNodeRouting`` switches and retry delays are replaced, and it loads the example's own plugins, the
routing plugin ``docs/orthanc/route_chest_xrays.py`` (Orthanc's Python plugin) and DICOMweb, so the docs and
the tests run the same rule. ``start()`` runs ``/usr/sbin/Orthanc`` (no /etc/orthanc, nothing from the
network; about 0.5 s), ``storescu()`` sends files into it with dcmtk, and the REST helpers (urllib only) read
what it holds; ``dicomweb_url`` is the root of its QIDO-RS / WADO-RS API for the web-viewer tests.

Orthanc 1.10.1 has no option to bind its HTTP or DICOM server to one address: both listen on all
interfaces. ``RemoteAccessAllowed: false`` refuses HTTP clients other than localhost, and a Lua script
written only for tests (``loopback-only.lua``) refuses instances stored over DICOM from anywhere but
127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from support.node import free_port, wait_for

ORTHANC_BIN = "/usr/sbin/Orthanc"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "orthanc"
DOCS_CONFIG = DOCS / "orthanc.json"
DOCS_PLUGIN = DOCS / "route_chest_xrays.py"
NODE_MODALITY = "ainode"  # symbolic name of the node in DicomModalities (the plugin's default "Modality")
# Debian's orthanc-dicomweb / orthanc-python (bookworm) install the plugins here (the example loads both).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")

LOOPBACK_ONLY_LUA = """\
-- Tests only: Orthanc 1.10.1 cannot bind its DICOM server to 127.0.0.1, so refuse what others send.
function ReceivedInstanceFilter(dicom, origin, info)
   if origin['RequestOrigin'] == 'DicomProtocol' then
      return origin['RemoteIp'] == '127.0.0.1'
   end
   return true
end
"""


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy


def _two_free_ports() -> tuple[int, int]:
    dicom = free_port()
    http = free_port()
    while http == dicom:
        http = free_port()
    return dicom, http


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class Orthanc:
    """An Orthanc process with its config, storage, index and log in ``folder``."""

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "ORTHANC",
        node_aet: str = "DICOM_NODE",
        node_port: int = 11112,
        route: bool = True,
        skip_node_outputs: bool = True,
        route_everything: bool = False,
        stable_age_s: int = 2,
        retry_initial_s: float = 1,
        retry_max_s: float = 4,
        verbose: bool = False,
        dicomweb: bool = True,
        extra_config: dict | None = None,
    ):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet, self.node_aet, self.node_port = aet, node_aet, node_port
        self.route, self.verbose = route, verbose
        self.dicomweb = dicomweb
        self.extra_config = dict(extra_config or {})  # any other Orthanc option (e.g. DICOM TLS)
        self.routing = {
            "Enabled": route,
            "SkipNodeOutputs": skip_node_outputs,
            "RouteEverything": route_everything,
            "RetryInitialSeconds": retry_initial_s,
            "RetryMaxSeconds": retry_max_s,
        }
        for plugin, package in ((PYTHON_PLUGIN, "orthanc-python"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
            if not plugin.exists():
                raise OrthancError(f"{plugin} is missing: apt-get install -y {package} (README, set-up)")
        self.port, self.http_port = _two_free_ports()
        self.config_path = self.folder / "orthanc.json"
        self.log_path = self.folder / "orthanc.log"
        (self.folder / "loopback-only.lua").write_text(LOOPBACK_ONLY_LUA)
        self.stable_age_s = stable_age_s
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._started_once = False
        self.write_config()

    # ------------------------------------------------------------------ config and process
    def write_config(self) -> dict:
        config = json.loads(DOCS_CONFIG.read_text())
        config.update(
            {
                "Name": f"test-{self.aet}",
                "StorageDirectory": str(self.folder / "storage"),
                "IndexDirectory": str(self.folder / "index"),
                "LuaScripts": [str(self.folder / "loopback-only.lua")],
                "PythonScript": str(DOCS_PLUGIN),
                "DicomNodeRouting": dict(config.get("DicomNodeRouting", {}), **self.routing),
                "HttpPort": self.http_port,
                "DicomPort": self.port,
                "DicomAet": self.aet,
                "DicomModalities": {NODE_MODALITY: [self.node_aet, "127.0.0.1", self.node_port]},
                "StableAge": self.stable_age_s,
            }
        )
        if not self.dicomweb:
            config["Plugins"] = [p for p in config["Plugins"] if Path(p) != DICOMWEB_PLUGIN]
        config.update(self.extra_config)
        self.config = config
        self.config_path.write_text(json.dumps(config, indent=2))
        return config

    def route_to_node(self, port: int) -> None:
        """Point the node modality at ``port`` (the port a node bound): in the config file, for restarts, and
        in the running Orthanc through its REST API."""
        self.node_port = port
        self.write_config()
        if self.running():
            self.request(
                "PUT",
                f"/modalities/{NODE_MODALITY}",
                json.dumps({"AET": self.node_aet, "Host": "127.0.0.1", "Port": port}),
            )

    def as_destination(self, name: str = "pacs", outputs: tuple[str, ...] = ("sr", "sc"), mode: str = "live") -> dict:
        """This PACS as an entry of the node's ``destinations`` in config.yaml (live unless ``mode`` says silent)."""
        return {
            "name": name,
            "ae_title": self.aet,
            "host": "127.0.0.1",
            "port": self.port,
            "outputs": list(outputs),
            "mode": mode,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb API (only served with ``dicomweb=True``), without a trailing slash."""
        return self.url + "/dicom-web"

    def start(self, timeout: float = 30) -> "Orthanc":
        """Start Orthanc and wait until its REST API answers. A first start that finds a port taken
        picks new ports and tries again; a restart keeps the ports it had."""
        if self.running():
            raise OrthancError("Orthanc is already running")
        for attempt in range(3):
            self._spawn()
            try:
                wait_for(
                    lambda: self.proc.poll() is not None or self._answers(),
                    timeout,
                    interval=0.05,
                    what=f"Orthanc to answer on {self.url}",
                )
            except AssertionError as exc:
                self.kill()
                raise OrthancError(f"{exc}\n{self.log()[-4000:]}") from exc
            if self.proc.poll() is None:
                return self
            in_use = "port" in self.log().lower() and "in use" in self.log().lower()
            if not in_use or attempt == 2 or self._started_once:
                raise OrthancError(f"Orthanc exited at start ({self.proc.returncode}):\n{self.log()[-4000:]}")
            self.port, self.http_port = _two_free_ports()
            self.write_config()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._close_log()
        self._log = open(self.log_path, "ab")
        args = [ORTHANC_BIN, *(["--verbose"] if self.verbose else []), str(self.config_path)]
        # TCP_NODELAY=1: dcmtk inside Orthanc otherwise keeps Nagle on (~40 ms stalls per small message),
        # as docs/orthanc/README.md recommends for production too.
        self.proc = subprocess.Popen(
            args,
            cwd=self.folder,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def _answers(self) -> bool:
        try:
            with _OPENER.open(self.url + "/system", timeout=2) as resp:
                ok = resp.status == 200
        except OSError:
            return False
        if ok:
            self._started_once = True
        return ok

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait (Orthanc 1.10.1 takes about 3.5 s to shut its servers down)."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.kill()
                raise OrthancError(f"Orthanc ignored SIGTERM for {timeout:.0f}s; killed it") from exc
        self._close_log()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait(30)
        self._close_log()

    def restart(self, timeout: float = 30) -> "Orthanc":
        """Stop and start again: same ports, same storage and index, same config."""
        self.stop()
        return self.start(timeout)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()  # teardown: the data is thrown away, so skip the ~3 s graceful shutdown

    # ------------------------------------------------------------------ DICOM
    def storescu(
        self,
        *files: Path | str,
        extra: tuple[str, ...] = (),
        calling: str = "STORESCU",
        check: bool = False,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        """Send files into Orthanc with dcmtk storescu (-R: propose the files' own SOP classes and
        transfer syntaxes). ``calling=self.node_aet`` makes them look like the node's outputs."""
        cmd = [
            "storescu",
            "-R",
            "-aet",
            calling,
            "-aec",
            self.aet,
            *extra,
            "127.0.0.1",
            str(self.port),
            *map(str, files),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise OrthancError(f"storescu failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def echoscu(self, calling: str = "ECHOSCU") -> bool:
        cmd = ["echoscu", "-aet", calling, "-aec", self.aet, "127.0.0.1", str(self.port)]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0

    def send_to_node(self, resource_id: str) -> Any:
        """C-STORE an Orthanc resource (instance, series, study) to the node now, synchronously."""
        return self.post(f"/modalities/{NODE_MODALITY}/store", json.dumps({"Resources": [resource_id]}))

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: bytes | str | None = None, timeout: float = 30) -> bytes:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: bytes | str) -> Any:
        raw = self.request("POST", path, body)
        return json.loads(raw) if raw.strip() else None

    def system(self) -> dict:
        return self.get("/system")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def count_instances(self) -> int:
        return self.get("/statistics")["CountInstances"]

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID, or None."""
        hits = self.post("/tools/lookup", study_instance_uid)
        ids = [h["ID"] for h in hits if h.get("Type") == "Study"]
        return ids[0] if ids else None

    def study_instances(self, study_orthanc_id: str) -> list[dict]:
        """Orthanc's instance records (ID, MainDicomTags, ParentSeries, ...) of one study."""
        return self.get(f"/studies/{study_orthanc_id}/instances")

    def series_of_study(self, study_uid: str) -> list[dict]:
        """[{ID, Modality, SeriesInstanceUID, SeriesNumber, SeriesDescription, instances: [ids]}]."""
        study = self.find_study(study_uid)
        if study is None:
            return []
        out = []
        for series in self.get(f"/studies/{study}/series"):
            tags = series.get("MainDicomTags", {})
            out.append(
                {
                    "ID": series["ID"],
                    "Modality": tags.get("Modality"),
                    "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
                    "SeriesNumber": tags.get("SeriesNumber"),
                    "SeriesDescription": tags.get("SeriesDescription"),
                    "instances": list(series.get("Instances", [])),
                }
            )
        return out

    def instance_dataset(self, instance_id: str) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.request("GET", f"/instances/{instance_id}/file")))

    def instances_by_modality(self, study_uid: str, modality: str) -> list[Dataset]:
        return [
            self.instance_dataset(i)
            for s in self.series_of_study(study_uid)
            if s["Modality"] == modality
            for i in s["instances"]
        ]

    def jobs(self) -> list[dict]:
        """Orthanc's jobs (the routing rule's C-STOREs run as jobs), newest state included."""
        return self.get("/jobs?expand")

    def wait_jobs_done(self, timeout: float = 60) -> list[dict]:
        """Wait until no job is pending or running; returns the jobs (check their State).

        A failed routing job is resubmitted by the plugin after its backoff, so "Failure" may not be final."""
        seen: dict[str, list[dict]] = {}

        def done() -> bool:
            seen["jobs"] = self.jobs()
            return all(j["State"] in ("Success", "Failure") for j in seen["jobs"])

        wait_for(done, timeout, what="Orthanc jobs to finish")
        return seen["jobs"]
