"""Operators: the people and scripts holding admin or reader client certificates.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

Self-contained like the others: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("identity_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        _ts("issued_at"),
        _ts("expires_at"),
        _ts("revoked_at", nullable=True),
    )
    op.create_index("ix_operators_name", "operators", ["name"])


def downgrade() -> None:
    op.drop_index("ix_operators_name", table_name="operators")
    op.drop_table("operators")
