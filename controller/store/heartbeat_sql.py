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
serialised as the dialect does), and they run in a transaction on a pooled
connection's driver cursor (`transaction`). Once the statements were cheap, the
`Connection` and `Transaction` objects, their events and the pool's check-in
around them were most of what was left (a py-spy profile of the benchmark's
server: a fifth of its Python). The connection still comes from the engine's
pool (so PostgreSQL's pre-ping still runs at checkout) and the caller still
holds SQLite's write turn; the transaction is begun as `_write` begins one
(`BEGIN IMMEDIATE` on SQLite, the driver's implicit READ COMMITTED one on
PostgreSQL), and commits or rolls back as a whole. A driver error is re-raised as
the `sqlalchemy.exc.DBAPIError` subclass SQLAlchemy would have raised, so the
store translates it as before (an `OperationalError` becomes `Unavailable`); the
connection it happened on is discarded when it cannot even roll back.

One connection is kept out of the pool between groups (`_parked`): the pool's
check-out (with PostgreSQL's pre-ping, a round trip) and its check-in (a reset
rollback, events) were paid once per group, and a group is most often a single
heartbeat. Only a connection whose transaction committed is parked; one that
failed goes back to the pool or is discarded as before. The parked connection is
not pinged, so after a PostgreSQL restart (or a connection cut) the next group on
it fails: `HeartbeatWriter` then writes that group's heartbeats again one by one,
each on a connection from the pool, pre-pinged, and no agent sees the failure.
Nothing is left open by a crash: the transaction is the database's, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
        # SQLite's connections are in autocommit mode (sql.py, _sqlite_on_connect), so the
        # transaction is begun as _sqlite_on_begin begins a write; psycopg begins one itself.
        self._begin = "BEGIN IMMEDIATE" if dialect.name == "sqlite" else None
        self._parked: Any = None  # a pooled connection kept between groups, or None
        self._parking = threading.Lock()

    @contextmanager
    def transaction(self, engine: sa.Engine) -> Iterator[Any]:
        """A driver cursor in one write transaction, committed when the block ends, rolled
        back when it raises."""
        with self._parking:
            connection, self._parked = self._parked, None
        if connection is None:
            connection = engine.raw_connection()
        committed = False
        try:
            with self._driver_errors("cursor()"):  # a parked connection may be closed under us
                cursor = connection.cursor()
            try:
                if self._begin is not None:
                    with self._driver_errors(self._begin):
                        cursor.execute(self._begin)
                yield cursor
                with self._driver_errors("COMMIT"):
                    connection.commit()
                committed = True
            except BaseException:
                try:
                    connection.rollback()
                except self._dbapi_error:
                    connection.invalidate()  # not returned to the pool
                raise
            finally:
                cursor.close()
        finally:
            if committed:
                with self._parking:
                    connection, self._parked = self._parked, connection
            if connection is not None:
                connection.close()  # back to the pool

    def release(self) -> None:
        """Return the parked connection to the pool (before the engine is disposed)."""
        with self._parking:
            connection, self._parked = self._parked, None
        if connection is not None:
            connection.close()

    def row(self, **values: Any) -> tuple | dict[str, Any]:
        """One row's parameters, converted as SQLAlchemy converts them, in the driver's form."""
        for name, process in self._processors.items():
            values[name] = process(values[name])
        return values if self._order is None else tuple(values[name] for name in self._order)

    def update(self, cursor: Any, rows: Sequence[tuple | dict[str, Any]]) -> int:
        """Execute the update for every row; how many rows of the table it changed."""
        with self._driver_errors(self._update_sql):
            if len(rows) == 1:  # psycopg's executemany sets up a pipeline: 0.05-0.08 ms more for one row
                cursor.execute(self._update_sql, rows[0])
            else:
                cursor.executemany(self._update_sql, rows)
        return cursor.rowcount

    def counters(self, cursor: Any) -> dict[str, int]:
        with self._driver_errors(self._counters_sql):
            cursor.execute(self._counters_sql)
            return dict(cursor.fetchall())

    @contextmanager
    def _driver_errors(self, sql: str) -> Iterator[None]:
        """The driver's errors as the `sqlalchemy.exc.DBAPIError` subclass SQLAlchemy raises."""
        try:
            yield
        except self._dbapi_error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self._dbapi_error) from exc
