"""Enrollment nonces: a replayed enrollment request is refused by every replica, also after a restart.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

Self-contained like the others: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "enrollment_nonces",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_enrollment_nonces"),
    )
    op.create_index("ix_enrollment_nonces_seen_at", "enrollment_nonces", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_enrollment_nonces_seen_at", table_name="enrollment_nonces")
    op.drop_table("enrollment_nonces")
