"""This ``serve`` instance among others on one database (storage.cluster): its name, its heartbeat, and whether it
is the leader.

Each instance beats every ``HEARTBEAT_S``; a beat records it, re-measures the host's clock against the
database's, and takes or renews the leader's lease (``LEASE_S``). The leader runs what must not run twice: the
sender, retention, backfills, the sweep of study timers whose listener is gone, and the clean-up of partial
files a lost host left in ``tmp/``. A follower receives and (with ``workers.count`` > 0) analyses, like the
leader. When the leader dies, another instance takes over within ``LEASE_S`` + ``HEARTBEAT_S``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from dicom_node import audit
from storage import Store
from storage.cluster import NODE_STALE_S

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # how often each instance beats (and the leader renews its lease)
LEASE_S = 10.0  # how long a leader's lease lasts without a beat: the longest takeover after the leader dies
STALE_S = NODE_STALE_S  # an instance or worker silent this long is gone (its partial files may be removed)


def default_instance_name() -> str:
    """The host's name: one instance per host needs no configuration (``node.instance_name`` otherwise)."""
    return socket.gethostname()[:64] or "dicom-node"


class Membership:
    """Registration, heartbeats and the role of this instance; ``on_leader`` runs each time it becomes leader."""

    def __init__(self, store: Store, name: str, on_leader: Callable[[], None]):
        self.store = store
        self.name = name
        self.on_leader = on_leader
        self.role = "follower"
        self._lock = threading.Lock()

    @property
    def leads(self) -> bool:
        return self.role == "leader"

    def register(self, version: str, dicom_address: str = "", web_address: str = "") -> None:
        """Raises DuplicateInstanceError when a running instance has this name."""
        self.store.register_node(
            self.name, socket.gethostname(), os.getpid(), dicom_address, web_address, version, STALE_S
        )

    def addresses(self, dicom_address: str, web_address: str) -> None:
        """Where this instance listens, once it does (shown by ``status`` and the console)."""
        try:
            self.store.node_addresses(self.name, dicom_address, web_address)
        except Exception as exc:  # noqa: BLE001 - only what is shown; the next start records it
            log.warning("instance %s: addresses not recorded: %s", self.name, exc)

    def beat(self) -> str:
        """One heartbeat (scheduled every HEARTBEAT_S; also once at start). A beat that cannot reach the database
        leaves the role as it was: a leader whose lease runs out meanwhile finds out at its next beat."""
        self.store.spool.keep_tmp()  # with or without the database: a leader never removes a running one's tmp/
        with self._lock:
            try:
                self.store.sync_clock()
                role = self.store.node_heartbeat(self.name, LEASE_S)
            except Exception as exc:  # noqa: BLE001 - the database is away: say so, keep beating
                log.warning("instance %s: heartbeat not recorded: %s", self.name, exc)
                return self.role
            before, self.role = self.role, role
        if role != before:
            log.info("instance %s is now the %s", self.name, role)
            audit.event("role", instance=self.name, role=role)
            if role == "leader":
                self.on_leader()
        return role

    def leader_only(self, job: Callable[[], object]) -> Callable[[], None]:
        """``job`` wrapped to run only while this instance leads (for the scheduler)."""

        def run() -> None:
            if self.leads:
                job()

        run.__name__ = getattr(job, "__name__", "leader_job")
        return run

    def stop(self) -> None:
        try:
            self.store.node_stopped(self.name)
        except Exception as exc:  # noqa: BLE001 - stopping anyway; the lease runs out by itself
            log.warning("instance %s: stop not recorded: %s", self.name, exc)
        self.role = "follower"

    def snapshot(self) -> dict[str, str]:
        return {"instance": self.name, "role": self.role}
