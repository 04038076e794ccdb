"""SQLAlchemy table definitions of the store, as of the newest migration.

The migrations in `migrations/versions` create these tables; the contract tests
compare a migrated database against this metadata, so the two cannot drift.
Never change a table here without adding a migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on PostgreSQL (indexable later), JSON text elsewhere.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as an aware UTC datetime.

    PostgreSQL stores `timestamptz`; SQLite stores naive UTC text in one fixed
    format (so comparisons in SQL order correctly).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


servers = sa.Table(
    "servers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("cert_serial", sa.String(128), nullable=False),
    sa.Column("cert_fingerprint", sa.String(128), nullable=False),
    sa.Column("enrolled_at", UtcDateTime(), nullable=False),
    sa.Column("registered_at", UtcDateTime(), nullable=True),
    sa.Column("last_heartbeat_at", UtcDateTime(), nullable=True),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    sa.Column("inventory", Json, nullable=False),
    sa.Column("problems", Json, nullable=False),
    sa.Index(None, "role", "hostname"),
)

machines = sa.Table(
    "machines",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("server_id", sa.String(64), sa.ForeignKey("servers.id"), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("os", sa.String(255), nullable=False),
    sa.Column("addresses", Json, nullable=False),
    sa.Column("disks", Json, nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=True),
    sa.Index(None, "server_id"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("params", Json, nullable=False),
    sa.Column("error_code", sa.String(64), nullable=False),
    sa.Column("error_message", sa.Text(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Index(None, "status", "created_at"),
    sa.Index(None, "created_at"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column(
        "job_id",
        sa.String(36),
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("idx", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("progress", sa.Float(), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("error_code", sa.String(64), nullable=False),
    sa.Column("lease_owner", sa.String(128), nullable=False),
    sa.Column("lease_expires_at", UtcDateTime(), nullable=True),
    sa.Column("output", Json, nullable=False),
)

pairs = sa.Table(
    "pairs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("machine_id", sa.String(64), sa.ForeignKey("machines.id"), nullable=False),
    sa.Column("source_server_id", sa.String(64), sa.ForeignKey("servers.id"), nullable=False),
    sa.Column("disk_name", sa.String(255), nullable=False),
    sa.Column("disk_identity", sa.String(1024), nullable=False),
    sa.Column("disk_size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("process_server_id", sa.String(64), sa.ForeignKey("servers.id"), nullable=False),
    sa.Column("master_target_id", sa.String(64), sa.ForeignKey("servers.id"), nullable=False),
    sa.Column("target_path", sa.String(4096), nullable=False),
    sa.Column("journal_dir", sa.String(4096), nullable=False),
    sa.Column("policy", Json, nullable=False),
    sa.Column("desired_state", sa.String(16), nullable=False),
    sa.Column("group_id", sa.String(255), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("sync_kind", sa.String(16), nullable=False, server_default="full"),
    sa.Column("target_kind", sa.String(32), nullable=False, server_default="master-target"),
    sa.Column("target_options", Json, nullable=False, server_default="{}"),
    sa.UniqueConstraint("machine_id", "disk_identity"),
    sa.Index(None, "source_server_id"),
    sa.Index(None, "process_server_id"),
    sa.Index(None, "master_target_id"),
)

pair_reports = sa.Table(
    "pair_reports",
    metadata,
    sa.Column("pair_id", sa.String(64), sa.ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("server_id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("status", Json, nullable=False),
    sa.Column("reported_at", UtcDateTime(), nullable=False),
)

operators = sa.Table(
    "operators",
    metadata,
    sa.Column("identity_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("cert_serial", sa.String(64), nullable=False),
    sa.Column("issued_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    sa.Index("ix_operators_name", "name"),
)

tag_requests = sa.Table(
    "tag_requests",
    metadata,
    sa.Column("pair_id", sa.String(64), sa.ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag_id", sa.String(255), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("group_id", sa.String(255), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    # Multi-VM barriers: when sources hold writes, when this pair's source did,
    # and what was decided ("" while open, "committed", "aborted").
    sa.Column("cut_at", UtcDateTime(), nullable=True),
    sa.Column("held_at", UtcDateTime(), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
)

# vCenter / ESXi endpoints (0003). `secret` is the password encrypted by the
# controller (controller/secrets.py); the store never sees it in clear.
vcenters = sa.Table(
    "vcenters",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer(), nullable=False),
    sa.Column("username", sa.String(255), nullable=False),
    sa.Column("secret", sa.Text(), nullable=False),
    sa.Column("trust", Json, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # When a discovery job was last asked for (compare-and-set: one replica wins).
    sa.Column("discovery_requested_at", UtcDateTime(), nullable=True),
    sa.Column("discovered_at", UtcDateTime(), nullable=True),
    sa.Column("discovery_status", sa.String(16), nullable=False),
    sa.Column("discovery_error", sa.Text(), nullable=False),
    sa.UniqueConstraint("host", "port"),
)

# The last successful discovery of each endpoint, as one JSON document
# (controller/providers/vsphere/model.py, Inventory.to_dict()).
vcenter_inventories = sa.Table(
    "vcenter_inventories",
    metadata,
    sa.Column("vcenter_id", sa.String(64), sa.ForeignKey("vcenters.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("discovered_at", UtcDateTime(), nullable=False),
    sa.Column("document", Json, nullable=False),
)

# Azure sites (0005). `settings` is common.azure.site.AzureSite.to_dict();
# `secret` is the service principal's secret encrypted by the controller
# (controller/secrets.py); the store never sees it in clear.
azure_sites = sa.Table(
    "azure_sites",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("settings", Json, nullable=False),
    sa.Column("secret", sa.Text(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

# Protection groups, recovery plans and protected machines (0007); see
# controller/protection/ for what they mean. A group's `failback_of` names the
# primary group of a `<name>_Failback` twin; the two are created and removed together.
protection_groups = sa.Table(
    "protection_groups",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("failback_of", sa.String(64), sa.ForeignKey("protection_groups.id", ondelete="CASCADE"), nullable=True),
    sa.Column("policy", Json, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)

recovery_plans = sa.Table(
    "recovery_plans",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("definition", Json, nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

protected_items = sa.Table(
    "protected_items",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("machine_id", sa.String(64), sa.ForeignKey("machines.id"), nullable=False, unique=True),
    sa.Column("group_id", sa.String(64), sa.ForeignKey("protection_groups.id"), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("details", Json, nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Index(None, "group_id"),
)

# An operator's answer to a job that waits for one (a plan's manual action).
job_signals = sa.Table(
    "job_signals",
    metadata,
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)

# Digests of the client nonces of accepted enrollments (a replayed request is refused,
# by every replica and after a restart); rows older than a day are dropped as new ones come.
enrollment_nonces = sa.Table(
    "enrollment_nonces",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("seen_at", UtcDateTime(), nullable=False),
    sa.Index(None, "seen_at"),
)

# How often what a heartbeat answer holds has changed: one row per counter ("pairs",
# "tag_requests"), bumped in the transaction of every such change (sql.py `_bump`).
# Derived state, so not part of a backup (sql.py `DERIVED_TABLES`).
change_counters = sa.Table(
    "change_counters",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger(), nullable=False),
)
