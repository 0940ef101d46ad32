"""dicom-node on several hosts, on one machine: hosts are network namespaces on one LAN (:mod:`support.netns`).

    cluster = Cluster(tmp_path, models).up()     # LAN, PostgreSQL, HAProxy, the PACS (storescp)
    cluster.start_listener("listener1")          # dicom-node serve, workers.count 0, web on 0.0.0.0:8480
    cluster.start_worker("worker2", skew="+120s")  # dicom-node worker with its clock 2 minutes ahead (libfaketime)
    sent = cluster.send(studies, parallel=4)     # storescu from the PACS host through HAProxy, retried as a PACS does
    cluster.close()

The LAN (10.77.N.0/24, N the first free) holds:

=========== ==== ==========================================================================================
host        .x   what runs there
=========== ==== ==========================================================================================
(root)      .1   the test process and PostgreSQL (this machine's own namespace, on the LAN by a veth)
lb          .5   HAProxy, from ``docs/haproxy/haproxy.cfg`` (the example itself: see :func:`haproxy_config`)
pacs        .10  the PACS: ``storescp`` receiving the results (AE PACS, port 11112) and ``storescu`` sending
listenerN   .1N  ``dicom-node serve`` (DICOM 11112, web 8480, no workers)
workerN     .2N  ``dicom-node worker``
=========== ==== ==========================================================================================

The spool is one real folder (``folder/spool``), bind-mounted in each node host's own mount namespace at a path of
that host's (``folder/hosts/<host>/spool``): as a shared file system would be, mounted wherever each host likes.
Each host has its configuration and log in ``folder/hosts/<host>/``.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from support.netns import Host, Lan
from support.node import wait_for
from support.postgres import PostgresServer, find_bin
from support.real_studies import make_real_studies

REPO = Path(__file__).resolve().parents[3]
HAPROXY_EXAMPLE = REPO / "docs" / "haproxy" / "haproxy.cfg"
FAKETIME_SHIM = Path(__file__).resolve().parent / "faketime"  # sitecustomize.py for a skewed host's Python
AE = "DICOM_NODE"
DICOM_PORT, WEB_PORT = 11112, 8480
OCTETS = {"lb": 5, "pacs": 10, "listener1": 11, "listener2": 12, "listener3": 13, "worker1": 21, "worker2": 22}
LISTENING = re.compile(r"listening as \S+ on \S+:(\d+)")
READY = re.compile(r"worker \S+ ready")


def libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def skewed_env(skew: str) -> dict[str, str]:
    """The environment of a process whose wall clock is ``skew`` off ("+120s"): libfaketime skews ``time.time`` and
    ``datetime.now``, not the monotonic clock (timeouts, sleeps); faketime/sitecustomize.py works around its
    broken ``clock_nanosleep`` (Python's ``time.sleep``)."""
    lib = libfaketime()
    assert lib, "libfaketime is missing (apt-get install -y faketime libfaketime)"
    path = os.pathsep.join(p for p in (str(FAKETIME_SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {"LD_PRELOAD": lib, "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": path}


def missing_tools() -> list[str]:
    """What the cluster needs and this machine lacks (Debian packages to install)."""
    out = []
    for tool, package in (("haproxy", "haproxy"), ("storescu", "dcmtk"), ("ip", "iproute2")):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            out.append(package)
    if libfaketime() is None:
        out.append("libfaketime")
    if find_bin() is None:
        out.append("postgresql")
    return out


def haproxy_config(example: str, *, bind: str, servers: dict[str, str], stats_socket: Path) -> str:
    """``docs/haproxy/haproxy.cfg`` for this LAN: its ``bind`` address, one ``server`` line per listener (name ->
    address, the check options of the example's first server line), the stats socket in the test's folder, and the
    log on stdout (HAProxy's own output, kept in the host's log). Everything else is the example as shipped."""
    lines = example.splitlines()
    server_lines = [i for i, line in enumerate(lines) if re.match(r"\s+server\s", line)]
    assert server_lines, "the example has no server lines"
    indent, options = re.match(r"(\s+)server\s+\S+\s+\S+\s*(.*)$", lines[server_lines[0]]).groups()
    new_servers = [f"{indent}server {name} {ip}:{DICOM_PORT} {options}".rstrip() for name, ip in servers.items()]
    out = []
    for i, line in enumerate(lines):
        if i == server_lines[0]:
            out += new_servers
        elif i in server_lines:
            continue
        elif re.match(r"\s+bind\s", line):
            out.append(re.sub(r"bind\s+\S+", f"bind {bind}", line, count=1))
        elif re.match(r"\s+stats socket\s", line):
            out.append(re.sub(r"stats socket\s+\S+", f"stats socket {stats_socket}", line, count=1))
        elif re.match(r"\s+log\s+/dev/log", line):
            out.append(re.sub(r"log\s+/dev/log", "log stdout format raw", line, count=1))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


class LanPostgres(PostgresServer):
    """:class:`support.postgres.PostgresServer` (the same throwaway server as the storage tests') listening on the
    LAN too, with the LAN allowed in pg_hba.conf: the database every host reaches over the network."""

    def __init__(self, bindir: Path, lan_address: str, lan_network: str):
        super().__init__(bindir)
        self.lan_address, self.lan_network = lan_address, lan_network
        self.listen = (lan_address,)
        self.settings = ("max_connections=200", "fsync=off", "synchronous_commit=off")
        self.hba = (f"host all all {lan_network} trust",)


@dataclass
class Study:
    uid: str
    files: list[Path]
    sop_uids: list[str]


def make_studies(folder: Path, n: int, *, size: int = 256, two_every: int = 2, seed: int = 0) -> list[Study]:
    """``n`` studies of real radiographs (nih-matched, :func:`support.real_studies.make_real_studies`) shrunk to
    ``size`` pixels; every ``two_every``-th study gets a second image (the same picture mirrored, its own UIDs)."""

    def shrink(pixels: np.ndarray) -> np.ndarray:
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)

    real = make_real_studies(folder, n, split=None, seed=seed, transform=shrink, accession_prefix="MH")
    out = []
    for i, r in enumerate(real):
        study = Study(r.study_uid, [r.path], [r.sop_uid])
        if two_every and i % two_every == 1:
            ds = pydicom.dcmread(r.path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.InstanceNumber = 2
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
            second = r.path.with_name(r.path.stem + "-2.dcm")
            ds.save_as(second, enforce_file_format=True)
            study.files.append(second)
            study.sop_uids.append(ds.SOPInstanceUID)
        out.append(study)
    return out


@dataclass
class SendReport:
    """What the senders did: per study the attempts it took; failures seen (rc and the end of storescu's output)."""

    attempts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    instances: int = 0

    @property
    def retried(self) -> list[str]:
        return [uid for uid, n in self.attempts.items() if n > 1]

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


class Cluster:
    """The LAN, PostgreSQL, HAProxy, the PACS and the node hosts; everything goes in :meth:`close`."""

    def __init__(self, folder: Path, models: dict[str, str], *, stable_after_s: float = 8, job_lease_s: float = 10):
        self.folder = Path(folder)
        self.models = models
        self.stable_after_s, self.job_lease_s = stable_after_s, job_lease_s
        self.spool = self.folder / "spool"  # the shared file system's one real folder
        self.lan = Lan()
        self.pg: LanPostgres | None = None
        self.db_local = self.db_lan = ""
        self.engine = None
        self.node_hosts: dict[str, Host] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._offsets: dict[str, int] = {}
        self.skews: dict[str, str | None] = {}
        self.haproxy: subprocess.Popen | None = None
        self.storescp: subprocess.Popen | None = None
        # a UNIX socket path has at most 97 characters for HAProxy: a short folder of its own, not the test's
        self._socket_dir = Path(tempfile.mkdtemp(prefix="dn-lb-"))
        self.stats_socket = self._socket_dir / "admin.sock"
        self.received = self.folder / "hosts" / "pacs" / "received"

    # ---- the machine ----------------------------------------------------------------------------------------
    def up(self, listeners: tuple[str, ...] = ("listener1", "listener2")) -> Cluster:
        self.lan.up()
        bindir = find_bin()
        assert bindir is not None, "PostgreSQL server binaries are missing"
        self.pg = LanPostgres(bindir, self.lan.gateway, str(self.lan.network)).start()
        self.db_local = self.pg.new_database()
        self.db_lan = self.db_local.replace("@127.0.0.1:", f"@{self.lan.gateway}:")
        self.engine = create_engine(self.db_local, pool_pre_ping=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        from storage import Store

        Store(self.db_local, self.spool).close()  # the schema, once, before any host starts
        self.start_pacs()
        self.start_haproxy(listeners)
        return self

    def host(self, name: str) -> Host:
        if name not in self.lan.hosts:
            self.lan.add_host(name, OCTETS[name])
        return self.lan.hosts[name]

    def host_dir(self, name: str) -> Path:
        d = self.folder / "hosts" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start_pacs(self) -> None:
        pacs = self.host("pacs")
        self.received.mkdir(parents=True, exist_ok=True)
        # +uf: a file per object received, even one received twice (so duplicates are counted, not overwritten)
        self.storescp = pacs.popen(
            ["storescp", "-aet", "PACS", "+uf", "-od", str(self.received), str(DICOM_PORT)],
            log=self.host_dir("pacs") / "storescp.log",
        )
        wait_for(lambda: self._port_open(pacs, DICOM_PORT), 20, 0.1, what="storescp to listen")

    def start_haproxy(self, listeners: tuple[str, ...]) -> None:
        lb = self.host("lb")
        cfg = haproxy_config(
            HAPROXY_EXAMPLE.read_text(),
            bind=f":{DICOM_PORT}",
            servers={name: self.address(name) for name in listeners},
            stats_socket=self.stats_socket,
        )
        path = self.host_dir("lb") / "haproxy.cfg"
        path.write_text(cfg)
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.haproxy = lb.popen(["haproxy", "-db", "-f", str(path)], log=self.host_dir("lb") / "haproxy.log")
        wait_for(lambda: self.stats_socket.exists() and self._port_open(lb, DICOM_PORT), 20, 0.1, what="HAProxy")

    def address(self, name: str) -> str:
        return str(self.lan.network.network_address + OCTETS[name])

    @staticmethod
    def _port_open(host: Host, port: int) -> bool:
        try:
            socket.create_connection((host.ip, port), timeout=1).close()
            return True
        except OSError:
            return False

    # ---- node hosts -----------------------------------------------------------------------------------------
    def config(self, name: str, **over) -> Path:
        """The host's config.yaml (storage.root = its own mount point of the shared spool)."""
        from dicom_node.config import NodeConfig

        d = self.host_dir(name)
        mount = d / "spool"
        mount.mkdir(exist_ok=True)
        node = {"ae_title": AE, "host": "0.0.0.0", "port": DICOM_PORT}
        if "instance_name" in NodeConfig.model_fields:
            node["instance_name"] = name
        cfg = {
            "node": node,
            "storage": {"root": str(mount), "database_url": self.db_lan, "min_free_disk_mb": 1},
            "studies": {"stable_after_s": self.stable_after_s},
            "selection": {"min_patient_age_years": None},
            "inference": {"models": {**self.models, "threads": 1}},
            "workers": {"count": 0, "job_lease_s": self.job_lease_s, "poll_interval_s": 0.2},
            "web": {"enabled": True, "host": "0.0.0.0", "port": WEB_PORT},
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": self.address("pacs"),
                    "port": DICOM_PORT,
                    "outputs": ["sr", "sc", "gsps"],
                    "mode": "live",
                }
            ],
            "delivery": {"backoff_initial_s": 1, "backoff_max_s": 5},
        }
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def launch(self, name: str, command: str | None = None, *, skew: str | None = None) -> subprocess.Popen:
        """Start ``dicom-node serve`` (listener hosts) or ``dicom-node worker`` (worker hosts; ``command`` says
        otherwise) without waiting: see :meth:`wait_started`. ``skew``: the host's clock that far off (e.g.
        "+120s", libfaketime: :func:`skewed_env`)."""
        command = command or ("worker" if name.startswith("worker") else "serve")
        env = skewed_env(skew) if skew else None
        self.skews[name] = skew
        host = self.host(name)
        d = self.host_dir(name)
        log = d / "node.log"
        self._offsets[name] = log.stat().st_size if log.exists() else 0
        proc = host.popen(
            [sys.executable, "-m", "dicom_node", command, "--config", str(self.config(name))],
            mounts={self.spool: d / "spool"},
            env=env,
            log=log,
        )
        self.node_hosts[name] = host
        self.procs[name] = proc
        return proc

    def wait_started(self, *names: str, timeout: float = 180) -> None:
        """Until each host's process says it is listening (serve) or ready (worker)."""

        def started(name: str) -> bool:
            text = self.log(name)[self._offsets[name] :]
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name}: dicom-node exited ({self.procs[name].returncode}):\n{text[-4000:]}")
            return bool(LISTENING.search(text) or READY.search(text))

        for name in names:
            wait_for(lambda n=name: started(n), timeout, 0.2, what=f"{name} to start")

    def start_listener(self, name: str) -> subprocess.Popen:
        proc = self.launch(name, "serve")
        self.wait_started(name)
        return proc

    def start_worker(self, name: str, skew: str | None = None) -> subprocess.Popen:
        proc = self.launch(name, "worker", skew=skew)
        self.wait_started(name)
        return proc

    def clock_offset(self, name: str) -> float:
        """How far the host's wall clock is from this one's, as Python there reads it (time.time, datetime.now)."""
        env = skewed_env(self.skews[name]) if self.skews.get(name) else {}
        code = "import time, datetime; print(time.time(), datetime.datetime.now(datetime.UTC).timestamp())"
        before = time.time()
        r = self.host(name).run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        after = time.time()
        assert r.returncode == 0, r.stderr
        t, dt = map(float, r.stdout.split())
        assert abs(t - dt) < 1, f"time.time() and datetime.now() disagree on {name}: {t} {dt}"
        return t - (before + after) / 2

    def cli(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``dicom-node ARGS --config <the host's>`` run on the host (its spool mount, its network)."""
        return self.host(name).run(
            [sys.executable, "-m", "dicom_node", *args, "--config", str(self.config(name))],
            mounts={self.spool: self.host_dir(name) / "spool"},
            timeout=timeout,
            capture_output=True,
            text=True,
        )

    def kill_host(self, name: str) -> int:
        """kill -9 every process of the host (the machine lost); its mount namespace goes with them."""
        return self.lan.hosts[name].kill_all()

    def log(self, name: str) -> str:
        p = self.folder / "hosts" / name / "node.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def readyz(self, name: str) -> dict | None:
        """The listener's /readyz as JSON (any status), or None when it does not answer."""
        url = f"http://{self.address(name)}:{WEB_PORT}/readyz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")
        except (OSError, ValueError):
            return None

    # ---- HAProxy --------------------------------------------------------------------------------------------
    def haproxy_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def haproxy_servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers: name -> HAProxy's stats (status, stot = sessions so far, ...)."""
        lines = self.haproxy_command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, line.split(","))) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "dicom_nodes" and r["svname"] not in ("BACKEND",)}

    def set_server(self, name: str, enabled: bool) -> None:
        """Take a listener out of HAProxy (maintenance) or put it back, as an operator would."""
        self.haproxy_command(f"{'enable' if enabled else 'disable'} server dicom_nodes/{name}")

    def wait_up(self, *names: str, timeout: float = 30) -> None:
        """Until HAProxy's health checks (/readyz) have each of these listeners UP."""
        wait_for(
            lambda: all(self.haproxy_servers()[n]["status"] == "UP" for n in names),
            timeout,
            0.2,
            what=f"HAProxy to see {', '.join(names)} UP",
        )

    # ---- sending (the PACS's storescu, through HAProxy) -----------------------------------------------------
    def send_one(self, study: Study, timeout: float = 120) -> tuple[bool, str]:
        """One association for the study's files; True when every file was acknowledged (Success or Warning)."""
        r = self.host("pacs").run(
            [
                *("storescu", "-v", "-aet", "PACS", "-aec", AE, "-to", "10", "-ta", "30", "-td", "60"),
                *(self.address("lb"), str(DICOM_PORT)),
                *map(str, study.files),
            ],
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        out = r.stdout + r.stderr
        acked = len(re.findall(r"Received Store Response \((Success|Warning)", out))
        return r.returncode == 0 and acked == len(study.files), f"rc {r.returncode}: {out[-300:]}"

    def send(
        self,
        studies: list[Study],
        *,
        parallel: int = 4,
        retry_after_s: float = 1.0,
        max_attempts: int = 10,
        on_acked=None,
    ) -> SendReport:
        """Send each study in an association of its own, ``parallel`` at once, as a PACS routes; a study that was
        not acknowledged whole is sent again (all of it) after ``retry_after_s``. ``on_acked(n)`` is called with
        the number of studies acknowledged so far."""
        report = SendReport()
        todo: queue.Queue[Study] = queue.Queue()
        for s in studies:
            todo.put(s)
        lock = threading.Lock()
        done = [0]
        given_up: list[str] = []

        def sender() -> None:
            while True:
                try:
                    study = todo.get_nowait()
                except queue.Empty:
                    return
                with lock:
                    report.attempts[study.uid] = report.attempts.get(study.uid, 0) + 1
                    attempt = report.attempts[study.uid]
                ok, detail = self.send_one(study)
                if ok:
                    with lock:
                        done[0] += 1
                        report.instances += len(study.files)
                        n = done[0]
                    if on_acked:
                        on_acked(n)
                    continue
                with lock:
                    report.failures.append(f"{study.uid} attempt {attempt}: {detail}")
                if attempt >= max_attempts:
                    with lock:
                        given_up.append(study.uid)
                    continue
                time.sleep(retry_after_s)
                todo.put(study)

        t0 = time.monotonic()
        threads = [threading.Thread(target=sender, daemon=True) for _ in range(parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.seconds = time.monotonic() - t0
        if given_up or done[0] != len(studies):
            raise AssertionError(f"{done[0]} of {len(studies)} studies acknowledged: {report.failures[-3:]}")
        return report

    # ---- what the database and the PACS hold ----------------------------------------------------------------
    def sql(self, query: str, **params) -> list[dict]:
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(text(query), params)]

    def pacs_objects(self) -> list[tuple[str, str, str]]:
        """(Study Instance UID, Modality, SOP Instance UID) of every object the PACS received, duplicates too."""
        out = []
        for p in sorted(self.received.iterdir()):
            if p.is_file():
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - still being written
                    continue
                out.append((str(ds.StudyInstanceUID), str(ds.Modality), str(ds.SOPInstanceUID)))
        return out

    def tmp_files(self) -> list[Path]:
        return [p for p in (self.spool / "tmp").rglob("*") if p.is_file()]

    def close(self) -> None:
        try:
            self.lan.close()  # every process of every host (nodes, HAProxy, storescp), namespaces, links
        finally:
            if self.engine is not None:
                self.engine.dispose()
            if self.pg is not None:
                self.pg.stop()
            shutil.rmtree(self._socket_dir, ignore_errors=True)
