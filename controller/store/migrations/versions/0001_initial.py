"""Initial schema: servers, machines, jobs, steps.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Self-contained on purpose: it spells out every column instead of importing
`schema.py`, so later changes to the tables cannot rewrite history.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "servers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("cert_serial", sa.String(128), nullable=False),
        sa.Column("cert_fingerprint", sa.String(128), nullable=False),
        _ts("enrolled_at", False),
        _ts("registered_at", True),
        _ts("last_heartbeat_at", True),
        _ts("revoked_at", True),
        sa.Column("inventory", Json, nullable=False),
        sa.Column("problems", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_servers"),
    )
    op.create_index("ix_servers_role_hostname", "servers", ["role", "hostname"])

    op.create_table(
        "machines",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("server_id", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("os", sa.String(255), nullable=False),
        sa.Column("addresses", Json, nullable=False),
        sa.Column("disks", Json, nullable=False),
        _ts("updated_at", True),
        sa.PrimaryKeyConstraint("id", name="pk_machines"),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name="fk_machines_server_id_servers"),
    )
    op.create_index("ix_machines_server_id", "machines", ["server_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _ts("created_at", False),
        _ts("updated_at", False),
        sa.Column("params", Json, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])

    op.create_table(
        "steps",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=False),
        _ts("lease_expires_at", True),
        sa.Column("output", Json, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "idx", name="pk_steps"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_steps_job_id_jobs", ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("steps")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_machines_server_id", table_name="machines")
    op.drop_table("machines")
    op.drop_index("ix_servers_role_hostname", table_name="servers")
    op.drop_table("servers")
