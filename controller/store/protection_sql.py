"""The protection part of `SqlStore` (migration 0007).

Tables: protection_groups (a primary group and its `_Failback` twin, whose
`failback_of` names the primary; removing the primary removes the twin),
recovery_plans (a JSON definition with a version for compare-and-set),
protected_items (one per protected machine: lifecycle state, group, JSON
details, version for compare-and-set) and job_signals (an operator's answer to
a waiting job). A mixin like vcenters_sql.py: every method is one transaction,
so a crash leaves all of a method's changes or none.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.store.base import (
    ProtectedItemRecord,
    ProtectionGroupRecord,
    RecoveryPlanRecord,
    json_copy,
    utc,
)
from siterecovery.controller.store.schema import (
    enrollment_nonces,
    job_signals,
    jobs,
    machines,
    protected_items,
    protection_groups,
    recovery_plans,
)


class ProtectionSqlMixin:
    _read: Any
    _write: Any

    # --- protection groups ---

    def add_protection_groups(self, primary: ProtectionGroupRecord, twin: ProtectionGroupRecord) -> None:
        if twin.failback_of != primary.id or primary.failback_of:
            raise InvalidInput("the twin must name the primary group as failback_of")
        rows = [_group_values(primary), _group_values(twin)]
        try:
            with self._write() as conn:
                taken = conn.execute(
                    sa.select(protection_groups.c.name).where(
                        protection_groups.c.name.in_([primary.name, twin.name])
                        | protection_groups.c.id.in_([primary.id, twin.id])
                    )
                ).first()
                if taken is not None:
                    raise _group_exists(taken.name)
                conn.execute(sa.insert(protection_groups), rows)
        except sa.exc.IntegrityError as exc:  # lost a race with another insert
            raise _group_exists(primary.name) from exc

    def get_protection_group(self, name_or_id: str) -> ProtectionGroupRecord:
        with self._read() as conn:
            return _group(conn, name_or_id)

    def list_protection_groups(self) -> list[ProtectionGroupRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(protection_groups).order_by(protection_groups.c.name)).mappings()
            return [_group_record(row) for row in rows]

    def remove_protection_groups(self, name_or_id: str) -> None:
        with self._write() as conn:
            group = _group(conn, name_or_id)
            if group.failback_of:
                raise InvalidInput(
                    f"{group.name} is the failback twin of another group",
                    hint="remove the primary group; its twin goes with it",
                    code="protection-group-twin",
                )
            ids = [group.id, *conn.execute(
                sa.select(protection_groups.c.id).where(protection_groups.c.failback_of == group.id)
            ).scalars()]
            used = conn.execute(
                sa.select(protected_items.c.name).where(protected_items.c.group_id.in_(ids))
            ).scalars().all()
            if used:
                raise Conflict(
                    f"protection group {group.name} still holds {', '.join(sorted(used))}",
                    hint="disable protection of those machines first",
                    code="protection-group-in-use",
                )
            conn.execute(sa.delete(protection_groups).where(protection_groups.c.failback_of == group.id))
            conn.execute(sa.delete(protection_groups).where(protection_groups.c.id == group.id))

    # --- recovery plans ---

    def save_recovery_plan(self, plan: RecoveryPlanRecord, *, expected_version: int | None) -> RecoveryPlanRecord:
        values = {
            "id": plan.id,
            "name": plan.name,
            "definition": json_copy(plan.definition, "definition"),
            "created_at": utc(plan.created_at, "created_at"),
            "updated_at": utc(plan.updated_at, "updated_at"),
        }
        try:
            with self._write() as conn:
                if expected_version is None:
                    clash = conn.execute(
                        sa.select(recovery_plans.c.id).where(
                            (recovery_plans.c.name == plan.name) | (recovery_plans.c.id == plan.id)
                        )
                    ).first()
                    if clash is not None:
                        raise _plan_exists(plan.name)
                    conn.execute(sa.insert(recovery_plans).values({**values, "version": 1}))
                else:
                    result = conn.execute(
                        sa.update(recovery_plans)
                        .where(recovery_plans.c.id == plan.id, recovery_plans.c.version == expected_version)
                        .values(
                            definition=values["definition"],
                            updated_at=values["updated_at"],
                            version=recovery_plans.c.version + 1,
                        )
                    )
                    if result.rowcount != 1:
                        _plan(conn, plan.id)  # NotFound when it is gone
                        raise Conflict(
                            f"recovery plan {plan.name} changed while you edited it",
                            hint="run the command again",
                            code="recovery-plan-changed",
                        )
                return _plan(conn, plan.id)
        except sa.exc.IntegrityError as exc:
            raise _plan_exists(plan.name) from exc

    def get_recovery_plan(self, name_or_id: str) -> RecoveryPlanRecord:
        with self._read() as conn:
            return _plan(conn, name_or_id)

    def list_recovery_plans(self) -> list[RecoveryPlanRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(recovery_plans).order_by(recovery_plans.c.name)).mappings()
            return [_plan_record(row) for row in rows]

    def remove_recovery_plan(self, name_or_id: str) -> None:
        with self._write() as conn:
            plan = _plan(conn, name_or_id)
            conn.execute(sa.delete(recovery_plans).where(recovery_plans.c.id == plan.id))

    # --- protected machines ---

    def add_protected_item(self, item: ProtectedItemRecord) -> ProtectedItemRecord:
        values = {
            "id": item.id,
            "name": item.name,
            "machine_id": item.machine_id,
            "group_id": item.group_id,
            "state": item.state,
            "details": json_copy(item.details, "details"),
            "version": 1,
            "created_at": utc(item.created_at, "created_at"),
            "updated_at": utc(item.updated_at, "updated_at"),
        }
        try:
            with self._write() as conn:
                if conn.execute(sa.select(machines.c.id).where(machines.c.id == item.machine_id)).first() is None:
                    raise NotFound(f"no machine {item.machine_id}", code="machine-not-found")
                _group(conn, item.group_id)
                if conn.execute(
                    sa.select(protected_items.c.id).where(protected_items.c.machine_id == item.machine_id)
                ).first():
                    raise _item_exists(item.name)
                conn.execute(sa.insert(protected_items).values(values))
                return _item(conn, item.id)
        except sa.exc.IntegrityError as exc:
            raise _item_exists(item.name) from exc

    def get_protected_item(self, item_id: str) -> ProtectedItemRecord:
        with self._read() as conn:
            return _item(conn, item_id)

    def list_protected_items(self, *, group_id: str | None = None) -> list[ProtectedItemRecord]:
        query = sa.select(protected_items).order_by(protected_items.c.name, protected_items.c.id)
        if group_id is not None:
            query = query.where(protected_items.c.group_id == group_id)
        with self._read() as conn:
            return [_item_record(row) for row in conn.execute(query).mappings()]

    def update_protected_item(
        self,
        item_id: str,
        *,
        expected_version: int,
        now: datetime,
        state: str | None = None,
        group_id: str | None = None,
        details: dict | None = None,
    ) -> ProtectedItemRecord | None:
        values: dict[str, Any] = {"updated_at": utc(now, "now"), "version": protected_items.c.version + 1}
        if state is not None:
            values["state"] = state
        if group_id is not None:
            values["group_id"] = group_id
        if details is not None:
            values["details"] = json_copy(details, "details")
        with self._write() as conn:
            if group_id is not None:
                _group(conn, group_id)
            result = conn.execute(
                sa.update(protected_items)
                .where(protected_items.c.id == item_id, protected_items.c.version == expected_version)
                .values(values)
            )
            if result.rowcount != 1:
                _item(conn, item_id)  # NotFound when it is gone
                return None
            return _item(conn, item_id)

    def remove_protected_item(self, item_id: str) -> None:
        with self._write() as conn:
            _item(conn, item_id)
            conn.execute(sa.delete(protected_items).where(protected_items.c.id == item_id))

    # --- job signals ---

    def signal_job(self, job_id: str, name: str, *, now: datetime) -> bool:
        if not name:
            raise InvalidInput("a signal needs a name")
        try:
            with self._write() as conn:
                if conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                    raise NotFound(f"no job {job_id}", hint="`srctl jobs list` shows them", code="job-not-found")
                if conn.execute(
                    sa.select(job_signals.c.name).where(job_signals.c.job_id == job_id, job_signals.c.name == name)
                ).first():
                    return False
                conn.execute(sa.insert(job_signals).values(job_id=job_id, name=name, created_at=utc(now, "now")))
                return True
        except sa.exc.IntegrityError:  # the same signal given twice at once
            return False

    # --- enrollment nonces (not protection, but as small; 0008) ---

    def claim_enrollment_nonce(self, digest: str, *, now: datetime, keep_seconds: float) -> bool:
        if not digest or len(digest) > 64:
            raise InvalidInput("a nonce digest is 1 to 64 characters")
        now = utc(now, "now")
        try:
            with self._write() as conn:
                conn.execute(sa.delete(enrollment_nonces).where(
                    enrollment_nonces.c.seen_at < now - timedelta(seconds=keep_seconds)))
                if conn.execute(
                    sa.select(enrollment_nonces.c.digest).where(enrollment_nonces.c.digest == digest)
                ).first():
                    return False
                conn.execute(sa.insert(enrollment_nonces).values(digest=digest, seen_at=now))
                return True
        except sa.exc.IntegrityError:  # the same request twice at once, on two replicas
            return False

    def job_signals(self, job_id: str) -> set[str]:
        with self._read() as conn:
            return set(conn.execute(sa.select(job_signals.c.name).where(job_signals.c.job_id == job_id)).scalars())


def _group_values(group: ProtectionGroupRecord) -> dict:
    return {
        "id": group.id,
        "name": group.name,
        "failback_of": group.failback_of or None,
        "policy": json_copy(group.policy, "policy"),
        "created_at": utc(group.created_at, "created_at"),
    }


def _group(conn: Connection, name_or_id: str) -> ProtectionGroupRecord:
    row = (
        conn.execute(
            sa.select(protection_groups).where(
                (protection_groups.c.name == name_or_id) | (protection_groups.c.id == name_or_id)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(
            f"no protection group called {name_or_id!r}",
            hint="`srctl group list` shows them",
            code="protection-group-not-found",
        )
    return _group_record(row)


def _group_record(row: Any) -> ProtectionGroupRecord:
    return ProtectionGroupRecord(
        id=row["id"],
        name=row["name"],
        policy=row["policy"],
        created_at=row["created_at"],
        failback_of=row["failback_of"] or "",
    )


def _group_exists(name: str) -> Conflict:
    return Conflict(
        f"a protection group called {name!r} exists",
        hint="choose another name (`srctl group list`)",
        code="protection-group-exists",
    )


def _plan(conn: Connection, name_or_id: str) -> RecoveryPlanRecord:
    row = (
        conn.execute(
            sa.select(recovery_plans).where((recovery_plans.c.name == name_or_id) | (recovery_plans.c.id == name_or_id))
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(
            f"no recovery plan called {name_or_id!r}",
            hint="`srctl plan list` shows them",
            code="recovery-plan-not-found",
        )
    return _plan_record(row)


def _plan_record(row: Any) -> RecoveryPlanRecord:
    return RecoveryPlanRecord(
        id=row["id"],
        name=row["name"],
        definition=row["definition"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
    )


def _plan_exists(name: str) -> Conflict:
    return Conflict(
        f"a recovery plan called {name!r} exists",
        hint="choose another name (`srctl plan list`)",
        code="recovery-plan-exists",
    )


def _item(conn: Connection, item_id: str) -> ProtectedItemRecord:
    row = conn.execute(sa.select(protected_items).where(protected_items.c.id == item_id)).mappings().first()
    if row is None:
        raise NotFound(
            f"no protected machine {item_id!r}",
            hint="`srctl machine list` shows them",
            code="protected-machine-not-found",
        )
    return _item_record(row)


def _item_record(row: Any) -> ProtectedItemRecord:
    return ProtectedItemRecord(
        id=row["id"],
        name=row["name"],
        machine_id=row["machine_id"],
        group_id=row["group_id"],
        state=row["state"],
        details=row["details"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
    )


def _item_exists(name: str) -> Conflict:
    return Conflict(
        f"{name} is already protected",
        hint="`srctl machine failback-status` shows where it stands",
        code="machine-already-protected",
    )
