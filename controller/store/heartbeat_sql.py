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
(`BEGIN IMMEDIATE` on SQLite; on PostgreSQL a plain `BEGIN`, READ COMMITTED as
psycopg's implicit one was), and commits or rolls back as a whole. A driver error is re-raised as
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

On PostgreSQL a one-row group (the most common) is one statement: the update
as a data-modifying CTE and the counters' read after it (`write_alone`), sent
in autocommit mode, so it is its own transaction: one round trip instead of
four (BEGIN, UPDATE, SELECT, COMMIT), each of which cost psycopg's Python and a
sleep and wake-up of the thread (in-process, 0.67-0.70 against 0.95-1.26 ms of
CPU a group; bench/RESULTS.md). The connection is switched to autocommit when
it leaves the pool and back when it returns, because the rest of the store
relies on psycopg's implicit BEGIN; groups of several rows begin their
transaction explicitly, as SQLite's do. A statement is atomic, so a crash or a
cut connection leaves all of it committed or none of it, as the transaction
did.

Nothing is left open by a crash: the transaction is the database's, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa


class HeartbeatSql:
    """`update` (executed for many rows) and `counters` (name, value rows), compiled for `dialect`;
    on PostgreSQL also `alone`: the update of one row and the counters in one statement, whose
    last row is (None, the number of rows updated)."""

    def __init__(self, dialect: sa.Dialect, update: sa.Update, counters: sa.Select,
                 alone: sa.Select | None = None) -> None:
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
        self._alone_sql: str | None = None
        if alone is not None:
            compiled_alone = alone.compile(dialect=dialect)
            if set(compiled_alone.binds) != set(compiled.binds) or dialect.positional:
                raise ValueError("`alone` must take exactly the update's named parameters")
            self._alone_sql = compiled_alone.string
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        # Both drivers run in autocommit mode here and a transaction is begun explicitly:
        # SQLite's connections always are (sql.py, _sqlite_on_connect) and BEGIN IMMEDIATE
        # is what _sqlite_on_begin begins a write with; psycopg's connection is switched to
        # autocommit while it is ours (_checkout), so that `alone` is sent without a BEGIN.
        self._begin = "BEGIN IMMEDIATE" if dialect.name == "sqlite" else "BEGIN"
        self._switch_autocommit = dialect.name != "sqlite"
        self._parked: Any = None  # a pooled connection kept between groups, or None
        self._parking = threading.Lock()

    @property
    def one_statement(self) -> bool:
        """Whether a one-row group is written with `write_alone`."""
        return self._alone_sql is not None

    @contextmanager
    def transaction(self, engine: sa.Engine) -> Iterator[Any]:
        """A driver cursor in one write transaction, committed when the block ends, rolled
        back when it raises."""
        with self._connection(engine) as connection:
            with self._driver_errors("cursor()"):  # a parked connection may be closed under us
                cursor = connection.cursor()
            try:
                with self._driver_errors(self._begin):
                    cursor.execute(self._begin)
                yield cursor
                with self._driver_errors("COMMIT"):
                    connection.commit()
            finally:
                cursor.close()

    def write_alone(self, engine: sa.Engine, row: tuple | dict[str, Any]) -> tuple[int, dict[str, int]]:
        """One row's update and the counters in one statement, its own transaction (PostgreSQL):
        how many rows of the table it changed, and the counters.

        One round trip instead of four (BEGIN, UPDATE, SELECT, COMMIT): psycopg's Python and
        the thread's sleep and wake-up for each. The counters are read in the statement's
        snapshot, taken when it starts: after the heartbeat arrived, so a change committed
        before it is counted, which is what the answer needs (controller/assignments.py)."""
        assert self._alone_sql is not None
        with self._connection(engine) as connection:
            with self._driver_errors("cursor()"):
                cursor = connection.cursor()
            try:
                with self._driver_errors(self._alone_sql):
                    cursor.execute(self._alone_sql, row)
                    counted = dict(cursor.fetchall())
            finally:
                cursor.close()
        return counted.pop(None), counted

    @contextmanager
    def _connection(self, engine: sa.Engine) -> Iterator[Any]:
        """The parked connection, or one from the pool; parked again when the block ends, rolled
        back and returned to the pool (or discarded, when it cannot even roll back) when it raises."""
        with self._parking:
            connection, self._parked = self._parked, None
        if connection is None:
            connection = self._checkout(engine)
        succeeded = False
        try:
            yield connection
            succeeded = True
        except BaseException:
            try:
                connection.rollback()  # in autocommit mode a no-op unless a transaction was begun
            except self._dbapi_error:
                connection.invalidate()  # not returned to the pool
            raise
        finally:
            if succeeded:
                with self._parking:
                    connection, self._parked = self._parked, connection
            if connection is not None:
                self._checkin(connection)

    def _checkout(self, engine: sa.Engine) -> Any:
        """A connection from the pool (pre-pinged on PostgreSQL), in autocommit mode."""
        connection = engine.raw_connection()
        if self._switch_autocommit:
            try:
                with self._driver_errors("autocommit"):
                    driver = connection.driver_connection
                    driver.rollback()  # the pre-ping's SELECT may have begun one; no round trip when idle
                    driver.autocommit = True
            except BaseException:
                connection.invalidate()
                connection.close()
                raise
        return connection

    def _checkin(self, connection: Any) -> None:
        """Back to the pool as it came out of it: the rest of the store uses psycopg's
        implicit transactions."""
        if self._switch_autocommit and connection.is_valid:
            try:
                connection.driver_connection.autocommit = False
            except self._dbapi_error:
                connection.invalidate()
        connection.close()

    def release(self) -> None:
        """Return the parked connection to the pool (before the engine is disposed)."""
        with self._parking:
            connection, self._parked = self._parked, None
        if connection is not None:
            self._checkin(connection)

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
