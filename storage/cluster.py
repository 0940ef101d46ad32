"""Several ``serve`` instances on one database: :class:`ClusterStore` registers each instance, records its
heartbeats, and elects the leader.

Every instance receives (DICOM, STOW-RS) and may run workers. The work that must not run twice - the sweep of
study timers whose listener is gone, retention, the sender and backfills - runs on the leader only. The leader
holds a lease in the one row of ``leader``, on the database's clock, and renews it with each heartbeat; when its
heartbeats stop, the lease runs out and the next instance to beat takes over. A clean stop hands the lease back
at once.

Why a leader rather than making each of those jobs safe to run concurrently: the sender would need a claim per
delivery (a "sending" state with its own lease and recovery), retention would race itself over the same files,
and a backfill's C-MOVEs would be sent twice; one leader keeps each of them the single-process code it is, at
the cost of a takeover delay (at most the lease, 10 s by default) after the leader dies. Jobs are different:
workers already claim them safely under a lease, on any host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, or_, select, update

from storage.base import StoreBase, database_errors, rowcount, utcnow
from storage.db import Leader, NodeRow, WorkerRow
from storage.errors import StorageError


def _running(pid: int) -> bool:
    """Whether a process of this host has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


NODE_STALE_S = 15.0  # an instance or worker silent this long is gone (its partial files may be removed)


class DuplicateInstanceError(StorageError):
    """Another running instance has this name (``node.instance_name``)."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    host: str
    pid: int
    state: str  # running, stale (no heartbeat lately), stopped, gone
    role: str  # leader or follower
    dicom_address: str
    web_address: str
    version: str
    started_at: datetime
    heartbeat_at: datetime


class ClusterStore(StoreBase):
    """The serve instances sharing this database, and which one leads."""

    @database_errors
    def register_node(
        self, name: str, host: str, pid: int, dicom_address: str, web_address: str, version: str, stale_s: float
    ) -> None:
        """Record this instance as running. Raises DuplicateInstanceError when another process with this name has
        beaten within ``stale_s`` and still runs (two instances with one name would clean each other's partial
        files). A process of this host that is gone (killed, then restarted) is not another instance."""
        now = utcnow()
        with self._session.begin() as s:
            row = s.get(NodeRow, name, with_for_update=True)
            if row is not None and row.state == "running" and now - row.heartbeat_at < timedelta(seconds=stale_s):
                if (row.host, row.pid) != (host, pid) and (row.host != host or _running(row.pid)):
                    raise DuplicateInstanceError(
                        f"another serve instance named {name!r} is running (pid {row.pid} on {row.host}): give each "
                        "instance its own node.instance_name"
                    )
            if row is None:
                row = NodeRow(name=name)
                s.add(row)
            row.host, row.pid, row.state, row.role = host, pid, "running", "follower"
            row.dicom_address, row.web_address, row.version = dicom_address, web_address, version
            row.started_at = row.heartbeat_at = now

    @database_errors
    def node_addresses(self, name: str, dicom_address: str, web_address: str) -> None:
        with self._session.begin() as s:
            s.execute(
                update(NodeRow).where(NodeRow.name == name).values(dicom_address=dicom_address, web_address=web_address)
            )

    @database_errors
    def node_heartbeat(self, name: str, lease_s: float) -> str:
        """This instance is alive: record it, take or keep the leader's lease, and return the role it now holds
        (``leader`` or ``follower``)."""
        now = utcnow()
        with self._session.begin() as s:
            led = rowcount(
                s.execute(
                    update(Leader)
                    .where(Leader.id == 1, or_(Leader.holder == name, Leader.lease_until < now))
                    .values(
                        since=case((Leader.holder == name, Leader.since), else_=now),
                        holder=name,
                        lease_until=now + timedelta(seconds=lease_s),
                    )
                )
            )
            role = "leader" if led else "follower"
            s.execute(update(NodeRow).where(NodeRow.name == name).values(heartbeat_at=now, role=role, state="running"))
            return role

    @database_errors
    def node_stopped(self, name: str) -> None:
        """A clean stop: the instance is marked stopped and, if it led, the lease is handed back at once."""
        with self._session.begin() as s:
            s.execute(update(NodeRow).where(NodeRow.name == name).values(state="stopped", role="follower"))
            s.execute(
                update(Leader)
                .where(Leader.id == 1, Leader.holder == name)
                .values(lease_until=utcnow() - timedelta(seconds=1))
            )

    @database_errors
    def leader(self) -> tuple[str, datetime] | None:
        """The current leader and since when, or None when no lease is held."""
        now = utcnow()
        with self._session() as s:
            row = s.get(Leader, 1)
            if row is None or not row.holder or row.lease_until < now:
                return None
            return row.holder, row.since

    @database_errors
    def nodes(self, stale_s: float) -> list[NodeInfo]:
        """Every instance that has run on this database, running ones first; ``stale``: registered running but
        no heartbeat for ``stale_s`` (killed, or its host lost)."""
        now = utcnow()
        current = self.leader()
        with self._session() as s:
            rows = list(s.scalars(select(NodeRow).order_by(NodeRow.name)))
        out = []
        for r in rows:
            state = r.state
            if state == "running" and now - r.heartbeat_at > timedelta(seconds=stale_s):
                state = "stale"
            role = "leader" if current is not None and current[0] == r.name and state == "running" else "follower"
            out.append(
                NodeInfo(
                    r.name,
                    r.host,
                    r.pid,
                    state,
                    role,
                    r.dicom_address,
                    r.web_address,
                    r.version,
                    r.started_at,
                    r.heartbeat_at,
                )
            )
        return sorted(out, key=lambda n: (n.state != "running", n.role != "leader", n.name))

    @database_errors
    def live_owners(self, stale_s: float) -> set[str]:
        """Names of the instances and workers that have beaten within ``stale_s``: the owners of partial files in
        the spool's ``tmp/`` that may still be written."""
        since = utcnow() - timedelta(seconds=stale_s)
        with self._session() as s:
            nodes = s.scalars(
                select(NodeRow.name).where(and_(NodeRow.state == "running", NodeRow.heartbeat_at >= since))
            )
            workers = s.scalars(select(WorkerRow.name).where(WorkerRow.heartbeat_at >= since))
            return {*nodes, *workers}
