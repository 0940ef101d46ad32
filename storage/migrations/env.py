"""Alembic environment for the node's database: run by :func:`storage.migrate.upgrade` with the node's own
connection (``config.attributes["connection"]``), never from a URL in a file."""

from __future__ import annotations

from alembic import context

from storage.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("target_metadata", Base.metadata),
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
