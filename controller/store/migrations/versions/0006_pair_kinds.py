"""Pairs: how the first sync runs (full or delta) and where frames end (master target or Azure page blob).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

Self-contained like the others: every column is spelled out here. Existing
pairs keep what they were: a full sync to a master target.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.add_column(sa.Column("sync_kind", sa.String(16), nullable=False, server_default="full"))
        batch.add_column(sa.Column("target_kind", sa.String(32), nullable=False, server_default="master-target"))
        batch.add_column(sa.Column("target_options", Json, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("target_options")
        batch.drop_column("target_kind")
        batch.drop_column("sync_kind")
