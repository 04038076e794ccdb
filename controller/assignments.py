"""What heartbeat answers tell agents (their pairs, their tag requests), from an in-process copy.

Every heartbeat response carries the agent's complete list of pairs and the tag
requests its sources are to insert (replication.py, "Orders are desired state"
in docs/architecture.md). Reading them from the store for every heartbeat was
one read transaction per heartbeat, about 40 % of the configuration server's
CPU with 2,000 agents (bench/RESULTS.md, "Control plane"), for an answer that
changes a few times a day per pair.

So this keeps a copy of every pair (as the `PairAssignment` each agent is sent)
and every tag request, and the store counts changes instead (`ChangeCounters`:
every store write that changes pairs, the data endpoint of a server a pair
names, or tag requests adds one to its counter in the same transaction). Each
heartbeat's own write transaction reads the counters after its write
(`Store.record_heartbeat_group`, one more small statement per group of
heartbeats), and the answer comes from the copy when the copy is at least that
new; otherwise the copy is read again first, in one snapshot, once for all the
heartbeats that need it. Expiry is checked per answer, at its own time.

Staleness: a change committed before the heartbeat's transaction reads the
counters is in that heartbeat's answer, whichever configuration server on a
shared PostgreSQL store made it (the counters are in the store). The answer
used to be read a few milliseconds later, after the commit; a change committed
in between now reaches the agent with its next heartbeat instead, well within
the one heartbeat interval orders are promised in. As a safety net for writers
that do not count (a server of an older version on the same store during an
upgrade), the copy is also read again when it is older than `max_age_seconds`
(60 s).

Costs: reading the copy again is one query of every pair (rare: pairs change
when they are created, paused, resumed, re-synced or removed) or one query of
the unexpired tag requests (a few rows; they change with recovery points).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Generic, TypeVar

from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.store.base import BARRIER_ABORTED, ChangeCounters, Store

MAX_AGE_SECONDS = 60.0

T = TypeVar("T")


class _Copy(Generic[T]):
    """One kind of answer (pairs, or tag requests) per server id, as of one change counter value."""

    def __init__(self, read: Callable[[], tuple[int, Mapping[str, tuple[T, ...]]]], *, max_age: float,
                 clock: Callable[[], float]) -> None:
        self._read = read
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        # (counter, read at, entries), replaced whole: a reader without the lock never sees
        # one read's counter with another's entries.
        self._state: tuple[int, float, Mapping[str, tuple[T, ...]]] = (-1, float("-inf"), {})

    def entries(self, counter: int) -> Mapping[str, tuple[T, ...]]:
        """Every server's entries, read again first unless the copy counts at least `counter`."""
        entries = self._fresh(counter)
        if entries is not None:
            return entries
        with self._lock:  # one read; the heartbeats that need it too wait for it
            entries = self._fresh(counter)
            if entries is None:
                read_at = self._clock()
                counted, entries = self._read()
                self._state = (counted, read_at, entries)
            return entries

    def _fresh(self, counter: int) -> Mapping[str, tuple[T, ...]] | None:
        counted, read_at, entries = self._state
        if counted >= counter and self._clock() - read_at < self._max_age:
            return entries
        return None


class Assignments:
    """The heartbeat answers' pairs and tag requests, read from `store` only when they changed."""

    def __init__(self, store: Store, *, max_age_seconds: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._pairs: _Copy[rpb.PairAssignment] = _Copy(self._read_pairs, max_age=max_age_seconds, clock=clock)
        self._tags: _Copy[tuple[datetime, rpb.TagRequest]] = _Copy(
            self._read_tags, max_age=max_age_seconds, clock=clock
        )

    def orders_for(
        self, server_id: str, counters: ChangeCounters, *, now: datetime
    ) -> tuple[list[rpb.PairAssignment], list[rpb.TagRequest]]:
        """What a heartbeat response tells `server_id`: the same as `replication.orders_for`,
        from the copy, which is read again first when `counters` (read in the transaction
        that committed this heartbeat) count changes it has not seen."""
        assignments = list(self._pairs.entries(counters.pairs).get(server_id, ()))
        if not assignments:
            return [], []  # an agent in no pair is the source of none: no tag requests
        requests = self._tags.entries(counters.tag_requests).get(server_id, ())
        return assignments, [request for expires_at, request in requests if expires_at > now]

    def _read_pairs(self) -> tuple[int, dict[str, tuple[rpb.PairAssignment, ...]]]:
        snapshot = self._store.pairs_snapshot()
        entries: dict[str, list[rpb.PairAssignment]] = {}
        for pair in snapshot.pairs:
            message = replication.assignment(snapshot.endpoints, pair)
            # The same message for each of its agents; dict.fromkeys: a server in two roles gets it once.
            for server_id in dict.fromkeys((pair.source_server_id, pair.process_server_id, pair.master_target_id)):
                entries.setdefault(server_id, []).append(message)
        return snapshot.counters.pairs, {k: tuple(v) for k, v in entries.items()}

    def _read_tags(self) -> tuple[int, dict[str, tuple[tuple[datetime, rpb.TagRequest], ...]]]:
        snapshot = self._store.tag_requests_snapshot()  # expired ones too: each answer checks its own time
        entries: dict[str, list[tuple[datetime, rpb.TagRequest]]] = {}
        for source_id, record in snapshot.requests:
            if record.outcome != BARRIER_ABORTED:
                entries.setdefault(source_id, []).append((record.expires_at, replication.tag_request(record)))
        return snapshot.counters.tag_requests, {k: tuple(v) for k, v in entries.items()}
