"""multi-host: spool paths relative to storage.root, serve instances and their leader, re-analysis fetches

Revision ID: 0007
Revises: 0006

Paths were stored absolute (the serving host's full path). A spool is laid out as ``spool/xx/<study>/<file>``
and ``results/xx/<study>/<file>``, so the last four parts of an absolute path are its path relative to the root,
whatever the root was: those are kept. A path of another shape is left as it is (still readable: an absolute
path resolves to itself).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

EPOCH = datetime(1970, 1, 1)


def _relative(path: str) -> str | None:
    parts = PurePosixPath(path).parts
    if path.startswith("/") and len(parts) >= 5 and parts[-4] in ("spool", "results"):
        return "/".join(parts[-4:])
    return None


def _relativise(table: str, key: str) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text(f"SELECT {key}, path FROM {table} WHERE path LIKE '/%'")).all()
    changes = [{"k": k, "p": rel} for k, p in rows if (rel := _relative(p)) is not None]
    for start in range(0, len(changes), 1000):
        conn.execute(sa.text(f"UPDATE {table} SET path = :p WHERE {key} = :k"), changes[start : start + 1000])


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("dicom_address", sa.String(length=128), nullable=False),
        sa.Column("web_address", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    leader = op.create_table(
        "leader",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(leader, [{"id": 1, "holder": "", "lease_until": EPOCH, "since": EPOCH}])  # nobody leads yet
    with op.batch_alter_table("backfill_studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deliver", sa.Boolean(), server_default=sa.false(), nullable=False))
    _relativise("instances", "sop_instance_uid")
    _relativise("results", "id")


def downgrade() -> None:
    with op.batch_alter_table("backfill_studies", schema=None) as batch_op:
        batch_op.drop_column("deliver")
    op.drop_table("leader")
    op.drop_table("nodes")
