"""The vCenter part of `SqlStore` (tables `vcenters`, `vcenter_inventories`; migration 0003).

A mixin, so that sql.py stays readable; it uses SqlStore's `_read`/`_write`
transactions, so every method here is one transaction too, with the same
crash behaviour (all of a method's changes or none).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.store.base import VcenterInventory, VcenterRecord, json_copy, utc
from siterecovery.controller.store.schema import vcenter_inventories, vcenters


class VcenterSqlMixin:
    _read: Any
    _write: Any

    def add_vcenter(self, vcenter: VcenterRecord) -> VcenterRecord:
        _check_vcenter(vcenter)
        values = {
            "id": vcenter.id,
            "name": vcenter.name,
            "host": vcenter.host,
            "port": vcenter.port,
            "username": vcenter.username,
            "secret": vcenter.secret,
            "trust": json_copy(vcenter.trust, "trust"),
            "created_at": utc(vcenter.created_at, "created_at"),
            "updated_at": utc(vcenter.updated_at, "updated_at"),
            "discovery_requested_at": None,
            "discovered_at": None,
            "discovery_status": "",
            "discovery_error": "",
        }
        try:
            with self._write() as conn:
                clash = conn.execute(
                    sa.select(vcenters.c.name).where(
                        sa.or_(
                            vcenters.c.id == vcenter.id,
                            vcenters.c.name == vcenter.name,
                            sa.and_(vcenters.c.host == vcenter.host, vcenters.c.port == vcenter.port),
                        )
                    )
                ).first()
                if clash is not None:
                    raise _exists(vcenter, clash.name)
                conn.execute(sa.insert(vcenters).values(values))
                return _vcenter(conn, vcenter.id)
        except sa.exc.IntegrityError as exc:  # lost a race with another insert
            raise _exists(vcenter, vcenter.name) from exc

    def get_vcenter(self, name_or_id: str) -> VcenterRecord:
        with self._read() as conn:
            return _vcenter(conn, name_or_id)

    def list_vcenters(self) -> list[VcenterRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(vcenters).order_by(vcenters.c.name)).mappings()
            return [_record(row) for row in rows]

    def update_vcenter_credentials(
        self, name_or_id: str, *, username: str, secret: str, now: datetime
    ) -> VcenterRecord:
        if not username or not secret:
            raise InvalidInput("the user name and the password must not be empty")
        with self._write() as conn:
            current = _vcenter(conn, name_or_id)
            conn.execute(
                sa.update(vcenters)
                .where(vcenters.c.id == current.id)
                .values(username=username, secret=secret, updated_at=utc(now, "now"))
            )
            return _vcenter(conn, current.id)

    def remove_vcenter(self, name_or_id: str) -> None:
        with self._write() as conn:
            current = _vcenter(conn, name_or_id)
            conn.execute(sa.delete(vcenter_inventories).where(vcenter_inventories.c.vcenter_id == current.id))
            conn.execute(sa.delete(vcenters).where(vcenters.c.id == current.id))

    def request_discovery(self, vcenter_id: str, *, due_before: datetime | None, now: datetime) -> bool:
        query = sa.update(vcenters).where(vcenters.c.id == vcenter_id)
        if due_before is not None:
            query = query.where(
                sa.or_(
                    vcenters.c.discovery_requested_at.is_(None),
                    vcenters.c.discovery_requested_at < utc(due_before, "due_before"),
                )
            )
        with self._write() as conn:
            _vcenter(conn, vcenter_id)
            return conn.execute(query.values(discovery_requested_at=utc(now, "now"))).rowcount == 1

    def record_discovery(
        self, vcenter_id: str, *, now: datetime, document: dict | None = None, error: str = ""
    ) -> VcenterRecord:
        if (document is None) == (not error):
            raise InvalidInput("record a discovery with either its document or its error")
        now = utc(now, "now")
        with self._write() as conn:
            current = _vcenter(conn, vcenter_id)
            if document is not None:
                doc = json_copy(document, "document")
                conn.execute(
                    sa.delete(vcenter_inventories).where(vcenter_inventories.c.vcenter_id == current.id)
                )
                conn.execute(
                    sa.insert(vcenter_inventories).values(
                        vcenter_id=current.id, discovered_at=now, document=doc
                    )
                )
                values = {"discovered_at": now, "discovery_status": "ok", "discovery_error": ""}
            else:
                values = {"discovery_status": "failed", "discovery_error": error}
            conn.execute(sa.update(vcenters).where(vcenters.c.id == current.id).values(**values))
            return _vcenter(conn, current.id)

    def get_vcenter_inventory(self, vcenter_id: str) -> VcenterInventory:
        with self._read() as conn:
            current = _vcenter(conn, vcenter_id)
            row = (
                conn.execute(
                    sa.select(vcenter_inventories).where(vcenter_inventories.c.vcenter_id == current.id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(
                f"vCenter {current.name!r} has not been discovered yet",
                hint=f"run `srctl vcenter discover {current.name}` and check `srctl jobs list`",
                code="inventory-not-found",
            )
        return VcenterInventory(
            vcenter_id=row["vcenter_id"], discovered_at=row["discovered_at"], document=row["document"]
        )


def _check_vcenter(v: VcenterRecord) -> None:
    for what, value in (
        ("id", v.id),
        ("name", v.name),
        ("host", v.host),
        ("user name", v.username),
        ("secret", v.secret),
    ):
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"the vCenter {what} must not be empty")
    if not 0 < v.port < 65536:
        raise InvalidInput(f"port {v.port} is out of range", hint="vCenter and ESXi listen on 443")


def _vcenter(conn: Connection, name_or_id: str) -> VcenterRecord:
    row = (
        conn.execute(
            sa.select(vcenters).where(sa.or_(vcenters.c.name == name_or_id, vcenters.c.id == name_or_id))
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(
            f"no vCenter or ESXi endpoint called {name_or_id!r}",
            hint="`srctl vcenter list` shows them",
            code="vcenter-not-found",
        )
    return _record(row)


def _record(row: Any) -> VcenterRecord:
    return VcenterRecord(
        id=row["id"],
        name=row["name"],
        host=row["host"],
        port=row["port"],
        username=row["username"],
        secret=row["secret"],
        trust=row["trust"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        discovery_requested_at=row["discovery_requested_at"],
        discovered_at=row["discovered_at"],
        discovery_status=row["discovery_status"],
        discovery_error=row["discovery_error"],
    )


def _exists(v: VcenterRecord, existing: str) -> Conflict:
    return Conflict(
        f"{v.host}:{v.port} or the name {v.name!r} is already registered (as {existing!r})",
        hint="`srctl vcenter list` shows it; use update-credentials to change its account",
        code="vcenter-exists",
    )
