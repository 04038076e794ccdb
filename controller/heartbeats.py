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
from dataclasses import dataclass, field

from siterecovery.controller.store.base import ChangeCounters, Heartbeat, Store

MAX_GROUP = 256


@dataclass
class _Slot:
    beat: Heartbeat
    done: bool = False
    recorded: bool = False
    failed: bool = False
    counters: ChangeCounters = ChangeCounters()
    # Held while the slot's thread waits; released to wake exactly that thread, either
    # because its heartbeat is written or because it is to write the next group.
    wake: threading.Lock = field(default_factory=threading.Lock)


class HeartbeatWriter:
    """Who writes: whichever thread finds no group being written; afterwards the oldest
    waiting heartbeat's thread, handed the turn directly. Each waiting thread sleeps on a
    lock of its own and is woken only when there is something for it (a Condition's
    notify_all woke every waiter at every commit: a tenth of the server's Python at 200
    heartbeats a second, bench/RESULTS.md)."""

    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        self._mutex = threading.Lock()  # guards _queue and _writing
        self._queue: list[_Slot] = []
        self._writing = False

    def record(self, beat: Heartbeat) -> tuple[bool, ChangeCounters]:
        """Commit `beat` (with whatever else is waiting): whether its server was there to update,
        and the change counters read in the committing transaction."""
        slot = _Slot(beat)
        slot.wake.acquire()
        with self._mutex:
            self._queue.append(slot)
            writer = not self._writing
            self._writing = True
        if not writer:
            slot.wake.acquire()  # released by the writer of our group, or to make us the writer
        if not slot.done:
            self._write_groups()
        if slot.failed:
            alone = self._store.record_heartbeat_group([beat])  # raises its own error
            return alone.recorded[0], alone.counters
        return slot.recorded, slot.counters

    def _write_groups(self) -> None:
        """Write the oldest group (this thread's heartbeat is its first), wake its threads and
        hand the turn to the oldest heartbeat still waiting, if any."""
        with self._mutex:
            group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
        try:
            self._write(group)
        finally:
            with self._mutex:
                following = self._queue[0] if self._queue else None
                self._writing = following is not None
            for slot in group[1:]:
                slot.wake.release()
            if following is not None:
                following.wake.release()

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
