"""Changed-block tracking for a pair whose journal is full: one bit per 64 KiB block, in a file.

When a pair's journal reaches its limit (bytes, or the state volume's free
space; capture.py, "Journal limit"), the committer stops journaling that
pair's writes: each still goes to the disk file, and the blocks it touches
are marked here instead. Once the process server has caught up, the pair's
catch-up (catchup.py) reads the marked blocks from the disk and journals them
as ordinary writes, clearing their bits, and the pair journals writes again
once no bit is left. So a guest that writes faster than replication carries,
or a process server that is away for long, costs RPO and a resend of the
blocks it touched, never a failed guest write.

File layout (`dirty.map` in the pair's directory, mapped shared)::

    u64 magic | u64 since | u64 applied_through | bits

Bit i (little-endian within each byte) covers bytes [i, i+1) x BLOCK_BYTES of
the disk. `since` (ns since the epoch, 0: nothing marked) is when the first
bit of the current run was marked: the oldest write the target does not have,
for the pair's RPO. `applied_through` is the journal's last seq at the latest
mark: every journaled frame up to it was on the disk file before that write
(the committer applies a commit before it takes the next), so a restart must
not replay them (capture.py, `DiskCapture.attach`): the journal still holds
them for the next hop, but on the disk file a write made since, only marked
here, is newer than they are.

What a crash leaves: the map is written through a shared mapping, so a kill
-9 loses nothing (the page cache keeps it). A bit is always marked before the
write it covers reaches the disk file, and cleared only after the block's
contents are journaled, so every interleaving with a kill leaves at most a
bit too many (one block sent twice). A power loss may lose or tear unsynced
pages; a journal that was in use then makes the pair resynchronise the whole
disk anyway (capture.py, "Write-back"), and where there is no write-back the
committer syncs the map with every commit that marks it (`sync`).

Threads: `mark` runs on the disk's committer, `next_run` and `clear` inside
`DiskCapture.quiesced()` (so never at the same time as a commit); the
counters may be read from anywhere.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from pathlib import Path

from bitarray import bitarray

from siterecovery.common import errors
from siterecovery.common.daemon import fsync_dir
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

BLOCK_BYTES = 64 * 1024
DIRTY_FILE = "dirty.map"
_MAGIC = 0x3170_614D_7974_7244  # "DrtyMap1", little-endian
_HEADER = struct.Struct("<QQQ")


class DirtyMap:
    """The marked blocks of one disk of `disk_size` bytes, kept in `path`. See the module docstring."""

    def __init__(self, path: Path, disk_size: int) -> None:
        self.path = Path(path)
        self.disk_size = disk_size
        self.blocks = -(-disk_size // BLOCK_BYTES)
        size = _HEADER.size + max(1, -(-self.blocks // 8))
        try:
            self._map, found = self._open(size)
        except OSError as exc:
            raise errors.Unavailable(
                f"cannot open the changed-block map {self.path}: {exc.strerror or exc}",
                hint="free space on the source agent's state volume (or fix its permissions), then restart the agent",
                code="disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "disk-error",
            ) from exc
        magic, since, applied_through = _HEADER.unpack_from(self._map, 0)
        self._bits = bitarray(buffer=memoryview(self._map)[_HEADER.size:], endian="little")
        if magic != _MAGIC:
            fresh = found == 0
            self._bits.setall(0)
            if not fresh:
                self._bits[: self.blocks] = 1
            since = 0 if fresh else time.time_ns()
            applied_through = 0 if fresh else 2**63  # damaged: replay nothing (every block is marked)
            _HEADER.pack_into(self._map, 0, _MAGIC, since, applied_through)
        self.count = self._bits.count(1, 0, self.blocks)
        self._since = since if self.count else 0
        self.applied_through = applied_through

    def _open(self, size: int) -> tuple[mmap.mmap, int]:
        """The file mapped, `size` bytes, and the size it had."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            found = os.fstat(fd).st_size
            if found not in (0, size):
                # Made for a disk of another size (the pair then stops with disk-size-changed):
                # start again with every block marked, so nothing it tracked can be missed.
                log.warning("changed-block map does not fit the disk; marking every block", path=str(self.path))
                os.ftruncate(fd, 0)
            # Allocated, not sparse: a store into a hole of a full file system would be a SIGBUS.
            os.posix_fallocate(fd, 0, size)
            if found != size:  # new (or remade): its size and name are durable before any mark
                os.fsync(fd)
                fsync_dir(self.path.parent)
            return mmap.mmap(fd, size), found
        finally:
            os.close(fd)

    @property
    def dirty_bytes(self) -> int:
        """Bytes of the marked blocks (the last block counts whole)."""
        return self.count * BLOCK_BYTES

    @property
    def since_ns(self) -> int:
        """When the first of the marked blocks was marked (0: none is)."""
        return self._since if self.count else 0

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // BLOCK_BYTES, min(self.blocks, -(-(offset + length) // BLOCK_BYTES))

    def mark(self, offset: int, length: int, applied_through: int) -> None:
        """Mark every block [offset, offset+length) touches, before the write reaches the disk file;
        `applied_through`: the journal's last seq (every frame up to it is on the disk file)."""
        first, end = self._span(offset, length)
        if first >= end:
            return
        if not self.count:
            self._since = time.time_ns()
        if applied_through != self.applied_through or not self.count:
            self.applied_through = applied_through
            _HEADER.pack_into(self._map, 0, _MAGIC, self._since, applied_through)
        already = self._bits.count(1, first, end)
        if already == end - first:
            return
        self._bits[first:end] = 1
        self.count += end - first - already

    def next_run(self, offset: int, max_bytes: int) -> tuple[int, int] | None:
        """The first run of marked blocks at or after `offset` (at most `max_bytes`, whole blocks
        unless at the disk's end) as (offset, length), or None when none is marked there."""
        first = self._bits.find(1, offset // BLOCK_BYTES, self.blocks)
        if first < 0:
            return None
        limit = min(self.blocks, first + max(1, max_bytes // BLOCK_BYTES))
        end = self._bits.find(0, first, limit)
        if end < 0:
            end = limit
        start = first * BLOCK_BYTES
        return start, min(end * BLOCK_BYTES, self.disk_size) - start

    def clear(self, offset: int, length: int) -> None:
        """Unmark the blocks of a run `next_run` gave (their contents are journaled)."""
        first, end = self._span(offset, length)
        if first >= end:
            return
        self.count -= self._bits.count(1, first, end)
        self._bits[first:end] = 0

    def sync(self) -> None:
        """Make the map durable (msync)."""
        self._map.flush()

    def close(self) -> None:
        self._bits = bitarray()  # releases its view of the mapping, which can then close
        self._map.close()
