"""Schema migrations: a database made by release 0.1 (kept in tests/data, written by that release's own code)
opens and is upgraded at start with its rows intact; a new database, SQLite or PostgreSQL, ends at the same head
with exactly the schema of the models."""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from storage import Store
from storage.db import Base
from storage.migrate import current, head

RELEASE_0_1 = Path(__file__).parent / "data" / "release-0.1.sqlite3"


def schema_differences(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_a_release_0_1_database_is_upgraded_at_start_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.sqlite3"
    shutil.copy(RELEASE_0_1, db)
    url = f"sqlite:///{db}"
    engine = create_engine(url)
    assert "purges" not in inspect(engine).get_table_names() and current(engine) is None
    engine.dispose()

    store = Store(url, tmp_path / "var", 0)  # what `serve`, `status` and the workers do first
    try:
        assert current(store.engine) == head()
        status = store.status()
        assert status["instances"]["total"] == 1 and status["deliveries"]["delivered"] == 1
        assert status["jobs"]["done"] == 1 and status["purged"]["studies"] == 0
        assert store.purgeable_studies() == ["1.2.3.4"]  # the new code works on the old rows
    finally:
        store.close()
    assert schema_differences(url) == []
    Store(url, tmp_path / "var", 0).close()  # at the head already: opens as it is


def test_a_new_database_gets_the_models_schema_on_sqlite_and_postgresql(tmp_path, postgres_url):
    for url in (f"sqlite:///{tmp_path / 'new.sqlite3'}", postgres_url):
        Store(url, tmp_path / "var", 0).close()
        engine = create_engine(url)
        try:
            assert current(engine) == head()
        finally:
            engine.dispose()
        assert schema_differences(url) == [], url
