"""The SQL implementation of `Store`, on SQLite (default) or PostgreSQL.

`open_store(url)` migrates the database to the newest schema and returns a
`SqlStore`. URLs: `sqlite:///ABSOLUTE/PATH/store.db` (the configuration server
keeps `<state_dir>/store.db`) or `postgresql+psycopg://user@host/db` (several
controller replicas may share one PostgreSQL database).

Schema (tables in `schema.py`, created by `migrations/versions/0001_initial.py`):

    servers  (id PK, role, hostname, cert_serial, cert_fingerprint, enrolled_at,
              registered_at, last_heartbeat_at, revoked_at, inventory JSON,
              problems JSON)                          index (role, hostname)
    machines (id PK, server_id FK servers.id, hostname, os, addresses JSON,
              disks JSON, updated_at)                 index (server_id)
    jobs     (id PK uuid4, kind, target, status, created_at, updated_at,
              params JSON, error_code, error_message, version)
                                                      index (status, created_at), (created_at)
    steps    (job_id FK jobs.id ON DELETE CASCADE, idx, PK (job_id, idx), name,
              status, attempt, progress, message, error_code, lease_owner,
              lease_expires_at, output JSON)
    pairs    (id PK, machine_id FK machines.id, source_server_id / process_server_id /
              master_target_id FK servers.id, disk_name, disk_identity,
              disk_size_bytes, mode, target_path, journal_dir, policy JSON,
              desired_state, group_id, created_at, updated_at, sync_kind,
              target_kind, target_options JSON)       unique (machine_id, disk_identity)
    pair_reports (pair_id FK pairs.id ON DELETE CASCADE, server_id, PK (pair_id,
              server_id), role, status JSON, reported_at)
    tag_requests (pair_id FK pairs.id ON DELETE CASCADE, tag_id, PK (pair_id,
              tag_id), kind, group_id, created_at, expires_at)
    change_counters (name PK, value)                  - "pairs", "tag_requests"
    alembic_version (version_num)                     - the schema revision

(0002_replication.py adds pairs, pair_reports and tag_requests; 0003_vcenters.py
adds vcenters and vcenter_inventories, whose methods live in vcenters_sql.py;
0005_azure_sites.py adds azure_sites (id PK, name unique, settings JSON, secret,
created_at, updated_at), whose methods live in azure_sites_sql.py; 0006_pair_kinds.py
adds the pairs' sync_kind, target_kind and target_options; 0007_protection.py adds
protection_groups, recovery_plans, protected_items and job_signals, whose methods
live in protection_sql.py; 0009_change_counters.py adds change_counters.)

Change counters: every method that changes what a heartbeat answer holds (a
pair created, changed or deleted; the data endpoint of a server a pair names;
a tag request added, removed or decided) adds one to its counter as the last
statement of its transaction, and only when it changed something;
`record_heartbeat_group` reads them in its own transaction after its writes,
so the configuration server re-reads pairs only when they moved
(controller/assignments.py). A counter's row stays locked on PostgreSQL until
its transaction commits, which is why it is bumped last and "pairs" before
"tag_requests" (no lock is waited for while holding a later one). They are
derived state: backups leave them out, and a restore counts its own rows.

Times are stored in UTC (`timestamptz` on PostgreSQL, fixed-format text on
SQLite); JSON is JSONB on PostgreSQL and text on SQLite.

Transaction boundaries: each public method is exactly one database transaction
(`_write` or `_read` below). On SQLite every write transaction starts with
`BEGIN IMMEDIATE`, so writers queue on the database lock (busy timeout 30 s)
instead of failing half-way through a read-then-write; WAL lets readers go on
meanwhile. Threads of one process first take turns on an in-process lock, so
they queue there (woken at once) rather than in SQLite's sleeping busy handler;
other processes still meet the busy timeout. `record_heartbeat_group` writes many
agents' heartbeats in one transaction (controller/heartbeats.py groups them),
so 2,000 agents cost a few commits a second, not 200. On PostgreSQL writes run at READ COMMITTED and every change to a
job or its steps first locks the job row (`SELECT ... FOR UPDATE`), so all
writes to one job are serialised in one order (job row, then step rows) and
cannot deadlock; reads run at REPEATABLE READ so a job and its steps come
from one snapshot. Compare-and-set writes are guarded UPDATEs whose rowcount
decides (`WHERE status = ... AND attempt = ...`), so they are correct even
without the lock.

A crash mid-write: SQLite (WAL, synchronous=FULL) and PostgreSQL both roll back
a transaction that did not commit, so the database holds either all of a
method's changes or none. A committed change survives the crash. Migrations run
in one transaction too (DDL is transactional on both), so a crash during an
upgrade leaves the previous schema and revision, and the next start retries.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from siterecovery.common.errors import Conflict, InvalidInput, NotFound, Unavailable
from siterecovery.controller.jobs import states
from siterecovery.controller.store import migrations
from siterecovery.controller.store.azure_sites_sql import AzureSiteSqlMixin
from siterecovery.controller.store.base import (
    BARRIER_ABORTED,
    BARRIER_COMMITTED,
    BARRIER_WAIT,
    OPERATOR_ROLES,
    PAIR_DESIRED_STATES,
    PAIR_MODES,
    PAIR_SYNC_KINDS,
    PAIR_TARGET_KINDS,
    ROLES,
    ChangeCounters,
    Heartbeat,
    JobRecord,
    MachineRecord,
    OperatorRecord,
    PairRecord,
    PairReport,
    PairsSnapshot,
    RecordedHeartbeats,
    ServerRecord,
    StepRecord,
    Store,
    TagRequestRecord,
    TagRequestsSnapshot,
    json_check,
    json_copy,
    utc,
    utc_or_none,
)
from siterecovery.controller.store.heartbeat_sql import HeartbeatSql
from siterecovery.controller.store.protection_sql import ProtectionSqlMixin
from siterecovery.controller.store.schema import (
    change_counters,
    jobs,
    machines,
    metadata,
    operators,
    pair_reports,
    pairs,
    servers,
    steps,
    tag_requests,
)
from siterecovery.controller.store.vcenters_sql import VcenterSqlMixin

SQLITE_BUSY_TIMEOUT_S = 30.0
# Enough pooled connections for the RPC threads (common/grpcserver.py: 32) to keep
# theirs: with SQLAlchemy's default of 5, the rest were opened and closed for every
# transaction under load (a new PostgreSQL backend, or SQLite's PRAGMAs, each time).
POOL = {"pool_size": 24, "max_overflow": 24}
# Any constant: replicas starting together take turns migrating PostgreSQL.
_MIGRATION_LOCK_KEY = 0x5352_0001
# Kept up by the store itself, not data: left out of backups (a restore counts its own changes).
DERIVED_TABLES = frozenset({change_counters.name})
PAIRS_COUNTER, TAG_REQUESTS_COUNTER = "pairs", "tag_requests"


def open_store(url: str) -> Store:
    """Open the store at `url`, migrating its schema to the newest revision."""
    store = SqlStore(url)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


def _parents_first(table: sa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a table that refers to itself (a group's failback twin names its primary) with every
    referred row before the rows referring to it: the foreign key is checked at each insert."""
    own = [fk.parent.name for fk in table.foreign_keys if fk.column.table is table]
    if not own:
        return rows
    return sorted(rows, key=lambda row: any(row.get(column) is not None for column in own))


class SqlStore(VcenterSqlMixin, AzureSiteSqlMixin, ProtectionSqlMixin, Store):
    """`Store` on SQLAlchemy Core. Call `migrate()` (or use `open_store`) first."""

    def __init__(self, url: str) -> None:
        self._engine = _make_engine(url)
        self._pg = self._engine.dialect.name == "postgresql"
        self._insert = pg_insert if self._pg else sqlite_insert
        # SQLite has one writer at a time. Threads of this process queue for it here, woken
        # as soon as it is free, instead of in SQLite's busy handler, which sleeps and polls
        # (up to 100 ms a turn) while holding a pooled connection: under load that starved
        # writers for seconds (bench/control_plane.py). Only a queue, not a guarantee: other
        # processes still meet BEGIN IMMEDIATE and the busy timeout, as before.
        self._write_turn = nullcontext() if self._pg else threading.RLock()

    @property
    def engine(self) -> Engine:
        return self._engine

    # --- schema ------------------------------------------------------------------

    def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema to `revision` in one transaction; a no-op when there."""
        with self._write() as conn:
            if self._pg:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            command.upgrade(alembic_config(conn), revision)

    def schema_revision(self) -> str | None:
        with self._read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # --- backup --------------------------------------------------------------------

    def export_tables(self) -> tuple[str | None, dict[str, list[dict[str, Any]]]]:
        """(schema revision, every row of every table), read in one snapshot.

        One read transaction (REPEATABLE READ on PostgreSQL, a WAL read snapshot
        on SQLite), so the copy is consistent while the server keeps working.
        Values are as SQLAlchemy returns them (datetimes, dicts, ...).
        """
        with self._read() as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
            tables = {}
            for table in metadata.sorted_tables:
                if table.name in DERIVED_TABLES:
                    continue
                rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings()
                tables[table.name] = [dict(row) for row in rows]
            return revision, tables

    def import_tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Insert exported rows into this store, which must be empty (Conflict otherwise).

        One write transaction, parents before children; the schema must be at the
        revision the rows were exported at (the caller migrates around this).
        """
        unknown = set(tables) - {t.name for t in metadata.sorted_tables if t.name not in DERIVED_TABLES}
        if unknown:
            raise InvalidInput(f"the backup holds unknown tables: {', '.join(sorted(unknown))}", code="backup-tables")
        with self._write() as conn:
            present = set(sa.inspect(conn).get_table_names())
            missing = {name for name, rows in tables.items() if rows and name not in present}
            if missing:
                raise InvalidInput(
                    f"the store has no table {', '.join(sorted(missing))} at this schema revision",
                    code="backup-tables",
                )
            ordered = [t for t in metadata.sorted_tables if t.name in present and t.name not in DERIVED_TABLES]
            for table in ordered:
                if conn.execute(sa.select(sa.func.count()).select_from(table)).scalar():
                    raise Conflict(
                        f"the store already holds {table.name}; restore needs an empty store",
                        hint="restore into a new database (or an empty state directory)",
                        code="store-not-empty",
                    )
            for table in ordered:
                rows = _parents_first(table, tables.get(table.name, []))
                if rows:
                    conn.execute(sa.insert(table), rows)
            if change_counters.name in present:  # a server already on this store reads the pairs again
                self._bump(conn, PAIRS_COUNTER)
                self._bump(conn, TAG_REQUESTS_COUNTER)

    # --- transactions ------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_turn, _translate_db_errors(), self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _translate_db_errors(), self._engine.connect() as conn:
            if self._pg:
                conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            else:
                conn.execution_options(sr_read_only=True)
            with conn.begin():
                yield conn

    # --- servers -----------------------------------------------------------------

    def add_server(self, server: ServerRecord) -> None:
        _check_role(server.role)
        _check_id(server.id, "server id")
        values = {
            "id": server.id,
            "role": server.role,
            "hostname": server.hostname,
            "cert_serial": server.cert_serial,
            "cert_fingerprint": server.cert_fingerprint,
            "enrolled_at": utc(server.enrolled_at, "enrolled_at"),
            "registered_at": utc_or_none(server.registered_at, "registered_at"),
            "last_heartbeat_at": utc_or_none(server.last_heartbeat_at, "last_heartbeat_at"),
            "revoked_at": utc_or_none(server.revoked_at, "revoked_at"),
            "inventory": json_copy(server.inventory, "inventory"),
            "problems": json_copy(server.problems, "problems", list),
        }
        conflict = Conflict(
            f"a server with id {server.id!r} already exists",
            hint="enrol it under a new id, or look at the existing one with list_servers",
            code="server-exists",
        )
        try:
            with self._write() as conn:
                if conn.execute(sa.select(servers.c.id).where(servers.c.id == server.id)).first():
                    raise conflict
                conn.execute(sa.insert(servers).values(values))
        except sa.exc.IntegrityError as exc:  # lost a race with another insert
            raise conflict from exc

    def get_server(self, server_id: str) -> ServerRecord:
        with self._read() as conn:
            return self._server(conn, server_id)

    def list_servers(self, role: str | None = None) -> list[ServerRecord]:
        query = sa.select(servers).order_by(servers.c.role, servers.c.hostname, servers.c.id)
        if role is not None:
            _check_role(role)
            query = query.where(servers.c.role == role)
        with self._read() as conn:
            return [_server_record(row) for row in conn.execute(query).mappings()]

    def register_server(
        self, server_id: str, *, hostname: str, inventory: dict, now: datetime
    ) -> ServerRecord:
        now = utc(now, "now")
        values = {
            "hostname": hostname,
            "inventory": json_copy(inventory, "inventory"),
            "registered_at": now,
            "last_heartbeat_at": now,
        }
        with self._write() as conn:
            before = self._server(conn, server_id, lock=True)  # NotFound
            conn.execute(sa.update(servers).where(servers.c.id == server_id).values(values))
            if before.inventory.get("data_endpoint") != values["inventory"].get("data_endpoint") and conn.execute(
                sa.select(pairs.c.id)
                .where(sa.or_(pairs.c.process_server_id == server_id, pairs.c.master_target_id == server_id))
                .limit(1)
            ).first():
                self._bump(conn, PAIRS_COUNTER)  # the pairs' assignments name this endpoint
            return self._server(conn, server_id)

    def record_heartbeat(
        self, server_id: str, *, problems: list, directories: list | None, now: datetime
    ) -> ServerRecord:
        values: dict[str, Any] = {
            "last_heartbeat_at": utc(now, "now"),
            "problems": json_copy(problems, "problems", list),
        }
        if directories is not None:
            directories = json_copy(directories, "directories", list)
        with self._write() as conn:
            current = self._server(conn, server_id, lock=True)
            if directories is not None:
                values["inventory"] = {**current.inventory, "directories": directories}
            conn.execute(sa.update(servers).where(servers.c.id == server_id).values(values))
            return self._server(conn, server_id)

    def record_heartbeat_group(self, beats: Sequence[Heartbeat]) -> RecordedHeartbeats:
        # One statement for the whole group, executed for many rows at once, and no
        # read: the directories are merged into the inventory by the database
        # (json_patch on SQLite, jsonb || on PostgreSQL; an empty patch changes nothing).
        # It runs on a pooled connection's driver cursor, in SQLite's write turn (heartbeat_sql.py).
        # The rows' JSON is checked, not copied: `row` serialises it at once.
        sql = self._heartbeat_sql
        rows = [
            sql.row(
                b_id=beat.server_id,
                b_role=beat.role,
                b_at=utc(beat.now, "now"),
                b_problems=_checked(beat.problems, "problems"),
                b_patch={} if beat.directories is None
                else {"directories": _checked(beat.directories, "directories")},
            )
            for beat in beats
        ]
        with self._write_turn, _translate_db_errors():
            if len(rows) == 1 and sql.one_statement:  # PostgreSQL: the most common group, one round trip
                updated, counted = sql.write_alone(self._engine, rows[0])
                recorded = [updated == 1]
            else:
                with sql.transaction(self._engine) as cursor:
                    if not rows:
                        recorded = []
                    elif sql.update(cursor, rows) == len(rows):
                        recorded = [True] * len(rows)
                    else:
                        # Some server is unknown (or of another role): find out which, one row at a
                        # time, in the same transaction (writing the same values again changes nothing).
                        recorded = [sql.update(cursor, [row]) == 1 for row in rows]
                    counted = sql.counters(cursor)
        return RecordedHeartbeats(recorded, ChangeCounters(
            pairs=counted.get(PAIRS_COUNTER, 0), tag_requests=counted.get(TAG_REQUESTS_COUNTER, 0)))

    @functools.cached_property
    def _heartbeat_sql(self) -> HeartbeatSql:
        """The statements `record_heartbeat_group` runs, compiled once for this database."""
        patch = (
            sa.bindparam("b_patch", type_=JSONB)
            if self._pg
            else sa.bindparam("b_patch", type_=sa.JSON)
        )
        inventory = (
            servers.c.inventory.op("||")(patch)
            if self._pg
            # RFC 7396 merge patch: a top-level array replaces the old value whole (no
            # null values at the top level here, which would delete keys).
            else sa.func.json_patch(servers.c.inventory, patch)
        )
        update = (
            sa.update(servers)
            .where(servers.c.id == sa.bindparam("b_id"), servers.c.role == sa.bindparam("b_role"))
            .values(
                last_heartbeat_at=sa.bindparam("b_at", type_=servers.c.last_heartbeat_at.type),
                problems=sa.bindparam("b_problems", type_=servers.c.problems.type),
                inventory=inventory,
            )
        )
        alone = None
        if self._pg:
            # The update and the counters' read as one statement (a data-modifying CTE), so a
            # one-row group is one round trip in autocommit mode (heartbeat_sql.py, write_alone).
            updated = update.returning(servers.c.id).cte("updated")
            alone = self._counters_query.union_all(
                sa.select(sa.null(), sa.select(sa.func.count()).select_from(updated).scalar_subquery())
            )
        return HeartbeatSql(self._engine.dialect, update, self._counters_query, alone)

    def revoke_server(self, server_id: str, *, now: datetime) -> ServerRecord:
        now = utc(now, "now")
        with self._write() as conn:
            conn.execute(
                sa.update(servers)
                .where(servers.c.id == server_id, servers.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            return self._server(conn, server_id)

    def revoked_server_ids(self) -> list[str]:
        query = sa.select(servers.c.id).where(servers.c.revoked_at.is_not(None)).order_by(servers.c.id)
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    # --- operators -------------------------------------------------------------

    def add_operator(self, operator: OperatorRecord) -> OperatorRecord:
        if operator.role not in OPERATOR_ROLES:
            raise InvalidInput(f"unknown operator role {operator.role!r}", code="role-invalid")
        values = {
            "identity_id": operator.identity_id,
            "name": operator.name,
            "role": operator.role,
            "cert_serial": operator.cert_serial,
            "issued_at": utc(operator.issued_at, "issued_at"),
            "expires_at": utc(operator.expires_at, "expires_at"),
            "revoked_at": utc_or_none(operator.revoked_at, "revoked_at"),
        }
        with self._write() as conn:
            current = conn.execute(
                sa.select(operators.c.identity_id).where(
                    operators.c.name == operator.name, operators.c.revoked_at.is_(None)
                )
            ).first()
            if current is not None:
                raise Conflict(
                    f"operator {operator.name!r} already has a certificate",
                    hint=f"remove it first (`srctl user remove {operator.name}`), or choose another name",
                    code="operator-exists",
                )
            try:
                conn.execute(sa.insert(operators).values(values))
            except sa.exc.IntegrityError as exc:
                raise Conflict(f"identity {operator.identity_id} is already recorded", code="operator-exists") from exc
        return operator

    def list_operators(self, *, include_revoked: bool = False) -> list[OperatorRecord]:
        query = sa.select(operators).order_by(operators.c.name, operators.c.issued_at)
        if not include_revoked:
            query = query.where(operators.c.revoked_at.is_(None))
        with self._read() as conn:
            return [_operator_record(row) for row in conn.execute(query).mappings()]

    def revoke_operator(self, name: str, *, now: datetime) -> OperatorRecord:
        now = utc(now, "now")
        with self._write() as conn:
            row = conn.execute(
                sa.select(operators).where(operators.c.name == name, operators.c.revoked_at.is_(None))
            ).mappings().first()
            if row is None:
                raise NotFound(f"no operator {name!r}", hint="`srctl user list` shows them", code="operator-not-found")
            conn.execute(
                sa.update(operators).where(operators.c.identity_id == row["identity_id"]).values(revoked_at=now)
            )
            return _operator_record({**row, "revoked_at": now})

    def revoked_operator_ids(self) -> list[str]:
        query = sa.select(operators.c.identity_id).where(operators.c.revoked_at.is_not(None))
        with self._read() as conn:
            return sorted(conn.execute(query).scalars())

    def _server(self, conn: Connection, server_id: str, *, lock: bool = False) -> ServerRecord:
        query = sa.select(servers).where(servers.c.id == server_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            raise _server_not_found(server_id)
        return _server_record(row)

    # --- machines ----------------------------------------------------------------

    def upsert_machine(self, machine: MachineRecord) -> None:
        _check_id(machine.id, "machine id")
        values = {
            "id": machine.id,
            "server_id": machine.server_id,
            "hostname": machine.hostname,
            "os": machine.os,
            "addresses": json_copy(machine.addresses, "addresses", list),
            "disks": json_copy(machine.disks, "disks", list),
            "updated_at": utc_or_none(machine.updated_at, "updated_at"),
        }
        statement = self._insert(machines).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[machines.c.id],
            set_={k: statement.excluded[k] for k in values if k != "id"},
        )
        with self._write() as conn:
            self._server(conn, machine.server_id)  # NotFound names the missing server
            conn.execute(statement)

    def get_machine(self, machine_id: str) -> MachineRecord:
        with self._read() as conn:
            return self.get_machine_in(conn, machine_id)

    def list_machines(self) -> list[MachineRecord]:
        query = sa.select(machines).order_by(machines.c.hostname, machines.c.id)
        with self._read() as conn:
            return [_machine_record(row) for row in conn.execute(query).mappings()]

    # --- replication pairs ---------------------------------------------------------

    def create_pair(self, pair: PairRecord) -> PairRecord:
        _check_id(pair.id, "pair id")
        if pair.mode not in PAIR_MODES:
            raise InvalidInput(f"{pair.mode!r} is not a replication mode", hint=f"use one of: {', '.join(PAIR_MODES)}")
        _check_desired_state(pair.desired_state)
        if pair.sync_kind not in PAIR_SYNC_KINDS:
            raise InvalidInput(f"{pair.sync_kind!r} is not a sync kind", hint=f"use one of: {', '.join(PAIR_SYNC_KINDS)}")
        if pair.target_kind not in PAIR_TARGET_KINDS:
            raise InvalidInput(
                f"{pair.target_kind!r} is not a target kind", hint=f"use one of: {', '.join(PAIR_TARGET_KINDS)}"
            )
        if pair.disk_size_bytes <= 0:
            raise InvalidInput(f"disk size must be positive, not {pair.disk_size_bytes}")
        values = {
            "id": pair.id,
            "machine_id": pair.machine_id,
            "source_server_id": pair.source_server_id,
            "disk_name": pair.disk_name,
            "disk_identity": pair.disk_identity,
            "disk_size_bytes": pair.disk_size_bytes,
            "mode": pair.mode,
            "process_server_id": pair.process_server_id,
            "master_target_id": pair.master_target_id,
            "target_path": pair.target_path,
            "journal_dir": pair.journal_dir,
            "policy": json_copy(pair.policy, "policy"),
            "desired_state": pair.desired_state,
            "group_id": pair.group_id,
            "sync_kind": pair.sync_kind,
            "target_kind": pair.target_kind,
            "target_options": json_copy(pair.target_options, "target_options"),
            "created_at": utc(pair.created_at, "created_at"),
            "updated_at": utc(pair.updated_at, "updated_at"),
        }
        try:
            with self._write() as conn:
                self.get_machine_in(conn, pair.machine_id)
                for server_id in (pair.source_server_id, pair.process_server_id, pair.master_target_id):
                    self._server(conn, server_id)
                existing = conn.execute(
                    sa.select(pairs.c.id).where(
                        sa.or_(
                            pairs.c.id == pair.id,
                            sa.and_(
                                pairs.c.machine_id == pair.machine_id,
                                pairs.c.disk_identity == pair.disk_identity,
                            ),
                        )
                    )
                ).first()
                if existing is not None:
                    raise _pair_exists(pair, existing.id)
                conn.execute(sa.insert(pairs).values(values))
                created = self._pair(conn, pair.id)
                self._bump(conn, PAIRS_COUNTER)
                return created
        except sa.exc.IntegrityError as exc:  # lost a race with another insert
            raise _pair_exists(pair, pair.id) from exc

    def get_pair(self, pair_id: str) -> PairRecord:
        with self._read() as conn:
            return self._pair(conn, pair_id)

    def list_pairs(self, *, machine_id: str | None = None, server_id: str | None = None) -> list[PairRecord]:
        query = sa.select(pairs).order_by(pairs.c.machine_id, pairs.c.disk_name, pairs.c.id)
        if machine_id is not None:
            query = query.where(pairs.c.machine_id == machine_id)
        if server_id is not None:
            query = query.where(
                sa.or_(
                    pairs.c.source_server_id == server_id,
                    pairs.c.process_server_id == server_id,
                    pairs.c.master_target_id == server_id,
                )
            )
        with self._read() as conn:
            return [_pair_record(row) for row in conn.execute(query).mappings()]

    def set_pair_desired_state(self, pair_id: str, state: str, *, now: datetime) -> PairRecord:
        _check_desired_state(state)
        now = utc(now, "now")
        with self._write() as conn:
            result = conn.execute(
                sa.update(pairs).where(pairs.c.id == pair_id).values(desired_state=state, updated_at=now)
            )
            if result.rowcount != 1:
                raise _pair_not_found(pair_id)
            changed = self._pair(conn, pair_id)
            self._bump(conn, PAIRS_COUNTER)
            return changed

    def delete_pair(self, pair_id: str) -> None:
        with self._write() as conn:
            dropped = conn.execute(sa.delete(tag_requests).where(tag_requests.c.pair_id == pair_id)).rowcount
            conn.execute(sa.delete(pair_reports).where(pair_reports.c.pair_id == pair_id))
            if conn.execute(sa.delete(pairs).where(pairs.c.id == pair_id)).rowcount != 1:
                raise _pair_not_found(pair_id)
            self._bump(conn, PAIRS_COUNTER)
            if dropped:
                self._bump(conn, TAG_REQUESTS_COUNTER)

    def record_pair_reports(self, server_id: str, role: str, statuses: dict[str, dict], *, now: datetime) -> None:
        _check_role(role)
        now = utc(now, "now")
        if not statuses:
            return
        copied = {pid: json_copy(status, f"status of pair {pid}") for pid, status in statuses.items()}
        with self._write() as conn:
            known = {
                row.id
                for row in conn.execute(
                    sa.select(pairs.c.id).where(
                        pairs.c.id.in_(list(copied)),
                        sa.or_(
                            pairs.c.source_server_id == server_id,
                            pairs.c.process_server_id == server_id,
                            pairs.c.master_target_id == server_id,
                        ),
                    )
                )
            }
            rows = [
                {"pair_id": pid, "server_id": server_id, "role": role, "status": status, "reported_at": now}
                for pid, status in copied.items()
                if pid in known
            ]
            if not rows:
                return
            statement = self._insert(pair_reports).values(rows)
            statement = statement.on_conflict_do_update(
                index_elements=[pair_reports.c.pair_id, pair_reports.c.server_id],
                set_={k: statement.excluded[k] for k in ("role", "status", "reported_at")},
            )
            conn.execute(statement)

    def pair_reports(self, pair_id: str | None = None) -> list[PairReport]:
        query = sa.select(pair_reports).order_by(pair_reports.c.pair_id, pair_reports.c.server_id)
        if pair_id is not None:
            query = query.where(pair_reports.c.pair_id == pair_id)
        with self._read() as conn:
            return [
                PairReport(
                    pair_id=row["pair_id"],
                    server_id=row["server_id"],
                    role=row["role"],
                    status=row["status"],
                    reported_at=row["reported_at"],
                )
                for row in conn.execute(query).mappings()
            ]

    def add_tag_requests(self, requests: Sequence[TagRequestRecord]) -> None:
        rows = []
        for request in requests:
            _check_id(request.tag_id, "tag id")
            rows.append(
                {
                    "pair_id": request.pair_id,
                    "tag_id": request.tag_id,
                    "kind": request.kind,
                    "group_id": request.group_id,
                    "created_at": utc(request.created_at, "created_at"),
                    "expires_at": utc(request.expires_at, "expires_at"),
                    "cut_at": utc_or_none(request.cut_at, "cut_at"),
                    "held_at": None,
                    "outcome": "",
                }
            )
        if not rows:
            return
        try:
            with self._write() as conn:
                for row in rows:
                    self._pair(conn, row["pair_id"])
                conn.execute(sa.insert(tag_requests), rows)
                self._bump(conn, TAG_REQUESTS_COUNTER)
        except sa.exc.IntegrityError as exc:
            raise Conflict("that recovery point was asked for already", code="tag-request-exists") from exc

    def tag_requests(self, *, source_server_id: str, now: datetime) -> list[TagRequestRecord]:
        now = utc(now, "now")
        query = (
            sa.select(tag_requests)
            .join(pairs, pairs.c.id == tag_requests.c.pair_id)
            .where(pairs.c.source_server_id == source_server_id, tag_requests.c.expires_at > now)
            .order_by(tag_requests.c.created_at, tag_requests.c.tag_id)
        )
        with self._read() as conn:
            return [_tag_request_record(row) for row in conn.execute(query).mappings()]

    def remove_tag_requests(self, pair_id: str, tag_ids: Collection[str], *, now: datetime) -> None:
        now = utc(now, "now")
        with self._write() as conn:
            removed = 0
            if tag_ids:
                removed += conn.execute(
                    sa.delete(tag_requests).where(
                        tag_requests.c.pair_id == pair_id, tag_requests.c.tag_id.in_(list(tag_ids))
                    )
                ).rowcount
            removed += conn.execute(sa.delete(tag_requests).where(tag_requests.c.expires_at <= now)).rowcount
            if removed:  # most calls (a master target's every heartbeat) remove nothing
                self._bump(conn, TAG_REQUESTS_COUNTER)

    def hold_barrier(self, tag_id: str, source_server_id: str, *, now: datetime) -> str:
        now = utc(now, "now")
        with self._write() as conn:
            query = (
                sa.select(tag_requests, pairs.c.source_server_id)
                .join(pairs, pairs.c.id == tag_requests.c.pair_id)
                .where(tag_requests.c.tag_id == tag_id)
                .order_by(tag_requests.c.pair_id)
            )
            if self._pg:
                query = query.with_for_update(of=tag_requests)
            rows = list(conn.execute(query).mappings())
            mine = [r for r in rows if r["source_server_id"] == source_server_id]
            if not mine:
                raise NotFound(
                    f"no barrier {tag_id!r} for this source",
                    hint="it expired or was never asked for; let writes go",
                    code="barrier-not-found",
                )
            decided = {r["outcome"] for r in rows} - {BARRIER_WAIT}
            if decided:
                return decided.pop()
            conn.execute(
                sa.update(tag_requests)
                .where(tag_requests.c.tag_id == tag_id, tag_requests.c.pair_id.in_([r["pair_id"] for r in mine]))
                .values(held_at=now)
            )
            held = {r["pair_id"] for r in rows if r["held_at"] is not None} | {r["pair_id"] for r in mine}
            if any(r["expires_at"] <= now for r in rows):
                outcome = BARRIER_ABORTED
            elif len(held) == len(rows):
                outcome = BARRIER_COMMITTED
            else:
                return BARRIER_WAIT
            conn.execute(sa.update(tag_requests).where(tag_requests.c.tag_id == tag_id).values(outcome=outcome))
            self._bump(conn, TAG_REQUESTS_COUNTER)  # an aborted barrier is no longer sent
            return outcome

    # --- change counters ----------------------------------------------------------------

    def change_counters(self) -> ChangeCounters:
        with self._read() as conn:
            return self._counters(conn)

    def pairs_snapshot(self) -> PairsSnapshot:
        with self._read() as conn:
            counters = self._counters(conn)
            query = sa.select(pairs).order_by(pairs.c.machine_id, pairs.c.disk_name, pairs.c.id)
            records = tuple(_pair_record(row) for row in conn.execute(query).mappings())
            named = sorted({i for p in records for i in (p.process_server_id, p.master_target_id) if i})
            endpoints = dict.fromkeys(named, "")
            if named:
                query = sa.select(servers.c.id, servers.c.inventory).where(servers.c.id.in_(named))
                for row in conn.execute(query):
                    endpoint = (row.inventory or {}).get("data_endpoint", "")
                    endpoints[row.id] = endpoint if isinstance(endpoint, str) else ""
            return PairsSnapshot(counters, records, endpoints)

    def tag_requests_snapshot(self) -> TagRequestsSnapshot:
        query = (
            sa.select(tag_requests, pairs.c.source_server_id)
            .join(pairs, pairs.c.id == tag_requests.c.pair_id)
            .order_by(tag_requests.c.created_at, tag_requests.c.tag_id)
        )
        with self._read() as conn:
            counters = self._counters(conn)
            found = tuple((row["source_server_id"], _tag_request_record(row)) for row in conn.execute(query).mappings())
            return TagRequestsSnapshot(counters, found)

    def _counters(self, conn: Connection) -> ChangeCounters:
        values = {name: value for name, value in conn.execute(self._counters_query)}
        return ChangeCounters(pairs=values.get(PAIRS_COUNTER, 0), tag_requests=values.get(TAG_REQUESTS_COUNTER, 0))

    @functools.cached_property
    def _counters_query(self) -> sa.Select:
        return sa.select(change_counters.c.name, change_counters.c.value)

    def _bump(self, conn: Connection, name: str) -> None:
        """Count a change in this transaction. Call it last, and "pairs" before "tag_requests": on
        PostgreSQL it locks the counter's row until the commit, so a transaction that holds one may
        wait only for a counter that comes later, whose holder waits for nothing (no deadlock)."""
        statement = self._insert(change_counters).values(name=name, value=1)
        conn.execute(statement.on_conflict_do_update(
            index_elements=[change_counters.c.name], set_={"value": change_counters.c.value + 1}
        ))

    def get_machine_in(self, conn: Connection, machine_id: str) -> MachineRecord:
        row = conn.execute(sa.select(machines).where(machines.c.id == machine_id)).mappings().first()
        if row is None:
            raise _machine_not_found(machine_id)
        return _machine_record(row)

    def _pair(self, conn: Connection, pair_id: str) -> PairRecord:
        row = conn.execute(sa.select(pairs).where(pairs.c.id == pair_id)).mappings().first()
        if row is None:
            raise _pair_not_found(pair_id)
        return _pair_record(row)

    # --- jobs ------------------------------------------------------------------------

    def create_job(
        self,
        *,
        kind: str,
        target: str,
        step_names: Sequence[str],
        params: dict,
        now: datetime,
    ) -> JobRecord:
        now = utc(now, "now")
        if isinstance(step_names, str) or not all(isinstance(n, str) and n for n in step_names):
            raise InvalidInput("step_names must be a sequence of non-empty strings")
        if not kind:
            raise InvalidInput("a job needs a kind")
        job_id = str(uuid.uuid4())
        params = json_copy(params, "params")
        with self._write() as conn:
            conn.execute(
                sa.insert(jobs).values(
                    id=job_id,
                    kind=kind,
                    target=target,
                    status=states.PENDING,
                    created_at=now,
                    updated_at=now,
                    params=params,
                    error_code="",
                    error_message="",
                    version=1,
                )
            )
            if step_names:
                conn.execute(
                    sa.insert(steps),
                    [
                        {
                            "job_id": job_id,
                            "idx": i,
                            "name": name,
                            "status": states.PENDING,
                            "attempt": 0,
                            "progress": 0.0,
                            "message": "",
                            "error_code": "",
                            "lease_owner": "",
                            "lease_expires_at": None,
                            "output": {},
                        }
                        for i, name in enumerate(step_names)
                    ],
                )
            return self._job(conn, job_id)

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as conn:
            return self._job(conn, job_id)

    def list_jobs(self, *, statuses: Collection[str] | None = None, limit: int = 100) -> list[JobRecord]:
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, not {limit}")
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if statuses is not None:
            statuses = _statuses(statuses)
            query = query.where(jobs.c.status.in_(statuses))
        with self._read() as conn:
            return self._jobs(conn, query)

    def set_job_status(
        self,
        job_id: str,
        *,
        expected: Collection[str],
        new: str,
        now: datetime,
        error_code: str = "",
        error_message: str = "",
    ) -> bool:
        now = utc(now, "now")
        expected = _statuses(expected)
        if not expected:
            raise InvalidInput("expected must name at least one status")
        for old in expected:
            states.check_transition(old, new)
        values: dict[str, Any] = {
            "status": new,
            "updated_at": now,
            "version": jobs.c.version + 1,
        }
        if error_code:
            values["error_code"] = error_code
        if error_message:
            values["error_message"] = error_message
        with self._write() as conn:
            result = conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(expected)).values(values)
            )
            if result.rowcount == 1:
                return True
            if conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                raise _job_not_found(job_id)
            return False

    def claim_step(
        self, job_id: str, index: int, *, owner: str, lease_seconds: float, now: datetime
    ) -> StepRecord | None:
        now = utc(now, "now")
        _check_lease(owner, lease_seconds)
        with self._write() as conn:
            job = self._job(conn, job_id, lock=True)
            if not 0 <= index < len(job.steps):
                raise NotFound(
                    f"job {job_id} has no step {index}",
                    hint=f"its steps are numbered 0 to {len(job.steps) - 1}",
                    code="step-not-found",
                )
            action = states.next_action(job, now)
            if action.kind != "claim" or action.index != index:
                return None
            step = job.steps[index]
            new_status = states.claim_target(job.status)
            states.check_transition(step.status, new_status, entity="step")
            values: dict[str, Any] = {
                "status": new_status,
                "attempt": steps.c.attempt + 1,
                "lease_owner": owner,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
            }
            if new_status != step.status:
                values.update(progress=0.0, message="", error_code="")
            result = conn.execute(
                sa.update(steps)
                .where(
                    _step_is(job_id, index),
                    steps.c.status == step.status,
                    steps.c.attempt == step.attempt,
                    sa.or_(steps.c.lease_expires_at.is_(None), steps.c.lease_expires_at <= now),
                )
                .values(values)
            )
            if result.rowcount != 1:
                return None
            self._touch(conn, job_id, now)
            return self._step(conn, job_id, index)

    def renew_lease(
        self, job_id: str, index: int, *, owner: str, lease_seconds: float, now: datetime
    ) -> bool:
        now = utc(now, "now")
        _check_lease(owner, lease_seconds)
        with self._write() as conn:
            if not self._lock_job(conn, job_id):
                return False
            result = conn.execute(
                sa.update(steps)
                .where(
                    _step_is(job_id, index),
                    steps.c.lease_owner == owner,
                    steps.c.status.in_(states.LEASED_STEP_STATUSES),
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            if result.rowcount != 1:
                return False
            self._touch(conn, job_id, now)
            return True

    def update_step(
        self,
        job_id: str,
        index: int,
        *,
        owner: str,
        now: datetime,
        status: str | None = None,
        progress: float | None = None,
        message: str | None = None,
        error_code: str | None = None,
        output: dict | None = None,
    ) -> bool:
        now = utc(now, "now")
        if not owner:
            raise InvalidInput("owner must not be empty")
        values: dict[str, Any] = {}
        if status is not None:
            states.check_status(status, entity="step")
            values["status"] = status
            if status not in states.LEASED_STEP_STATUSES:
                values.update(lease_owner="", lease_expires_at=None)
        if progress is not None:
            if not 0.0 <= progress <= 1.0:
                raise InvalidInput(f"progress must be between 0 and 1, not {progress}")
            values["progress"] = float(progress)
        if message is not None:
            values["message"] = message
        if error_code is not None:
            values["error_code"] = error_code
        if output is not None:
            values["output"] = json_copy(output, "output")
        with self._write() as conn:
            if not self._lock_job(conn, job_id):
                return False
            row = conn.execute(sa.select(steps).where(_step_is(job_id, index))).mappings().first()
            if row is None or row["lease_owner"] != owner or row["status"] not in states.LEASED_STEP_STATUSES:
                return False
            if status is not None:
                states.check_transition(row["status"], status, entity="step")
            if not values:
                return True
            result = conn.execute(
                sa.update(steps)
                .where(
                    _step_is(job_id, index),
                    steps.c.lease_owner == owner,
                    steps.c.status == row["status"],
                    steps.c.attempt == row["attempt"],
                )
                .values(values)
            )
            if result.rowcount != 1:
                return False
            self._touch(conn, job_id, now)
            return True

    def runnable_job_ids(self, *, now: datetime) -> list[str]:
        now = utc(now, "now")
        query = (
            sa.select(jobs)
            .where(jobs.c.status.in_(states.ACTIVE_JOB_STATUSES))
            .order_by(jobs.c.created_at, jobs.c.id)
        )
        with self._read() as conn:
            active = self._jobs(conn, query)
        return [job.id for job in active if states.next_action(job, now).kind in ("settle", "claim")]

    def release_leases(self, owner: str, *, now: datetime) -> int:
        now = utc(now, "now")
        if not owner:
            raise InvalidInput("owner must not be empty")
        with self._write() as conn:
            held = conn.execute(
                sa.select(steps.c.job_id)
                .where(steps.c.lease_owner == owner, steps.c.status.in_(states.LEASED_STEP_STATUSES))
                .distinct()
            ).scalars().all()
            for job_id in held:
                self._lock_job(conn, job_id)
                conn.execute(
                    sa.update(steps)
                    .where(steps.c.job_id == job_id, steps.c.lease_owner == owner)
                    .values(lease_expires_at=now)
                )
                self._touch(conn, job_id, now)
            return len(held)

    def close(self) -> None:
        if "_heartbeat_sql" in self.__dict__:  # a cached_property that has been built
            self._heartbeat_sql.release()
        self._engine.dispose()

    # --- job helpers -------------------------------------------------------------------

    def _lock_job(self, conn: Connection, job_id: str) -> bool:
        query = sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update()
        return conn.execute(query).first() is not None

    def _touch(self, conn: Connection, job_id: str, now: datetime) -> None:
        conn.execute(
            sa.update(jobs).where(jobs.c.id == job_id).values(version=jobs.c.version + 1, updated_at=now)
        )

    def _job(self, conn: Connection, job_id: str, *, lock: bool = False) -> JobRecord:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if lock:
            query = query.with_for_update()
        found = self._jobs(conn, query)
        if not found:
            raise _job_not_found(job_id)
        return found[0]

    def _jobs(self, conn: Connection, query: sa.Select) -> list[JobRecord]:
        rows = conn.execute(query).mappings().all()
        if not rows:
            return []
        by_job: dict[str, list[StepRecord]] = {row["id"]: [] for row in rows}
        step_rows = conn.execute(
            sa.select(steps).where(steps.c.job_id.in_(list(by_job))).order_by(steps.c.job_id, steps.c.idx)
        ).mappings()
        for step_row in step_rows:
            by_job[step_row["job_id"]].append(_step_record(step_row))
        return [_job_record(row, tuple(by_job[row["id"]])) for row in rows]

    def _step(self, conn: Connection, job_id: str, index: int) -> StepRecord:
        row = conn.execute(sa.select(steps).where(_step_is(job_id, index))).mappings().one()
        return _step_record(row)


# --- engine -----------------------------------------------------------------------------


def _make_engine(url: str) -> Engine:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise InvalidInput(
            f"not a database URL: {url!r}",
            hint="use sqlite:///PATH/store.db or postgresql+psycopg://USER@HOST/DB",
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
            raise InvalidInput(
                "the store needs a SQLite file, not an in-memory database",
                hint="use sqlite:///PATH/store.db (a temporary directory is fine for tests)",
            )
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            **POOL,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, pool_pre_ping=True, **POOL)
    raise InvalidInput(
        f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)}",
        hint="use sqlite:///PATH/store.db or postgresql+psycopg://USER@HOST/DB",
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module; `_sqlite_on_begin`
    # emits BEGIN itself. sqlite3 still commits and rolls back correctly.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: a read-then-write transaction
    # then waits its turn (busy timeout) instead of failing at the write.
    statement = "BEGIN" if conn.get_execution_options().get("sr_read_only", False) else "BEGIN IMMEDIATE"
    # On the driver's connection: SQLAlchemy's statement path cost more than the BEGIN
    # itself, once per transaction (heartbeat_sql.py). Its errors are wrapped as SQLAlchemy
    # would have wrapped them ("database is locked" after the busy timeout: OperationalError).
    try:
        conn.connection.dbapi_connection.execute(statement)
    except sqlite3.Error as exc:
        raise sa.exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc


def _checked(value: list, what: str) -> list:
    json_check(value, what, list)
    return value


@contextmanager
def _translate_db_errors() -> Iterator[None]:
    try:
        yield
    except sa.exc.OperationalError as exc:
        raise Unavailable(
            f"the state store cannot be reached or is busy: {exc.orig}",
            hint="check that the database is up and its disk is not full, then retry",
            code="store-unavailable",
        ) from exc


# --- migrations -------------------------------------------------------------------------


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic Config built in code: no alembic.ini is needed.

    Pass an open connection (its transaction is used) or a URL. To write a new
    migration: `alembic.command.revision(alembic_config(url=...), message=...,
    autogenerate=True, rev_id="0002")`, then review the generated file.
    """
    config = Config()
    location = str(Path(migrations.__file__).parent)
    config.set_main_option("script_location", location.replace("%", "%%"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def known_revisions() -> set[str]:
    """Every schema revision this version's migrations know."""
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


# --- rows to records ------------------------------------------------------------------------


def _server_record(row: Any) -> ServerRecord:
    return ServerRecord(
        id=row["id"],
        role=row["role"],
        hostname=row["hostname"],
        cert_serial=row["cert_serial"],
        cert_fingerprint=row["cert_fingerprint"],
        enrolled_at=row["enrolled_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        registered_at=row["registered_at"],
        inventory=row["inventory"],
        problems=row["problems"],
        revoked_at=row["revoked_at"],
    )


def _operator_record(row: Any) -> OperatorRecord:
    return OperatorRecord(
        identity_id=row["identity_id"],
        name=row["name"],
        role=row["role"],
        cert_serial=row["cert_serial"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def _machine_record(row: Any) -> MachineRecord:
    return MachineRecord(
        id=row["id"],
        server_id=row["server_id"],
        hostname=row["hostname"],
        os=row["os"],
        addresses=row["addresses"],
        disks=row["disks"],
        updated_at=row["updated_at"],
    )


def _pair_record(row: Any) -> PairRecord:
    return PairRecord(
        id=row["id"],
        machine_id=row["machine_id"],
        source_server_id=row["source_server_id"],
        disk_name=row["disk_name"],
        disk_identity=row["disk_identity"],
        disk_size_bytes=row["disk_size_bytes"],
        mode=row["mode"],
        process_server_id=row["process_server_id"],
        master_target_id=row["master_target_id"],
        target_path=row["target_path"],
        journal_dir=row["journal_dir"],
        policy=row["policy"],
        desired_state=row["desired_state"],
        group_id=row["group_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        sync_kind=row["sync_kind"],
        target_kind=row["target_kind"],
        target_options=row["target_options"],
    )


def _tag_request_record(row: Any) -> TagRequestRecord:
    return TagRequestRecord(
        pair_id=row["pair_id"],
        tag_id=row["tag_id"],
        kind=row["kind"],
        group_id=row["group_id"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        cut_at=row["cut_at"],
        held_at=row["held_at"],
        outcome=row["outcome"],
    )


def _step_record(row: Any) -> StepRecord:
    return StepRecord(
        job_id=row["job_id"],
        index=row["idx"],
        name=row["name"],
        status=row["status"],
        attempt=row["attempt"],
        progress=row["progress"],
        message=row["message"],
        error_code=row["error_code"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        output=row["output"],
    )


def _job_record(row: Any, job_steps: tuple[StepRecord, ...]) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        target=row["target"],
        status=row["status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        params=row["params"],
        steps=job_steps,
        error_code=row["error_code"],
        error_message=row["error_message"],
        version=row["version"],
    )


# --- small checks ------------------------------------------------------------------------------


def _step_is(job_id: str, index: int) -> sa.ColumnElement[bool]:
    return sa.and_(steps.c.job_id == job_id, steps.c.idx == index)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidInput(
            f"{role!r} is not a server role",
            hint=f"use one of: {', '.join(ROLES)}",
            code="unknown-role",
        )


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty string")


def _check_lease(owner: str, lease_seconds: float) -> None:
    if not owner:
        raise InvalidInput("owner must not be empty")
    if not lease_seconds > 0:
        raise InvalidInput(f"lease_seconds must be positive, not {lease_seconds}")


def _statuses(values: Collection[str]) -> list[str]:
    if isinstance(values, str):
        raise InvalidInput("statuses must be a collection of status names, not one string")
    result = sorted(set(values))
    for status in result:
        states.check_status(status)
    return result


def _server_not_found(server_id: str) -> NotFound:
    return NotFound(
        f"no server with id {server_id!r}",
        hint="check the id; list_servers shows the enrolled servers",
        code="server-not-found",
    )


def _machine_not_found(machine_id: str) -> NotFound:
    return NotFound(
        f"no machine with id {machine_id!r}",
        hint="list the protected machines to find its id",
        code="machine-not-found",
    )


def _pair_not_found(pair_id: str) -> NotFound:
    return NotFound(
        f"no replication pair with id {pair_id!r}",
        hint="`srctl replication status` lists the pairs",
        code="pair-not-found",
    )


def _pair_exists(pair: PairRecord, existing_id: str) -> Conflict:
    return Conflict(
        f"disk {pair.disk_name!r} of machine {pair.machine_id} is already replicated (pair {existing_id})",
        hint="`srctl replication status` shows it; disable it first to replicate the disk elsewhere",
        code="pair-exists",
    )


def _check_desired_state(state: str) -> None:
    if state not in PAIR_DESIRED_STATES:
        raise InvalidInput(
            f"{state!r} is not a pair state", hint=f"use one of: {', '.join(PAIR_DESIRED_STATES)}"
        )


def _job_not_found(job_id: str) -> NotFound:
    return NotFound(
        f"no job with id {job_id!r}",
        hint="`srctl jobs list` shows recent jobs",
        code="job-not-found",
    )
