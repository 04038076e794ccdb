"""Replication: pairs, the agents' reports about them, and tag requests.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Self-contained like 0001: every column is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "pairs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("source_server_id", sa.String(64), nullable=False),
        sa.Column("disk_name", sa.String(255), nullable=False),
        sa.Column("disk_identity", sa.String(1024), nullable=False),
        sa.Column("disk_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("process_server_id", sa.String(64), nullable=False),
        sa.Column("master_target_id", sa.String(64), nullable=False),
        sa.Column("target_path", sa.String(4096), nullable=False),
        sa.Column("journal_dir", sa.String(4096), nullable=False),
        sa.Column("policy", Json, nullable=False),
        sa.Column("desired_state", sa.String(16), nullable=False),
        sa.Column("group_id", sa.String(255), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_pairs"),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], name="fk_pairs_machine_id_machines"),
        sa.ForeignKeyConstraint(["source_server_id"], ["servers.id"], name="fk_pairs_source_server_id_servers"),
        sa.ForeignKeyConstraint(["process_server_id"], ["servers.id"], name="fk_pairs_process_server_id_servers"),
        sa.ForeignKeyConstraint(["master_target_id"], ["servers.id"], name="fk_pairs_master_target_id_servers"),
        sa.UniqueConstraint("machine_id", "disk_identity", name="uq_pairs_machine_id_disk_identity"),
    )
    op.create_index("ix_pairs_source_server_id", "pairs", ["source_server_id"])
    op.create_index("ix_pairs_process_server_id", "pairs", ["process_server_id"])
    op.create_index("ix_pairs_master_target_id", "pairs", ["master_target_id"])

    op.create_table(
        "pair_reports",
        sa.Column("pair_id", sa.String(64), nullable=False),
        sa.Column("server_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("status", Json, nullable=False),
        _ts("reported_at"),
        sa.PrimaryKeyConstraint("pair_id", "server_id", name="pk_pair_reports"),
        sa.ForeignKeyConstraint(
            ["pair_id"], ["pairs.id"], name="fk_pair_reports_pair_id_pairs", ondelete="CASCADE"
        ),
    )

    op.create_table(
        "tag_requests",
        sa.Column("pair_id", sa.String(64), nullable=False),
        sa.Column("tag_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("group_id", sa.String(255), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("cut_at", True),
        _ts("held_at", True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("pair_id", "tag_id", name="pk_tag_requests"),
        sa.ForeignKeyConstraint(
            ["pair_id"], ["pairs.id"], name="fk_tag_requests_pair_id_pairs", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("tag_requests")
    op.drop_table("pair_reports")
    op.drop_index("ix_pairs_master_target_id", table_name="pairs")
    op.drop_index("ix_pairs_process_server_id", table_name="pairs")
    op.drop_index("ix_pairs_source_server_id", table_name="pairs")
    op.drop_table("pairs")
