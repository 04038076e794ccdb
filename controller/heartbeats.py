"""Heartbeats written in groups: one store transaction for all that arrive together.

Every heartbeat is a write, and every write transaction ends in a commit that
waits for the disk (SQLite: an fsync of the WAL; PostgreSQL: a WAL flush). With
2,000 agents that is 200 commits a second; on SQLite, which has one writer at a
time, they queue behind each other's fsync, and a few milliseconds each already
adds up to more than a second per second (bench/control_plane.py measured
heartbeats timing out at 500 agents).

So heartbeats are group-committed: the first thread to arrive writes every
heartbeat queued so far in one transaction (`Store.record_heartbeat_group`) while
the threads that arrive meanwhile wait; when it is done, one of them writes the
next group. No thread of its own, no timer: a lone heartbeat is written at once,
and under load a group is whatever arrived during the previous commit.

Nothing about what a heartbeat means changes: `record` returns only after the
heartbeat is committed. It also returns the store's change counters as the
group's transaction read them after its writes: the answer to the heartbeat is
then at least as new as that commit (controller/assignments.py). A group that fails as a whole (a bad heartbeat, the
store unavailable) is written again one heartbeat per transaction, each by its
own thread, so one agent's bad heartbeat never fails another's and each caller
gets its own error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from siterecovery.controller.store.base import ChangeCounters, Heartbeat, Store

MAX_GROUP = 256


@dataclass
class _Slot:
    beat: Heartbeat
    done: bool = False
    recorded: bool = False
    failed: bool = False
    counters: ChangeCounters = ChangeCounters()


class HeartbeatWriter:
    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        self._turn = threading.Condition()
        self._queue: list[_Slot] = []
        self._writing = False

    def record(self, beat: Heartbeat) -> tuple[bool, ChangeCounters]:
        """Commit `beat` (with whatever else is waiting): whether its server was there to update,
        and the change counters read in the committing transaction."""
        slot = _Slot(beat)
        with self._turn:
            self._queue.append(slot)
            while not slot.done:
                if self._writing:
                    self._turn.wait()
                    continue
                self._writing = True
                group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
                self._turn.release()
                try:
                    self._write(group)
                finally:
                    self._turn.acquire()
                    self._writing = False
                    self._turn.notify_all()
        if slot.failed:
            alone = self._store.record_heartbeat_group([beat])  # raises its own error
            return alone.recorded[0], alone.counters
        return slot.recorded, slot.counters

    def _write(self, group: list[_Slot]) -> None:
        try:
            results = self._store.record_heartbeat_group([slot.beat for slot in group])
        except Exception:
            for slot in group:
                slot.failed = True
        else:
            for slot, recorded in zip(group, results.recorded, strict=True):
                slot.recorded, slot.counters = recorded, results.counters
        finally:
            for slot in group:
                slot.done = True
