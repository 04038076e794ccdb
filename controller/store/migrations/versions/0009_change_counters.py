"""Change counters: heartbeats learn that pairs or tag requests changed without reading them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

One row per counter (`pairs`, `tag_requests`), created by the first change it
counts (an absent row reads as 0). Every store method that changes what a
heartbeat answer holds adds one to its counter in the same transaction; the
heartbeat's own write transaction reads the counters, and the configuration
server re-reads the pairs only when they moved (controller/assignments.py).

Self-contained like the others: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "change_counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_change_counters"),
    )


def downgrade() -> None:
    op.drop_table("change_counters")
