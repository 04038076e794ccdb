"""The delta sync: a pair's first sync onto a target disk that already holds an older copy.

Failback to the original on-premises disk, or reprotect onto an existing
replica: most of the disk is already there. Both sides hash fixed 64 KiB
blocks with xxh3-128 (common/blockhash.py) and only the blocks that differ
travel. `DeltaSync` is the `InitialSync` of such a pair (same `start()`:
INITIAL_STARTED journaled first; same persisted cursor; same INITIAL_DONE);
only `produce()` differs:

1. *fetch*: the target's digests for the next `batch_blocks` blocks, from the
   process server's `BlockHashes` (which asks the pair's master target). Each
   fetch runs on a (daemon) thread of its own, up to `PREFETCH` batches ahead of the reading,
   so the master target reads and hashes while the source does; `produce()`
   never waits for the network (it returns None and the finished fetch wakes
   the shipper), so journaled writes keep flowing meanwhile;
2. *compare*: for each group of up to `GROUP_BYTES` inside a fetched batch,
   inside `DiskCapture.quiesced()`: read the group (a hole found with SEEK_DATA
   is not read), hash its blocks, and for every block whose digest differs from
   the target's (or that the target reports absent) take a seq and make a frame:
   a DataBlock with the block, or a ZeroRange when the local block is all zeros
   (so a block zeroed here and not there moves no data). Adjacent differing
   blocks of one kind share a frame of at most 1 MiB;
3. *progress*: after each group, a mark (the seq of the last frame made so far,
   the group's end, the counters). A mark is reached once that seq is
   acknowledged (at once when nothing made is unacknowledged); reaching it moves
   `PairState.sync_cursor` to the group's end, with `sync_differing_bytes`,
   `sync_sent_bytes` and `sync_hash_bytes`. So a long run of identical blocks
   moves the cursor too (saved every `SAVE_EVERY_BYTES` even when no frame is
   acknowledged), and a restart does not compare it again.

**Why the target ends equal to the source** (for each byte x of a block B that
the sync compares; hash collisions of xxh3-128 aside). Facts the argument uses:
(a) in nbd mode every change of the source disk since the sync's
INITIAL_STARTED marker is a journaled frame in the pair's stream, in seq order
(capture.py); (b) every frame carries, for the bytes it covers, the source's
contents at its seq: a write by definition, a sync frame because it is read
inside `quiesced()` where its seq is taken, so it is ordered exactly between
the writes; (c) the master target applies frames in seq order and is the only
writer of the target file; a frame the stream loses (a rebuilt process server)
takes every frame before it along, and then the shipper's `on_lost` starts the
sync over; (d) the target's digests are read only once it has applied every
frame through that marker (BlockHashes' `applied_through_seq`, which is
`PairState.sync_started_seq`; a target behind it answers `target-catching-up`), so
every frame from before the sync began is applied before t, even one the
source no longer has (a journal that lost frames in a power loss while the
process server still held them). Let s be the seq taken when B is read
(contents L) and t the moment the master target read B for the digest; t is
before the read (the reply arrived first), so every frame in the stream at t
has a seq below s. Whatever mixture of before and after a batch the target held
at t, each of its bytes held the value of some prefix of the stream.

- B differs: a frame with L goes out at seq s; every later frame covering x is
  a later source write (a), applied after it (c): the target ends as the source.
- B is equal at t, and some frame below s covering x is applied after t: it
  is above the marker (d); the last such frame is the last frame below s
  covering x at all (c), and by (a) and (b) no source write between it and s
  changed x, so it carries L[x].
- B is equal at t, and no frame below s covering x is applied after t: x stays
  as it was at t, which is L[x].

After s both sides see the same writes in the same order (a, c). The master
target's crash recovery (rolling back an unfinished batch, or resending a torn
one of a first sync) only moves a byte back to an earlier prefix and then
applies the same frames again, which the cases above already cover. The target
does not change during the sync in any other way: the master target is its only
writer, and only applies this pair's frames to it.

**Crashes.** Frames are volatile (shipper.py): a reconnect rewinds to the
acknowledged cursor and compares again from there with fresh digests, so a
block whose frame the master target has by then applied is found equal and
not sent twice. A kill -9 of the source agent loses the frames made and not
acknowledged; the restarted sync fetches digests from the persisted cursor and
sends again at most the unacknowledged window plus one group (and less when
the process server held some of it and forwarded it meanwhile). The cursor
passes a block only when every frame made before it is acknowledged (marks),
and the journal keeps every write until acknowledged, so nothing below the
cursor is ever missing at the process server. A fetch that fails (process
server or master target unreachable, the target cannot be opened, the target
has not applied the stream through the marker yet) is retried
with capped backoff and reported in the pair's status; nothing is sent for
blocks whose digests are unknown.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from siterecovery.common import blockhash, errors, frames
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .capture import DiskCapture, PairJournal
from .pairstate import PairState
from .scan import frame_runs
from .shipper import Produced
from .sync import InitialSync, next_data

log = get_logger(__name__)

B = blockhash.BLOCK_BYTES
D = blockhash.DIGEST_BYTES
DEFAULT_BATCH_BLOCKS = 4096  # 256 MiB of disk, 64 KiB of digests per BlockHashes call
# Read and compared inside one quiesced(): NBD writes wait for at most this much reading,
# as long as for one chunk of the full sync.
GROUP_BYTES = 1024 * 1024
# Groups one produce() call compares at most (the shipper's thread sends nothing meanwhile).
GROUPS_PER_CALL = 64
PREFETCH = 2
SAVE_EVERY_BYTES = 256 * 1024 * 1024
INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 10.0

# (offset, block count, applied_through_seq) -> the target's digests (BlockHashes).
Fetch = Callable[[int, int, int], rpb.BlockHashesReply]
# A target that has not yet applied the stream through the sync's marker: expected for a moment.
TARGET_CATCHING_UP = "target-catching-up"


@dataclass
class _Batch:
    offset: int
    count: int
    future: Future
    counted: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.count * B


@dataclass(frozen=True)
class _Mark:
    seq: int  # reached once this seq is acknowledged (0: at once)
    end: int
    differing: int
    sent: int
    hashes: int


class DeltaSync(InitialSync):
    """A `VolatileSource` for a delta pair's first sync. See the module docstring.

    `fetch(offset, count, applied_through_seq)` asks the process server for the
    target's digests (BlockHashes), taken once the target has applied the stream
    through the sync's INITIAL_STARTED marker (`state.sync_started_seq`);
    `wake()` wakes the shipper (a fetch finished).
    """

    def __init__(
        self,
        disk: DiskCapture,
        journal: PairJournal,
        state: PairState,
        *,
        save: Callable[[], None],
        fetch: Fetch,
        wake: Callable[[], None] = lambda: None,
        stop: threading.Event | None = None,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
        group_bytes: int = GROUP_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= batch_blocks <= blockhash.MAX_BLOCKS_PER_CALL or group_bytes % B or group_bytes <= 0:
            raise errors.InvalidInput(
                f"delta sync batch {batch_blocks} blocks / group {group_bytes} bytes is not valid", code="config-range"
            )
        super().__init__(disk, journal, state, save=save, chunk_bytes=group_bytes)
        self._fetch = fetch
        self._wake = wake
        self._stop = stop or threading.Event()
        self.batch_blocks = batch_blocks
        self.group_bytes = group_bytes
        self._clock = clock
        self._generation = 0
        self._batches: deque[_Batch] = deque()
        self._buffer: deque[Produced] = deque()
        self._marks: deque[_Mark] = deque()
        self._fetch_pos = 0
        self._last_seq = 0
        self._acked_seq = 0
        self._differing = self._sent = self._hashes = 0
        self._saved_cursor = state.sync_cursor
        self._retry_at = 0.0
        self._backoff = INITIAL_BACKOFF
        # The last failed fetch: (message, code); cleared by the next one that works.
        self.fetch_error: tuple[str, str] | None = None
        self.fetches = 0
        self._reset_locked()

    # -- InitialSync hooks ----------------------------------------------------------
    def _restarted_locked(self) -> None:
        self._reset_locked()

    def rewind(self) -> None:
        with self._lock:
            self._done_sent = False
            self._reset_locked()

    def _reset_locked(self) -> None:
        """Forget what was made and not acknowledged: compare again from the cursor."""
        self._generation += 1
        cursor = self.state.sync_cursor
        self._pos = self._fetch_pos = self._saved_cursor = min(cursor - cursor % B, self.disk.size)
        self._behind.restart(self._pos)
        self._batches.clear()
        self._buffer.clear()
        self._marks.clear()
        self._last_seq = self._acked_seq = 0
        self._differing = self.state.sync_differing_bytes
        self._sent = self.state.sync_sent_bytes
        self._hashes = self.state.sync_hash_bytes

    def fill_status(self, status: rpb.PairStatus) -> None:
        super().fill_status(status)
        status.sync_compared_bytes = self.done_bytes
        status.sync_differing_bytes = self.state.sync_differing_bytes
        status.sync_hash_bytes = self.state.sync_hash_bytes

    def close(self) -> None:
        """Forget the fetches under way (their threads end with their call's deadline)."""
        with self._lock:
            self._generation += 1
            self._batches.clear()

    # -- producing frames -------------------------------------------------------------
    def produce(self) -> Produced | None:
        for _ in range(GROUPS_PER_CALL):
            with self._lock:
                if self.done or self._done_sent:
                    return None
                if self._buffer:
                    return self._buffer.popleft()
                if self._pos >= self.disk.size:
                    return self._done_frame()
                if self._stop.is_set():
                    return None
                batch = self._ready_batch()
                if batch is None:
                    return None
                self._compare_group(batch)
                self._save_if_due()
        # A long identical stretch: let the shipper send the writes journaled meanwhile, then go on.
        self._wake()
        return None

    def _ready_batch(self) -> _Batch | None:
        """The fetched batch holding `_pos`; None while it is on its way (or failed: retried later)."""
        self._schedule()
        if not self._batches:
            return None
        batch = self._batches[0]
        if not batch.future.done():
            return None
        try:
            reply = batch.future.result()
        except Exception as exc:
            self._fetch_failed(batch, exc)
            return None
        if not batch.counted:
            batch.counted = True
            self._hashes += len(reply.digests)
            if self.fetch_error is not None:
                log.info("target block hashes reachable again", pair=self.journal.pair_id)
            self.fetch_error = None
            self._backoff = INITIAL_BACKOFF
        return batch

    def _schedule(self) -> None:
        """Keep up to PREFETCH fetches running or done ahead of the reading."""
        if self._clock() < self._retry_at:
            return
        size = self.disk.size
        while len(self._batches) < PREFETCH and self._fetch_pos < size:
            offset = self._fetch_pos
            count = min(self.batch_blocks, blockhash.blocks_of(size - offset))
            future: Future = Future()
            threading.Thread(
                target=self._fetch_into, args=(future, offset, count, self.state.sync_started_seq),
                name=f"hashes-{self.journal.pair_id}", daemon=True,
            ).start()
            self._batches.append(_Batch(offset, count, future))
            self._fetch_pos = offset + count * B

    def _fetch_into(self, future: Future, offset: int, count: int, started_seq: int) -> None:
        """A fetch's thread: ask (once the target applied the stream through `started_seq`), check the
        reply's shape, hand it over, wake the shipper."""
        try:
            reply = self._fetch(offset, count, started_seq)
            request = rpb.BlockHashesRequest(pair_id=self.journal.pair_id, offset=offset, block_count=count)
            blockhash.check_reply(reply, request)
        except Exception as exc:  # handed to produce(), which reports it and retries
            future.set_exception(exc)
        else:
            self.fetches += 1
            future.set_result(reply)
        self._wake()

    def _fetch_failed(self, batch: _Batch, exc: BaseException) -> None:
        if isinstance(exc, errors.SiteRecoveryError):
            error = (exc.message + (f" ({exc.hint})" if exc.hint else ""), exc.code)
        else:
            error = (str(exc) or type(exc).__name__, "target-hashes-failed")
        if error != self.fetch_error:
            # A target still applying the frames before the sync's marker is expected, briefly.
            behind = isinstance(exc, errors.Unavailable) and exc.code == TARGET_CATCHING_UP
            (log.info if behind else log.warning)(
                "cannot fetch the target's block hashes; retrying", pair=self.journal.pair_id,
                offset=batch.offset, code=error[1], error=error[0], retry_in=round(self._backoff, 2),
            )
        self.fetch_error = error
        # Drop this fetch and those behind it; fetch again from here after the backoff.
        self._batches.clear()
        self._fetch_pos = self._pos
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _compare_group(self, batch: _Batch) -> None:
        """Compare the group at `_pos` (inside `batch`) with the target; buffer a frame per differing run."""
        reply = batch.future.result()
        size = self.disk.size
        pair = self.journal.pair_id
        start = self._pos
        end = min(start + self.group_bytes, batch.end, size)
        first = start // B
        target = memoryview(reply.digests)
        present_end = batch.offset // B + reply.present_blocks
        generation = self._generation
        with self.disk.quiesced():
            hole = next_data(self.disk.fd, start, end) >= end
            data = None if hole else memoryview(self.disk.read_locked(start, end - start))
            local = blockhash.zero_digests(start, end) if data is None else blockhash.block_digests(data)
            differing: list[tuple[int, bytes, bool]] = []  # block, (unused), all zeros
            for index in range(len(local) // D):
                block = first + index
                digest = local[index * D:(index + 1) * D]
                at = (block - batch.offset // B) * D
                if block < present_end and digest == target[at:at + D]:
                    continue
                zero = data is None or digest == blockhash.zero_digest(min(B, size - block * B))
                differing.append((block, b"", zero))
                self._differing += min(B, size - block * B)
            for run in frame_runs(differing):
                offset = run[0][0] * B
                length = min(len(run) * B, size - offset)
                seq = self.journal.lease.take()
                if run[0][2]:
                    frame = frames.zero_frame(pair, seq, offset, length)
                else:
                    assert data is not None
                    frame = frames.write_frame(pair, seq, offset, bytes(data[offset - start:offset - start + length]))
                    self._sent += length
                self._buffer.append(Produced(frame, lambda g=generation, s=seq: self._acked(g, s)))
                self._last_seq = seq
        self._pos = end
        self._behind.passed(start)
        if end >= batch.end or end >= size:
            self._batches.popleft()
        mark = _Mark(self._last_seq, end, self._differing, self._sent, self._hashes)
        if mark.seq <= self._acked_seq:
            self._reach(mark)
        else:
            self._marks.append(mark)

    # -- acknowledgements -----------------------------------------------------------------
    def _acked(self, generation: int, seq: int) -> None:
        with self._lock:
            if generation != self._generation or self.done:
                return
            self._acked_seq = max(self._acked_seq, seq)
            while self._marks and self._marks[0].seq <= self._acked_seq:
                self._reach(self._marks.popleft())

    def _reach(self, mark: _Mark) -> None:
        """Every frame up to the mark is acknowledged: the cursor may pass its group."""
        state = self.state
        if mark.end > state.sync_cursor and not self.done:
            state.sync_cursor = mark.end
            state.sync_differing_bytes, state.sync_sent_bytes = mark.differing, mark.sent
            state.sync_hash_bytes = mark.hashes
            self.state_dirty = True

    def _save_if_due(self) -> None:
        """A long run of identical blocks moves the cursor without any acknowledgement: save it now and then."""
        if self.state_dirty and self.state.sync_cursor - self._saved_cursor >= SAVE_EVERY_BYTES:
            self.state_dirty = False
            self._saved_cursor = self.state.sync_cursor
            self._save()

    def _acked_done(self) -> None:
        with self._lock:
            while self._marks:  # every frame before INITIAL_DONE is acknowledged with it
                self._reach(self._marks.popleft())
        super()._acked_done()
        log.info("delta sync done", pair=self.journal.pair_id, compared=self.disk.size,
                 differing=self.state.sync_differing_bytes, sent=self.state.sync_sent_bytes,
                 hash_bytes=self.state.sync_hash_bytes, fetches=self.fetches)
        self.close()
