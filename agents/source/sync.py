"""The initial sync of an nbd-mode pair: the whole disk, as volatile frames, resumable.

`start()` journals the SyncMarker INITIAL_STARTED (so it is the first thing
the target hears, ahead of any write captured since) and sets the persisted
cursor to 0. `produce()` then makes, for the next 1 MiB chunk at the cursor,
inside `DiskCapture.quiesced()` (so every NBD write is ordered before or after
the chunk), a frame:

- a ZeroRange for a hole (found with SEEK_DATA; one frame covers up to
  `MAX_ZERO_FRAME` of holes, so a sparse image costs almost nothing to send);
- a ZeroRange for a chunk that reads as all zeros;
- else a DataBlock with the chunk.

After the last chunk comes the SyncMarker INITIAL_DONE. Chunks are volatile:
each frame's acknowledgement moves the cursor (`PairState.sync_cursor`) to its
end (and adds its data to `sync_sent_bytes`); the replicator's saver thread
persists it, many acknowledgements at a time, and the shipper keeps the frame
in its window until then. After a reconnect the sync continues from the
cursor in memory, after a restart from the saved one, so what is sent again is
at most the window plus one chunk. The acknowledgement of INITIAL_DONE
sets the phase to done.

A delta pair's first sync (delta.py) is a subclass: the same start, markers,
cursor and resume, but it sends only the blocks that differ from the target's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from siterecovery.common import frames, pagecache
from siterecovery.common.blockhash import next_data
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .capture import DiskCapture, PairJournal
from .pairstate import SYNC_COPYING, SYNC_DONE, PairState
from .shipper import Produced

log = get_logger(__name__)

CHUNK_BYTES = 1024 * 1024
MAX_ZERO_FRAME = 1024 * 1024 * 1024
_ZEROS = bytes(CHUNK_BYTES)

__all__ = ["CHUNK_BYTES", "MAX_ZERO_FRAME", "InitialSync", "next_data"]


class InitialSync:
    """A `VolatileSource` (shipper.py) for one pair's initial sync. See the module docstring."""

    def __init__(
        self,
        disk: DiskCapture,
        journal: PairJournal,
        state: PairState,
        *,
        save: Callable[[], None],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.disk = disk
        self.journal = journal
        self.state = state
        self._save = save
        self.chunk = chunk_bytes
        self._lock = threading.Lock()
        self._pos = state.sync_cursor
        self._done_sent = False
        # What the sync has read leaves the page cache behind it (pagecache.py says why).
        self._behind = pagecache.DropBehind(disk.fd, self._pos)
        # Set when an acknowledgement moved the state: the replicator saves it.
        self.state_dirty = False

    @property
    def done(self) -> bool:
        return self.state.sync_phase == SYNC_DONE

    @property
    def done_bytes(self) -> int:
        return self.disk.size if self.done else self.state.sync_cursor

    def start(self, cause: str = "") -> None:
        """Begin (or begin again) from byte 0: journal INITIAL_STARTED. `cause`: why, for the status."""
        with self.disk.quiesced():
            seq = self.journal.lease.take()
            self.journal.append(
                [frames.sync_frame(self.journal.pair_id, seq, rpb.SYNC_PHASE_INITIAL_STARTED, self.disk.size)]
            )
            with self._lock:
                self.state.sync_phase = SYNC_COPYING
                self.state.sync_cursor = 0
                self.state.sync_sent_bytes = self.state.sync_differing_bytes = self.state.sync_hash_bytes = 0
                self.state.sync_started_seq = seq
                self.state.sync_cause = cause
                self._pos = 0
                self._done_sent = False
                self._restarted_locked()
                self._behind.restart(self._pos)
            self._save()
        log.info("initial sync started", pair=self.journal.pair_id, disk=self.disk.name, bytes=self.disk.size,
                 kind=self.state.sync_kind)

    def _restarted_locked(self) -> None:
        """The sync starts over from byte 0 (with the lock held): forget what was made."""

    @property
    def brackets(self) -> bool:
        """Whether this sync will still send INITIAL_DONE. Ask inside `DiskCapture.quiesced()`, where
        `_done_sent` is set; no lock (DeltaSync holds its lock while it waits for quiesced())."""
        return not self.done and not self._done_sent

    def fill_status(self, status: rpb.PairStatus) -> None:
        """The sync's share of the pair's status."""
        status.sync_done_bytes = self.done_bytes
        status.sync_total_bytes = self.disk.size
        status.sync_sent_bytes = self.state.sync_sent_bytes

    def rewind(self) -> None:
        with self._lock:
            self._pos = self.state.sync_cursor
            self._done_sent = False
            self._behind.restart(self._pos)

    def produce(self) -> Produced | None:
        with self._lock:
            if self.done or self._done_sent:
                return None
            pos = self._pos
        size = self.disk.size
        pair = self.journal.pair_id
        if pos >= size:
            return self._done_frame()
        body = None  # a write chunk's frame comes serialized already
        with self.disk.quiesced():
            data_at = next_data(self.disk.fd, pos, size)
            if data_at - pos >= self.chunk:
                end = min(pos + MAX_ZERO_FRAME, data_at - (data_at % self.chunk) if data_at < size else size)
                frame = frames.zero_frame(pair, self.journal.lease.take(), pos, end - pos)
            else:
                end = min(pos + self.chunk, size)
                data = self.disk.read_locked(pos, end - pos)
                seq = self.journal.lease.take()
                if data == _ZEROS[: len(data)]:
                    frame = frames.zero_frame(pair, seq, pos, end - pos)
                else:
                    frame, body = frames.serialized_write_frame(pair, seq, pos, data)
        with self._lock:
            self._pos = end
        self._behind.passed(pos)
        sent = frame.write.length if frame.WhichOneof("body") == "write" else 0
        return Produced(frame, lambda: self._acked_to(end, sent), body)

    def _done_frame(self) -> Produced | None:
        """INITIAL_DONE, or None while blocks are marked (it comes after their catch-up). No lock
        taken: DeltaSync calls it holding its lock."""
        with self.disk.quiesced():
            if self.journal.tracking:
                return None
            frame = frames.sync_frame(
                self.journal.pair_id, self.journal.lease.take(), rpb.SYNC_PHASE_INITIAL_DONE, self.disk.size
            )
            self._done_sent = True  # inside quiesced(): the catch-up sees it (`brackets`)
        self._behind.finish()
        return Produced(frame, self._acked_done)

    def _acked_to(self, end: int, sent: int) -> None:
        with self._lock:
            if end > self.state.sync_cursor and not self.done:
                self.state.sync_cursor = end
                self.state.sync_sent_bytes += sent
                self.state_dirty = True

    def _acked_done(self) -> None:
        with self._lock:
            self.state.sync_phase = SYNC_DONE
            self.state.sync_cursor = self.disk.size
            self.state_dirty = True
        log.info("initial sync done", pair=self.journal.pair_id, disk=self.disk.name)
