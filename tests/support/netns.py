"""Hosts on one machine: Linux network namespaces on a bridge, each host's processes in a mount namespace of their
own (so a folder can be bind-mounted at a different path on each host) with a host name of their own.

    lan = Lan().up()                                   # a switch; the root namespace is 10.77.N.1 (N free)
    a = lan.add_host("listener1", 11)                  # namespace + veth, address 10.77.N.11
    p = a.popen(["dicom-node", "serve", ...], mounts={"/real/spool": "/hosts/a/spool"}, log=path)
    a.kill_all()                                       # kill -9 every process of the host (ip netns pids)
    lan.close()                                        # processes, namespaces, veths, bridge: all gone

The root namespace (the test process) is on the LAN too, so a server the test starts there (PostgreSQL) is
reachable from every host at ``lan.gateway``. Names carry the test process's pid in hex (``mh<pid>``): runs at
once do not collide, and :func:`sweep_stale` removes what a killed run left. Needs root, ``ip`` (iproute2) and
``unshare``/``mount`` (util-linux).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PREFIX = "mh"  # every namespace, veth and bridge made here starts with mh<pid in hex>
SUBNETS = [ipaddress.ip_network(f"10.77.{n}.0/24") for n in range(0, 250)]


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"{tool} is missing (apt-get install -y iproute2 util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_namespace(ns: str, timeout: float = 10) -> int:
    """kill -9 every process in network namespace ``ns`` until none is left; returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := namespace_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {ns} survive kill -9: {pids}")
        time.sleep(0.05)  # (a zombie stays listed until its parent, maybe this process, reaps it)
        _reap(pids)
    return len(killed)


def _reap(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _delete(tag: str) -> None:
    """Every namespace and link of the run ``tag`` (processes first)."""
    for ns in _ip("netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(f"{PREFIX}{tag}-"):
            kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for m in re.finditer(r"^\d+: ([^:@]+)", _ip("-o", "link", "show", check=False).stdout, flags=re.M):
        if m.group(1).startswith(f"{PREFIX}{tag}-"):
            _ip("link", "del", m.group(1), check=False)


def sweep_stale() -> list[str]:
    """Remove the namespaces and links of runs whose process is gone (a test killed before its clean-up)."""
    tags = set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"{PREFIX}([0-9a-f]+)-", line)
        if m:
            tags.add(m.group(1))
    for m in re.finditer(rf"^\d+: {PREFIX}([0-9a-f]+)-", _ip("-o", "link", "show", check=False).stdout, re.M):
        tags.add(m.group(1))
    stale = [t for t in tags if not _alive(int(t, 16))]
    for t in stale:
        _delete(t)
    return stale


class Host:
    """One network namespace on the LAN: an address, processes, and kill -9 of all of them."""

    def __init__(self, lan: Lan, name: str, octet: int, index: int):
        self.lan, self.name = lan, name
        self.ns = f"{PREFIX}{lan.tag}-{name}"
        self.ip = str(lan.network.network_address + octet)
        self.outer = f"{PREFIX}{lan.tag}-v{index}"  # on the bridge, in the lan namespace
        inner = f"{PREFIX}{lan.tag}-w{index}"
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", self.ns)
        _ip("link", "set", self.outer, "netns", lan.ns)
        _ip("-n", lan.ns, "link", "set", self.outer, "master", "br0")
        _ip("-n", lan.ns, "link", "set", self.outer, "up")
        _ip("-n", self.ns, "link", "set", inner, "name", "eth0")
        _ip("-n", self.ns, "addr", "add", f"{self.ip}/{lan.network.prefixlen}", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        self.procs: list[subprocess.Popen] = []

    def argv(self, command: Sequence[str], mounts: Mapping[str | Path, str | Path] | None = None) -> list[str]:
        """``command`` run on this host: in its network namespace, in a private mount namespace of its own where
        each ``mounts`` source is bind-mounted at its target, with the host's name (``hostname``)."""
        script = [f"hostname {shlex.quote(self.name)}"]
        for src, dst in (mounts or {}).items():
            script.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}")
        script.append('exec "$@"')
        return [
            *("ip", "netns", "exec", self.ns),
            *("unshare", "--mount", "--uts", "--propagation", "private"),
            *("sh", "-c", " && ".join(script), self.name),
            *command,
        ]

    def popen(
        self,
        command: Sequence[str],
        *,
        mounts: Mapping[str | Path, str | Path] | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen:
        """Start ``command`` on this host (it becomes the process itself: ip, unshare and sh exec it)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            p = subprocess.Popen(
                self.argv(command, mounts),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.procs.append(p)
        return p

    def run(
        self,
        command: Sequence[str],
        *,
        mounts: Mapping[str | Path, str | Path] | None = None,
        timeout: float = 120,
        **kw,
    ) -> subprocess.CompletedProcess:
        """Run ``command`` on this host to its end (as :meth:`popen` starts it; ``kw`` as subprocess.run's)."""
        return subprocess.run(self.argv(command, mounts), timeout=timeout, **kw)

    def pids(self) -> list[int]:
        return namespace_pids(self.ns)

    def kill_all(self) -> int:
        """kill -9 every process of this host, as a power cut would; returns how many there were."""
        n = kill_namespace(self.ns)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return n


class Lan:
    """A switch: a bridge in a namespace of its own (``lan``), the hosts' veths on it, and one more veth to the root
    namespace, which is on the LAN as ``gateway`` (x.x.x.1).

    The bridge is not in the root namespace: there, the machine's own firewall (Docker's FORWARD policy DROP with
    br_netfilter, for one) would filter the frames between hosts; a namespace of its own has no rules. Traffic
    between the root namespace and a host ends at the root's own address (never forwarded there)."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or f"{os.getpid():x}"
        self.ns = f"{PREFIX}{self.tag}-lan"
        self.uplink = f"{PREFIX}{self.tag}-gw"  # the root namespace's leg, with the gateway address
        self.hosts: dict[str, Host] = {}
        self.network = SUBNETS[0]

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def up(self) -> Lan:
        sweep_stale()
        _delete(self.tag)  # a run of an earlier process with this pid
        used = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
        self.network = next(n for n in SUBNETS if f"{n.network_address}"[: -len(".0")] + "." not in used)
        _ip("netns", "add", self.ns)
        _ip("-n", self.ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.ns, "link", "set", "br0", "up")
        peer = f"{PREFIX}{self.tag}-gp"
        _ip("link", "add", self.uplink, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.ns)
        _ip("-n", self.ns, "link", "set", peer, "master", "br0")
        _ip("-n", self.ns, "link", "set", peer, "up")
        _ip("addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.uplink)
        _ip("link", "set", self.uplink, "up")
        return self

    def add_host(self, name: str, octet: int) -> Host:
        host = Host(self, name, octet, len(self.hosts))
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            kill_namespace(host.ns)
            for p in host.procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        _delete(self.tag)
