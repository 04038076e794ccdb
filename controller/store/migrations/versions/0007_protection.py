"""Protection groups (with their _Failback twins), recovery plans, protected machines, job signals.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

Self-contained like the others: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "protection_groups",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("failback_of", sa.String(64), nullable=True),
        sa.Column("policy", Json, nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_protection_groups"),
        sa.UniqueConstraint("name", name="uq_protection_groups_name"),
        sa.ForeignKeyConstraint(
            ["failback_of"], ["protection_groups.id"], name="fk_protection_groups_failback_of", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "recovery_plans",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("definition", Json, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_recovery_plans"),
        sa.UniqueConstraint("name", name="uq_recovery_plans_name"),
    )
    op.create_table(
        "protected_items",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("details", Json, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_protected_items"),
        sa.UniqueConstraint("machine_id", name="uq_protected_items_machine_id"),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], name="fk_protected_items_machine_id"),
        sa.ForeignKeyConstraint(["group_id"], ["protection_groups.id"], name="fk_protected_items_group_id"),
    )
    op.create_index("ix_protected_items_group_id", "protected_items", ["group_id"])
    op.create_table(
        "job_signals",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("job_id", "name", name="pk_job_signals"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_signals_job_id", ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("job_signals")
    op.drop_index("ix_protected_items_group_id", table_name="protected_items")
    op.drop_table("protected_items")
    op.drop_table("recovery_plans")
    op.drop_table("protection_groups")
