"""Schema migrations (Alembic, ``storage/migrations``): every engine the node opens is brought to the current
schema first.

- A new database gets every migration from the first.
- A database made by release 0.1 (``create_all``, before migrations existed: it has the tables but no
  ``alembic_version``) is stamped as revision 0001, the 0.1 schema, and upgraded from there.
- A database already at the head is left alone.

A new schema change is a new file in ``storage/migrations/versions`` (``alembic revision --autogenerate`` with
the connection set as :func:`upgrade` sets it), never an edit of ``storage.db`` alone; ``tests/test_migrations.py``
checks that the migrations and the models agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST = "0001"  # the schema of release 0.1


def alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # serve and workers starting together: one migrates, the rest wait
            conn.execute(text("SELECT pg_advisory_xact_lock(72430017)"))
        cfg = alembic_config(conn)
        tables = set(inspect(conn).get_table_names())
        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and "studies" in tables:
            command.stamp(cfg, FIRST)  # made by release 0.1 with create_all
            before = FIRST
        if before != head():
            command.upgrade(cfg, "head")
            if before is not None:
                log.info("database schema upgraded from revision %s to %s", before, head())
