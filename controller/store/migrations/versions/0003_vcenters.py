"""vCenter / ESXi endpoints and their discovered inventories.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Self-contained like 0001 and 0002: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "vcenters",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("trust", Json, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("discovery_requested_at", nullable=True),
        _ts("discovered_at", nullable=True),
        sa.Column("discovery_status", sa.String(16), nullable=False),
        sa.Column("discovery_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_vcenters"),
        sa.UniqueConstraint("name", name="uq_vcenters_name"),
        sa.UniqueConstraint("host", "port", name="uq_vcenters_host_port"),
    )
    op.create_table(
        "vcenter_inventories",
        sa.Column("vcenter_id", sa.String(64), nullable=False),
        _ts("discovered_at"),
        sa.Column("document", Json, nullable=False),
        sa.PrimaryKeyConstraint("vcenter_id", name="pk_vcenter_inventories"),
        sa.ForeignKeyConstraint(
            ["vcenter_id"],
            ["vcenters.id"],
            name="fk_vcenter_inventories_vcenter_id_vcenters",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("vcenter_inventories")
    op.drop_table("vcenters")
