"""What every part of the Store shares: :class:`StoreBase` (the engine, the session factory and the spool), the
:func:`database_errors` decorator that translates SQLAlchemy's errors at the Store's boundary, and small helpers
(:func:`utcnow`, :func:`rowcount`).

The Store itself is composed of one class per concern built on :class:`StoreBase` (:mod:`storage.repository`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult
from sqlalchemy.dialects import postgresql, sqlite
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


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class StoreBase:
    """The spool, the engine and the session factory of one Store."""

    @database_errors
    def __init__(self, database_url: str, root: Path, min_free_disk_mb: float = 0):
        self.spool = Spool(root)
        self.engine = make_engine(database_url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if self.engine.dialect.name not in UPSERT:
            raise StorageError(
                f"storage.database_url: {self.engine.dialect.name} is not supported (use SQLite or PostgreSQL)"
            )
        self.min_free_disk_mb = min_free_disk_mb

    def close(self) -> None:
        self.engine.dispose()
