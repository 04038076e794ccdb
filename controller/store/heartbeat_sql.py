"""The heartbeat group's two statements, run on the database driver's own cursor.

`SqlStore.record_heartbeat_group` writes every heartbeat of a group with one
`UPDATE ... WHERE id = ? AND role = ?` executed for all its rows, then reads the
change counters. With 2,000 agents that is a transaction every few
milliseconds, and each group is small (on SQLite it is whatever arrived during
the previous commit's fsync: one to three heartbeats). SQLAlchemy Core's
per-statement work (the compiled-cache lookup, building the execution context,
processing each parameter, wrapping the cursor in a result) cost about 0.3 ms
of CPU for the two statements, against 0.035 ms on the driver's cursor
(bench/RESULTS.md, Control plane): the largest part of the group's Python.

So the statements are compiled by SQLAlchemy once, for the store's dialect, and
each row's values are converted once by the columns' own bind processors (the
same conversion SQLAlchemy applies: `UtcDateTime`'s UTC text on SQLite, JSON
serialised as the dialect does). Only executing them bypasses SQLAlchemy: the
transaction, the connection pool (with its pre-ping on PostgreSQL) and SQLite's
write turn are still the store's `_write`. A driver error is re-raised as the
`sqlalchemy.exc.DBAPIError` subclass SQLAlchemy would have raised, so the store
translates it as before (an `OperationalError` becomes `Unavailable`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa


class HeartbeatSql:
    """`update` (executed for many rows) and `counters` (name, value rows), compiled for `dialect`."""

    def __init__(self, dialect: sa.Dialect, update: sa.Update, counters: sa.Select) -> None:
        compiled = update.compile(dialect=dialect)
        self._update_sql = compiled.string
        # SQLite's driver takes `?` and tuples in this order; psycopg `%(name)s` and dicts.
        self._order: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if dialect.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._processors[name] = process
        self._counters_sql = counters.compile(dialect=dialect).string
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error

    def row(self, **values: Any) -> tuple | dict[str, Any]:
        """One row's parameters, converted as SQLAlchemy converts them, in the driver's form."""
        for name, process in self._processors.items():
            values[name] = process(values[name])
        return values if self._order is None else tuple(values[name] for name in self._order)

    def update(self, cursor: Any, rows: Sequence[tuple | dict[str, Any]]) -> int:
        """Execute the update for every row; how many rows of the table it changed."""
        self._run(cursor.executemany, self._update_sql, rows)
        return cursor.rowcount

    def counters(self, cursor: Any) -> dict[str, int]:
        self._run(cursor.execute, self._counters_sql)
        return dict(cursor.fetchall())

    def _run(self, method: Callable[..., Any], sql: str, *params: Any) -> None:
        try:
            method(sql, *params)
        except self._dbapi_error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self._dbapi_error) from exc
