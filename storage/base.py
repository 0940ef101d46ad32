"""What every part of the Store shares: :class:`StoreBase` (the engine, the session factory and the spool), the
:func:`database_errors` decorator that translates SQLAlchemy's errors at the Store's boundary, and small helpers
(:func:`utcnow`, :func:`rowcount`).

The Store itself is composed of one class per concern built on :class:`StoreBase` (:mod:`storage.repository`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.engine import Result as QueryResult
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from storage.db import make_engine
from storage.errors import DatabaseError, StorageError
from storage.spool import Spool

UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}  # INSERT ... ON CONFLICT, per supported dialect

F = TypeVar("F", bound=Callable[..., Any])


def database_errors(method: F) -> F:
    """Translate SQLAlchemy's errors into :class:`DatabaseError` at the Store's boundary.

    The message keeps the driver's first line (e.g. "database is locked") and never SQLAlchemy's rendering,
    which would carry the statement's parameters."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            detail = (str(orig).strip().splitlines() or [""])[0] if orig is not None else ""
            raise DatabaseError(
                f"database failure in {method.__name__}: {type(orig or exc).__name__}"
                + (f": {detail}" if detail else "")
            ) from exc

    return wrapper  # type: ignore[return-value]


def rowcount(result: QueryResult[Any]) -> int:
    """Rows matched by an UPDATE/DELETE: ``Session.execute`` is typed as returning a plain ``Result``, but for
    DML statements it returns a ``CursorResult``, which carries ``rowcount``."""
    return cast(CursorResult[Any], result).rowcount


class _DatabaseClock:
    """How far this host's clock is from the database's. Every time the node keeps in the database (leases,
    heartbeats, study timers, retry times) is on the database's clock, so that hosts whose clocks disagree
    (by minutes, even) still agree on when a lease ran out. The offset is measured when a Store opens and again
    at every heartbeat (a clock stepped by NTP is followed within seconds); reading it costs nothing."""

    offset = timedelta(0)


def utcnow() -> datetime:
    """Now on the database's clock (naive UTC, as the columns hold it)."""
    return datetime.now(UTC).replace(tzinfo=None) + _DatabaseClock.offset


def to_local(db_time: datetime) -> datetime:
    """A database time as this host's clock reads it (aware UTC): for timers this process runs itself."""
    return (db_time - _DatabaseClock.offset).replace(tzinfo=UTC)


def measure_clock(engine: Engine) -> timedelta:
    """Set and return the database clock's offset from this host's. PostgreSQL is asked for its time (the
    middle of the round trip is taken as the moment it answered); SQLite is a file on this host: offset 0."""
    if engine.dialect.name != "postgresql":
        return _DatabaseClock.offset
    with engine.connect() as conn:
        before = time.time()
        db_now = conn.scalar(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'"))
        after = time.time()
    local = datetime.fromtimestamp((before + after) / 2, UTC).replace(tzinfo=None)
    _DatabaseClock.offset = cast(datetime, db_now) - local
    return _DatabaseClock.offset


class StoreBase:
    """The spool, the engine and the session factory of one Store."""

    @database_errors
    def __init__(self, database_url: str, root: Path, min_free_disk_mb: float = 0, owner: str = ""):
        self.spool = Spool(root, owner)
        self.engine = make_engine(database_url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if self.engine.dialect.name not in UPSERT:
            raise StorageError(
                f"storage.database_url: {self.engine.dialect.name} is not supported (use SQLite or PostgreSQL)"
            )
        self.min_free_disk_mb = min_free_disk_mb
        self.sync_clock()

    @database_errors
    def sync_clock(self) -> timedelta:
        """Measure this host's clock against the database's again (heartbeats call this)."""
        return measure_clock(self.engine)

    def close(self) -> None:
        self.engine.dispose()
