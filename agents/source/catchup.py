"""A tracking pair's catch-up: the blocks marked while its journal was full go back into the journal.

While a pair tracks (capture.py, "Journal limit"), its writes reach the disk
file and the changed-block map (dirtymap.py), not the journal. Its catch-up
thread waits until blocks are marked and the journal has room again: its
unacknowledged bytes under `window_bytes` and the state volume above its
reserve. Then, one run of marked blocks at a time (at most CHUNK_BYTES),
inside `DiskCapture.quiesced()` (so the read falls exactly between two writes,
as an initial-sync chunk does): it reads the run, journals it as a write (a
zeroed range when it reads as zeros) and unmarks it. These are journaled
frames like any write: they survive a kill -9 with the journal and need no
cursor of their own. The pass goes up from the lowest marked block, and from
the start again while blocks are marked (writes keep marking blocks behind
it). When the last bit is cleared, in the same `quiesced()`, writes are
journaled again.

Markers. While a pair tracks, its target holds the disk as it was when
tracking began: older, but consistent (nothing after that was sent). The
catch-up's frames make it inconsistent until the last one: they carry blocks
as they are now, in disk order. So, unless a sync under way brackets them
already (its INITIAL_DONE waits until nothing is marked: sync.py, delta.py),
the catch-up journals INITIAL_STARTED before its first frame and INITIAL_DONE
after its last: the target takes no tag in between as a point (target.py),
and the source takes none while blocks are marked or the DONE is owed
(`PairState.catchup_marked`, saved before the STARTED is journaled, so a
restart never leaves a STARTED without its DONE; a DONE sent twice is
harmless).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from siterecovery.common import frames
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .capture import DiskCapture, PairJournal
from .pairstate import PairState

log = get_logger(__name__)

CHUNK_BYTES = 1024 * 1024
# The catch-up keeps at most this much (or half the journal's limit) unacknowledged in the journal.
CATCHUP_WINDOW = 64 * 1024 * 1024
RETRY_SECONDS = 1.0
_ZEROS = bytes(CHUNK_BYTES)


class CatchUp:
    """The catch-up of one nbd-mode pair. See the module docstring."""

    def __init__(
        self,
        disk: DiskCapture,
        journal: PairJournal,
        state: PairState,
        *,
        save: Callable[[], None],
        sync_brackets: Callable[[], bool],
        stop: threading.Event,
    ) -> None:
        self.disk = disk
        self.journal = journal
        self.state = state
        self._save = save
        # Whether a sync under way will still send INITIAL_DONE (then its markers bracket the catch-up's frames).
        self._sync_brackets = sync_brackets
        self._stop = stop
        limit = journal.limit_bytes
        self.window_bytes = min(CATCHUP_WINDOW, limit // 2) if limit else CATCHUP_WINDOW
        self._pos = 0
        self.sent_bytes = 0  # data bytes journaled by catch-ups since the agent started (logged)
        self.error = ""

    @property
    def pending(self) -> bool:
        """Whether blocks are marked, or a catch-up's INITIAL_DONE is still owed."""
        return self.journal.tracking or self.state.catchup_marked

    def run(self) -> None:
        """The pair's catch-up thread: until `stop`."""
        while not self._stop.is_set():
            self.journal.room.clear()
            try:
                busy = self.step()
                self.error = ""
            except Exception as exc:  # a full volume, an I/O error, or a bug: the marks stay; try again
                self.error = getattr(exc, "message", None) or str(exc)
                log.exception("catching up the changed blocks failed; retrying", pair=self.journal.pair_id,
                              error=self.error)
                self._stop.wait(RETRY_SECONDS)
                continue
            if not busy:
                self.journal.room.wait(RETRY_SECONDS)

    def _room(self) -> bool:
        journal, log_ = self.journal, self.journal.log
        acked = max(journal.acknowledged_seq, log_.released_seq)
        if log_.pending_bytes_after(acked) >= self.window_bytes:
            return False
        # A journal whose every record is released still has its last segment on disk; the next
        # append deletes it first (framelog.py). Counting it is what lets a catch-up start on a
        # volume the journal itself filled: nothing else would ever free that space.
        reclaimable = log_.disk_bytes if not log_.pending_frames else 0
        return not journal.volume_short(CHUNK_BYTES - reclaimable)

    def step(self) -> bool:
        """Journal the next run of marked blocks (and finish after the last): False when there is
        nothing to do now (nothing marked, or no room yet)."""
        journal, dirty = self.journal, self.journal.dirty
        if dirty is None or not self.pending:
            return False
        if dirty.count and not self._room():
            return False
        with self.disk.quiesced():
            if not dirty.count:
                self._finish_locked()
                return False
            records: list[tuple[int, bytes]] = []
            marking = not self.state.catchup_marked and not self._sync_brackets()
            if marking:
                self.state.catchup_marked = True
                self._save()
                started = frames.sync_frame(
                    journal.pair_id, journal.lease.take(), rpb.SYNC_PHASE_INITIAL_STARTED, self.disk.size
                )
                records.append((started.seq, started.SerializeToString()))
                log.info("catching up the changed blocks", pair=journal.pair_id, disk=self.disk.name,
                         marked_bytes=dirty.dirty_bytes)
            run = dirty.next_run(self._pos, CHUNK_BYTES) or dirty.next_run(0, CHUNK_BYTES)
            assert run is not None  # dirty.count says a block is marked
            offset, length = run
            data = self.disk.read_locked(offset, length)
            seq = journal.lease.take()
            if data == _ZEROS[:length]:
                body = frames.zero_frame(journal.pair_id, seq, offset, length).SerializeToString()
            else:
                body = frames.serialized_write(journal.pair_id, seq, offset, data)
                self.sent_bytes += length
            records.append((seq, body))
            try:
                journal.append_read_back(records)
            except BaseException:
                if marking:  # the STARTED went nowhere: the next try journals it again
                    self.state.catchup_marked = False
                raise
            dirty.clear(offset, length)
            self._pos = offset + length
            if not dirty.count:
                log.info("changed blocks caught up; journaling writes again", pair=journal.pair_id,
                         disk=self.disk.name, sent_bytes=self.sent_bytes)
                self._finish_locked()
        return True

    def _finish_locked(self) -> None:
        """Nothing is marked any more (inside `quiesced()`): journal the owed INITIAL_DONE."""
        if not self.state.catchup_marked:
            return
        if not self._sync_brackets():
            journal = self.journal
            done = frames.sync_frame(journal.pair_id, journal.lease.take(), rpb.SYNC_PHASE_INITIAL_DONE, self.disk.size)
            journal.append_read_back([(done.seq, done.SerializeToString())])
        self.state.catchup_marked = False
        self._save()
        self._pos = 0
