"""Scan mode: find what changed on a disk by hashing it, for disks that cannot be fronted by NBD.

Every `interval` seconds (and at once when a tag is asked for) a *pass* reads
the disk in 4 MiB groups (inside `DiskCapture.quiesced()`, so writes made
through our own NBD export are ordered around each group), hashes each 64 KiB
block with xxh3-128 and compares it with the last hash the process server
acknowledged for that block. Changed blocks become frames (adjacent ones
merged up to 1 MiB; an all-zero block becomes a ZeroRange, so it moves no
data; holes found with SEEK_DATA are not even read). The pass ends with a tag
(crash-consistent, or the tags that were asked for). The first pass is the
initial sync: its blocks are all "changed", and it ends with the SyncMarker
INITIAL_DONE before its tag.

Everything a pass sends is volatile (shipper.py): a frame's acknowledgement
writes its blocks' new hashes into the map, and a reconnect rewinds to the
start of the pass, which then finds only what is still unacknowledged.

On disk: `<pair dir>/scan.hashes`, 16 bytes per block, block i at offset 16*i;
all zeros means "never shipped". Entries are written (pwrite) as
acknowledgements arrive and the file is fsynced when a pass's last frame is
acknowledged. A crash can leave an entry old, new or torn; an old or torn
entry only makes the next pass send that block again, and an entry is never
newer than what the process server holds, so nothing is missed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from siterecovery.common import blockhash, frames, pagecache
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .capture import DiskCapture, PairJournal
from .pairstate import SYNC_COPYING, SYNC_DONE, PairState, TagSpec
from .shipper import Produced
from .sync import next_data

log = get_logger(__name__)

BLOCK_BYTES = blockhash.BLOCK_BYTES
GROUP_BYTES = 4 * 1024 * 1024
MAX_FRAME_BYTES = 1024 * 1024
DIGEST = blockhash.DIGEST_BYTES
HASH_FILE = "scan.hashes"
block_digest = blockhash.block_digest


class ScanSource:
    """A `VolatileSource` (shipper.py) for a scan-mode pair. See the module docstring."""

    def __init__(
        self,
        disk: DiskCapture,
        journal: PairJournal,
        state: PairState,
        directory: Path,
        *,
        interval: float,
        stop: threading.Event,
        on_tag_acked: Callable[[TagSpec], None] = lambda _t: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disk = disk
        self.journal = journal
        self.state = state
        self.interval = interval
        self.stop = stop
        self.on_tag_acked = on_tag_acked
        self.clock = clock
        self.blocks = (disk.size + BLOCK_BYTES - 1) // BLOCK_BYTES
        path = Path(directory) / HASH_FILE
        self._map_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._map_fd).st_size != self.blocks * DIGEST:
            os.ftruncate(self._map_fd, self.blocks * DIGEST)
        self.acked = bytearray(os.pread(self._map_fd, self.blocks * DIGEST, 0))
        # The passes read around the page cache (common/pagecache.py says why).
        try:
            self._reader = pagecache.DirectReader(disk.path, GROUP_BYTES)
        except BaseException:
            os.close(self._map_fd)
            raise
        if not self._reader.direct:
            log.info("scan passes read through the page cache: the disk's file system refuses O_DIRECT",
                     disk=str(disk.path))
        self._lock = threading.Lock()
        self._req_lock = threading.Lock()
        self._requests: list[TagSpec] = []
        self._pass_tags: list[TagSpec] = []
        self._buffer: deque[Produced] = deque()
        self._active = False
        self._end_made = False
        self._pos = 0
        self._next_due = 0.0
        self.state_dirty = False
        self.passes_done = 0
        self.acked_pos = 0
        self.last_pass_blocks = 0
        self._pass_blocks = 0

    @property
    def done(self) -> bool:
        return self.state.sync_phase == SYNC_DONE

    @property
    def done_bytes(self) -> int:
        return self.disk.size if self.done else min(self.acked_pos, self.disk.size)

    def close(self) -> None:
        os.close(self._map_fd)
        self._reader.close()

    def request(self, tag: TagSpec) -> None:
        """Scan now and end the pass with this tag."""
        with self._req_lock:
            self._requests.append(tag)

    def set_interval(self, interval: float) -> None:
        with self._req_lock:
            if interval != self.interval:
                self._next_due = min(self._next_due, self.clock() + interval)
                self.interval = interval

    def reset(self) -> None:
        """Forget every acknowledged hash: the next pass sends the whole disk (a new initial sync)."""
        with self._lock:
            self.acked[:] = bytes(len(self.acked))
            os.pwrite(self._map_fd, bytes(self.acked), 0)
            self.state.sync_phase = SYNC_COPYING
            self.state.sync_cursor = 0
            self.acked_pos = 0
            self._buffer.clear()
            self._active = False
        with self._req_lock:
            self._next_due = 0.0

    def rewind(self) -> None:
        with self._lock:
            self._buffer.clear()
            if self._active:
                self._pos = 0
                self._end_made = False
                self._pass_blocks = 0

    def produce(self) -> Produced | None:
        with self._lock:
            if self._buffer:
                return self._buffer.popleft()
            if not self._active:
                with self._req_lock:
                    if self.clock() < self._next_due and not self._requests:
                        return None
                    self._pass_tags, self._requests = self._requests, []
                self._active, self._pos, self._end_made, self._pass_blocks = True, 0, False, 0
                log.info("scan pass started", pair=self.journal.pair_id, disk=self.disk.name)
            while self._pos < self.disk.size:
                if self.stop.is_set():
                    return None
                self._scan_group()
                if self._buffer:
                    return self._buffer.popleft()
            if not self._end_made:
                self._make_end()
                self._end_made = True
                return self._buffer.popleft()
            return None

    # -- one group ---------------------------------------------------------------------
    def _scan_group(self) -> None:
        size = self.disk.size
        pair = self.journal.pair_id
        with self.disk.quiesced():
            start = self._pos
            end = min(start + GROUP_BYTES, size)
            hole = next_data(self.disk.fd, start, size) >= end
            data = None if hole else self._reader.read(start, end - start)  # valid until the next group
            digests = blockhash.zero_digests(start, end) if data is None else blockhash.block_digests(data)
            changed: list[tuple[int, bytes, bool]] = []  # block, digest, all zeros
            first = start // BLOCK_BYTES
            for index in range(len(digests) // DIGEST):
                block = first + index
                digest = digests[index * DIGEST:(index + 1) * DIGEST]
                zero = data is None or digest == blockhash.zero_digest(min(BLOCK_BYTES, size - block * BLOCK_BYTES))
                if digest != self.acked[block * DIGEST:(block + 1) * DIGEST]:
                    changed.append((block, digest, zero))
            for run in frame_runs(changed):
                first_block = run[0][0]
                offset = first_block * BLOCK_BYTES
                length = min(len(run) * BLOCK_BYTES, size - offset)
                seq = self.journal.lease.take()
                if run[0][2]:
                    frame = frames.zero_frame(pair, seq, offset, length)
                else:
                    assert data is not None
                    frame = frames.write_frame(pair, seq, offset, bytes(data[offset - start:offset - start + length]))
                entries = [(block, digest) for block, digest, _zero in run]
                self._buffer.append(Produced(frame, lambda e=entries, end=offset + length: self._acked_blocks(e, end)))
            self._pass_blocks += len(changed)
            self._pos = end

    def _acked_blocks(self, entries: list[tuple[int, bytes]], end: int) -> None:
        with self._lock:
            for block, digest in entries:
                self.acked[block * DIGEST:(block + 1) * DIGEST] = digest
            first = entries[0][0]
            os.pwrite(self._map_fd, bytes(self.acked[first * DIGEST:(entries[-1][0] + 1) * DIGEST]), first * DIGEST)
            self.acked_pos = max(self.acked_pos, end)

    # -- the end of a pass -------------------------------------------------------------------
    def _make_end(self) -> None:
        pair = self.journal.pair_id
        tags = self._pass_tags or [
            TagSpec(tag_id=uuid.uuid4().hex, kind=rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT, note="end of a scan pass")
        ]
        with self.disk.quiesced():
            if not self.done:
                frame = frames.sync_frame(pair, self.journal.lease.take(), rpb.SYNC_PHASE_INITIAL_DONE, self.disk.size)
                self._buffer.append(Produced(frame))
            for tag in tags:
                frame = frames.tag_frame(
                    pair, self.journal.lease.take(), tag.tag_id, tag.kind,
                    group_id=tag.group_id, note=tag.note, on_demand=tag.on_demand,
                )
                self._buffer.append(Produced(frame, lambda t=tag: self.on_tag_acked(t)))
        last = self._buffer[-1]
        previous = last.on_ack

        def pass_acked() -> None:
            if previous is not None:
                previous()
            self._pass_acked()

        last.on_ack = pass_acked

    def _pass_acked(self) -> None:
        os.fsync(self._map_fd)
        with self._req_lock:
            self._next_due = self.clock() + self.interval
        with self._lock:
            self._active = False
            self._pass_tags = []
            self.passes_done += 1
            self.last_pass_blocks = self._pass_blocks
            if not self.done:
                self.state.sync_phase = SYNC_DONE
                self.state.sync_cursor = self.disk.size
                self.state_dirty = True
                log.info("initial sync done (first scan pass)", pair=self.journal.pair_id, disk=self.disk.name)
        log.info("scan pass done", pair=self.journal.pair_id, changed_blocks=self.last_pass_blocks)


def frame_runs(changed: list[tuple[int, bytes, bool]]) -> list[list[tuple[int, bytes, bool]]]:
    """Split changed (block, digest, all zeros) into runs of adjacent blocks of one kind, each at
    most MAX_FRAME_BYTES: one frame each."""
    runs: list[list[tuple[int, bytes, bool]]] = []
    per_frame = MAX_FRAME_BYTES // BLOCK_BYTES
    for entry in changed:
        if runs:
            last = runs[-1]
            if entry[0] == last[-1][0] + 1 and entry[2] == last[-1][2] and len(last) < per_frame:
                last.append(entry)
                continue
        runs.append([entry])
    return runs
