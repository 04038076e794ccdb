"""A pair's disk as it was at a recovery point, served as a read-only view: no copy is made.

A `PointView` reads through the target disk and the undo journal. Its index
(extentmap.py) says, for every byte range changed since the point, where the
range's contents *at the point* lie: in an undo record's old data (or "it was
zeros"). Every other byte is read from the target disk, which has not changed
there since the point. For each byte the first pre-image after the point wins:
a later record holds what an earlier frame wrote after the point, not the
point's data.

Opening a view (`open_view`):

1. under the pair's apply lock: the point is looked up, the journal is pinned
   at its seq (journal.pin: pruning keeps every segment holding newer records,
   until the view is closed), the view starts watching the journal
   (journal.watch) and the journal's end is noted (a cut);
2. without the lock: every undo record newer than the point up to the cut is
   read once, sequentially, in journal order (journal.undo_extents_after:
   each record's header and fields, checked; the data stays where it is) and
   indexed (appended to its 1 MiB chunk's unsettled extents: the chunk is
   settled at its first read, extentmap.py). So opening costs about one read of
   the journal written since the point, whatever the disk size. Replication
   goes on meanwhile.

Each record's data is checked against its checksum at the first read that
touches it, not at open (`_check`): hashing every record's data was most of
the CPU an open cost per record, and most of a view is usually never read.
No byte comes from a record before that record was checked; a damaged one
fails the read with EIO (the segment and the offset in the log) and the
view goes on serving everything else. What the index itself is built from
(each record's target range, its length, its kind) is checked at open
(journal.py, "Why an undo record has a second, small checksum"): a byte the
index sends to the target disk is never checked against anything, so a
damaged range must not get that far. Records written before fields sums
existed are checked whole at open, as before. Records the view is told of
after the open (below) were written by this process meanwhile and are
trusted as the target disk is.

While replication goes on, the apply path journals every range's old contents
before it writes the target (target.py). The journal tells the view of each
such record as it is appended (`undo_appended`), so the view adds the record's
not yet covered ranges to its index *before* the target changes there: the
view goes on reading the point's data. A record appended while the index is
still being built waits in `_late` and is indexed after everything before the
cut (it is newer, so it must not win over those). Records of a batch that is
rolled back (`discarded`) leave the index again: the rollback has put the same
contents back onto the target first (target.py `_undo_failed_batch`).

Reads do not hold the view's lock while they read (a reader holding it would
stall the apply path, which takes it for every record): a read looks the range
up under the lock, noting the index's version, reads the target and the
journal without it, then checks under the lock whether the index changed over
its range since (`_changes`, the ranges of recent additions and removals). If
it did, the read is done again; after a few tries, with the lock held
throughout. That is enough because the index grows *before* the target
changes: a target read that could have seen new data overlaps an addition made
after the lookup. A batch rolled back removes its pieces before the journal is
truncated (journal.discard_uncommitted tells the watchers first), so a read of
a piece gone meanwhile is noticed the same way.

Views live in memory only. Closing one (or closing its pair: a pair unassigned
or reopened after an error) unpins the journal and stops the watching; a
master target killed with views open simply has none after the restart, and
nothing on disk to clean up. Reads of a closed view fail with EIO.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from siterecovery.agents.master_target import blockio
from siterecovery.agents.master_target import journal as undo
from siterecovery.agents.master_target.extentmap import ZEROS, ExtentMap
from siterecovery.agents.master_target.journal import UndoExtent, UndoRef
from siterecovery.common import errors
from siterecovery.common.logging import get_logger

if TYPE_CHECKING:
    from siterecovery.agents.master_target.target import PairTarget

log = get_logger(__name__)

LATEST = "latest"
# Index changes remembered for the readers' check; a reader older than these retries.
_CHANGES_KEPT = 4096
# Reads tried without the lock before one is done holding it.
_OPTIMISTIC_TRIES = 3


class PointView:
    """One open view: the NBD backend of a read-only export (common/nbd.py `Backend`)."""

    def __init__(self, view_id: str, target: PairTarget, tag_id: str, seq: int) -> None:
        self.view_id = view_id
        self.pair_id = target.pair_id
        self.tag_id = tag_id
        self.seq = seq
        self.opened_at = time.time()
        self._journal = target.journal
        self._size = target.disk_size
        self._map = ExtentMap()
        self._lock = threading.Lock()
        self._building = True
        self._late: list[UndoRef] = []
        self._late_committed = 0  # how many of _late are committed
        self._pending: list[tuple[int, int]] = []  # index pieces of the uncommitted batch
        # Bumped at every change of the index once built; (version, start, end) of the recent ones.
        self._version = 0
        self._changes: deque[tuple[int, int, int]] = deque(maxlen=_CHANGES_KEPT)
        self._target_fd = os.open(target.target_path, os.O_RDONLY | os.O_CLOEXEC)
        self._segment_fds: dict[int, int] = {}
        # (segment, header offset) of the records whose data was checked (`_check`). Records
        # indexed at open never change while the view is open (pinned, before the cut).
        self._checked: set[tuple[int, int]] = set()
        self.closed = False
        self.indexed_bytes = 0  # journal bytes the build read
        self.indexed_records = 0
        self.open_seconds = 0.0
        # Called once when the view closes (the export goes away).
        self.on_close: Callable[[PointView], None] | None = None

    # -- the journal's watcher (on the apply path, under the pair's lock) ------------------
    def undo_appended(self, ref: UndoRef) -> None:
        with self._lock:
            if self._building:
                self._late.append(ref)
            else:
                pieces = self._index(ref)
                self._pending.extend(pieces)
                self._note_changes(pieces)

    def committed(self) -> None:
        with self._lock:
            self._late_committed = len(self._late)
            self._pending = []

    def discarded(self) -> None:
        with self._lock:
            del self._late[self._late_committed:]
            self._map.remove(self._pending)
            self._note_changes(self._pending)
            self._pending = []

    def _note_changes(self, pieces: list[tuple[int, int]]) -> None:
        for a, b in pieces:
            self._version += 1
            self._changes.append((self._version, a, b))

    def _changed_since(self, version: int, start: int, end: int) -> bool:
        """Whether the index changed over [start, end) after `version` (call with the lock)."""
        if self._version == version:
            return False
        if not self._changes or self._changes[0][0] > version + 1:
            return True  # forgotten: assume it did
        for changed, a, b in reversed(self._changes):
            if changed <= version:
                return False
            if a < end and b > start:
                return True
        return False

    def _index(self, ref: UndoRef) -> list[tuple[int, int]]:
        offset = ZEROS if ref.zeros else ref.data_offset
        return self._map.add_uncovered(ref.target_offset, ref.target_offset + ref.length, ref.segment, offset)

    # -- building -------------------------------------------------------------------------
    def build(self, pieces: Iterable[tuple[int, int, list[UndoExtent]]]) -> None:
        """Index the records before the cut (oldest first), then those appended meanwhile."""
        add = self._map.add_many  # without the lock: nothing else touches the map while building
        for _segment, read, extents in pieces:
            if self.closed:
                raise errors.Unavailable(f"view {self.view_id} was closed while it was opened",
                                         hint="the pair was closed or reopened; open the view again",
                                         code="view-closed")
            add(extents)
            self.indexed_records += len(extents)
            self.indexed_bytes += read
        with self._lock:
            for ref in self._late[: self._late_committed]:
                self._index(ref)
            for ref in self._late[self._late_committed:]:  # a batch being applied now
                self._pending.extend(self._index(ref))
            self._late = []
            self._late_committed = 0
            self._building = False

    # -- the NBD backend ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._read(offset, length)
        except errors.Integrity as exc:
            if self.closed:  # its descriptors were closed under the check (and maybe reused)
                raise OSError(errno.EIO, f"view {self.view_id} is closed") from exc
            log.error("point view read hit a damaged undo record", pair=self.pair_id, view=self.view_id,
                      offset=offset, length=length, error=str(exc))
            raise OSError(errno.EIO, str(exc)) from exc

    def _read(self, offset: int, length: int) -> bytes:
        end = offset + length
        for _ in range(_OPTIMISTIC_TRIES):
            with self._lock:
                plan, unchecked = self._plan(offset, end)
                version = self._version
            try:
                self._check(unchecked)
                data: bytes | None = self._execute(plan, offset, length)
            except OSError:
                data = None  # a rolled-back piece, or closed: the check below tells
            with self._lock:
                if self._changed_since(version, offset, end) or self.closed:
                    continue
            if data is None:  # nothing changed: a real error, which the locked read raises
                break
            return data
        with self._lock:
            plan, unchecked = self._plan(offset, end)
            self._check(unchecked)
            return self._execute(plan, offset, length)

    def _plan(self, start: int, end: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(fd, start, source offset) pieces covering [start, end) in order, and the
        (fd, segment, header offset) of the records among them still to be checked (call
        with the lock)."""
        if self.closed:
            raise OSError(errno.EIO, f"view {self.view_id} is closed")
        plan: list[tuple[int, int, int]] = []
        unchecked: list[tuple[int, int, int]] = []
        pos = start
        for a, b, segment, source, record in self._map.lookup(start, end):
            if a > pos:
                plan.append((self._target_fd, pos, pos))
            fd = -1 if source == ZEROS else self._segment_fd(segment)
            if record >= 0 and (segment, record) not in self._checked:
                unchecked.append((fd, segment, record))
            plan.append((fd, a, source))
            pos = b
        if pos < end:
            plan.append((self._target_fd, pos, pos))
        return plan, unchecked

    def _check(self, unchecked: list[tuple[int, int, int]]) -> None:
        """Check the data of records a read is about to use, each once (journal.check_undo);
        errors.Integrity for a damaged one: nothing of it is served. Without the lock (a
        record's check reads it whole); the set's add is atomic, and two reads checking
        the same record at once only check it twice."""
        for fd, segment, record in unchecked:
            if (segment, record) in self._checked:
                continue
            undo.check_undo(fd, self._journal.segment_path(segment), record)
            self._checked.add((segment, record))

    def _execute(self, plan: list[tuple[int, int, int]], offset: int, length: int) -> bytes:
        out = bytearray(length)
        view = memoryview(out)
        bounds = [start - offset for _fd, start, _src in plan[1:]] + [length]
        for (fd, start, source), stop in zip(plan, bounds, strict=True):
            if fd >= 0:
                blockio.pread_into(fd, view[start - offset : stop], source)
        return bytes(out)

    def _segment_fd(self, number: int) -> int:
        fd = self._segment_fds.get(number)
        if fd is None:
            fd = self._segment_fds[number] = os.open(self._journal.segment_path(number), os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        raise OSError(errno.EPERM, "a point view is read-only")

    def write_zeroes(self, offset: int, length: int, *, fua: bool, punch: bool) -> None:
        raise OSError(errno.EPERM, "a point view is read-only")

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        raise OSError(errno.EPERM, "a point view is read-only")

    def flush(self) -> None:
        pass

    # -- closing --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving and release the journal (call with the pair's lock held, or after the
        pair's journal is closed)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._journal.unwatch(self)
            self._journal.unpin(self)
            for fd in [self._target_fd, *self._segment_fds.values()]:
                os.close(fd)
            self._segment_fds.clear()
        log.info("point view closed", pair=self.pair_id, view=self.view_id, tag=self.tag_id or LATEST)
        if self.on_close is not None:
            self.on_close(self)

    @property
    def extents(self) -> int:
        return self._map.extents

    @property
    def covered_bytes(self) -> int:
        return self._map.covered_bytes

    @property
    def index_settled(self) -> bool:
        return self._map.settled


def open_view(target: PairTarget, point: str, view_id: str) -> PointView:
    """Open a view of `target` at `point` (a tag id, or "latest"/"" for the disk as it is now)."""
    started = time.monotonic()
    journal = target.journal
    with target.lock:
        if not target.opened:
            raise errors.Unavailable(f"pair {target.pair_id} is not open", hint="try again after the next heartbeat",
                                     code="pair-closed")
        if point in ("", LATEST):
            if not target.state.get("ever_synced") or not target.synced:
                raise errors.PreconditionFailed(
                    f"the target disk of pair {target.pair_id} is not usable until its initial sync is done",
                    hint="wait until the pair is replicating", code="not-synced",
                )
            points = target.state["points"]
            newest = points[-1] if points and points[-1]["seq"] == target.applied_seq else None
            tag_id, seq = (newest["tag_id"] if newest else ""), target.applied_seq
        else:
            wanted = target.find_point(point)
            if wanted is None:
                raise target.unknown_point(point)
            tag_id, seq = wanted["tag_id"], wanted["seq"]
        view = PointView(view_id, target, tag_id, seq)
        try:
            journal.pin(view, seq)
        except BaseException:
            view.close()
            raise
        journal.watch(view)
        cut = journal.cut()
        segments = list(journal.segments)
        current = seq == target.applied_seq  # nothing newer to index (say, "latest")
        target.views[view_id] = view
    try:
        view.build([] if current else journal.undo_extents_after(seq, cut, segments))
    except BaseException:
        close_view(target, view)
        raise
    view.open_seconds = time.monotonic() - started
    log.info("point view opened", pair=target.pair_id, view=view_id, tag=tag_id or LATEST, seq=seq,
             records=view.indexed_records, journal_bytes=view.indexed_bytes, seconds=round(view.open_seconds, 3))
    return view


def close_view(target: PairTarget, view: PointView) -> None:
    with target.lock:
        target.views.pop(view.view_id, None)
        view.close()
