"""The Azure part of `SqlStore` (table `azure_sites`; migration 0005).

A mixin, like vcenters_sql.py: it uses SqlStore's `_read`/`_write`
transactions, so every method here is one transaction, with the same crash
behaviour (all of a method's changes or none). `secret` is ciphertext made by
the controller; this module never sees a clear secret.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.jobs import states
from siterecovery.controller.store.base import AzureSiteRecord, json_copy, utc
from siterecovery.controller.store.schema import azure_sites, jobs, pairs


class AzureSiteSqlMixin:
    _read: Any
    _write: Any

    def add_azure_site(self, site: AzureSiteRecord) -> AzureSiteRecord:
        for what, value in (("id", site.id), ("name", site.name), ("secret", site.secret)):
            if not isinstance(value, str) or not value:
                raise InvalidInput(f"the Azure site {what} must not be empty")
        values = {
            "id": site.id,
            "name": site.name,
            "settings": json_copy(site.settings, "settings"),
            "secret": site.secret,
            "created_at": utc(site.created_at, "created_at"),
            "updated_at": utc(site.updated_at, "updated_at"),
        }
        try:
            with self._write() as conn:
                clash = conn.execute(
                    sa.select(azure_sites.c.name).where(
                        sa.or_(azure_sites.c.id == site.id, azure_sites.c.name == site.name)
                    )
                ).first()
                if clash is not None:
                    raise _exists(site.name)
                conn.execute(sa.insert(azure_sites).values(values))
                return _site(conn, site.id)
        except sa.exc.IntegrityError as exc:  # lost a race with another insert
            raise _exists(site.name) from exc

    def get_azure_site(self, name_or_id: str) -> AzureSiteRecord:
        with self._read() as conn:
            return _site(conn, name_or_id)

    def list_azure_sites(self) -> list[AzureSiteRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(azure_sites).order_by(azure_sites.c.name)).mappings()
            return [_record(row) for row in rows]

    def update_azure_site_credentials(
        self, name_or_id: str, *, client_id: str, secret: str, now: datetime
    ) -> AzureSiteRecord:
        if not client_id or not secret:
            raise InvalidInput("the client id and the secret must not be empty")
        with self._write() as conn:
            current = _site(conn, name_or_id)
            conn.execute(
                sa.update(azure_sites)
                .where(azure_sites.c.id == current.id)
                .values(
                    settings={**current.settings, "client_id": client_id},
                    secret=secret,
                    updated_at=utc(now, "now"),
                )
            )
            return _site(conn, current.id)

    def remove_azure_site(self, name_or_id: str, *, unless_used_by_kinds: Collection[str] = ()) -> None:
        with self._write() as conn:
            current = _site(conn, name_or_id)
            if unless_used_by_kinds:
                rows = conn.execute(
                    sa.select(jobs.c.id, jobs.c.kind, jobs.c.params).where(
                        jobs.c.status.in_(sorted(states.ACTIVE_JOB_STATUSES)),
                        jobs.c.kind.in_(sorted(unless_used_by_kinds)),
                    )
                ).all()
                using = [row.id for row in rows if (row.params or {}).get("site_id") == current.id]
                if using:
                    raise Conflict(
                        f"Azure site {current.name!r} is used by active job(s) {', '.join(using)}",
                        hint="wait for them to finish (srctl jobs watch ID), then remove the site",
                        code="azure-site-in-use",
                    )
            protecting = [
                row.id
                for row in conn.execute(
                    sa.select(pairs.c.id, pairs.c.target_options).where(pairs.c.target_kind == "azure-page-blob")
                )
                if (row.target_options or {}).get("azure_site_id") == current.id
            ]
            if protecting:
                raise Conflict(
                    f"Azure site {current.name!r} holds the page blobs of replicated disks (pair "
                    f"{', '.join(protecting[:5])}{', ...' if len(protecting) > 5 else ''})",
                    hint="stop replicating them first (srctl replication disable MACHINE), then remove the site",
                    code="azure-site-in-use",
                )
            conn.execute(sa.delete(azure_sites).where(azure_sites.c.id == current.id))


def _site(conn: Connection, name_or_id: str) -> AzureSiteRecord:
    row = (
        conn.execute(
            sa.select(azure_sites).where(
                sa.or_(azure_sites.c.name == name_or_id, azure_sites.c.id == name_or_id)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(
            f"no Azure site called {name_or_id!r}",
            hint="`srctl azure list` shows them",
            code="azure-site-not-found",
        )
    return _record(row)


def _record(row: Any) -> AzureSiteRecord:
    return AzureSiteRecord(
        id=row["id"],
        name=row["name"],
        settings=row["settings"],
        secret=row["secret"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _exists(name: str) -> Conflict:
    return Conflict(
        f"an Azure site called {name!r} is already registered",
        hint="`srctl azure list` shows it; use `srctl azure update-credentials` to change its secret",
        code="azure-site-exists",
    )
