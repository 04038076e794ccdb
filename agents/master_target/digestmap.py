"""The digest map of a target disk: what the master target knows of each 64 KiB block it wrote.

`MasterTarget.BlockHashes` (hashes.py) must give the digest (common/blockhash.py:
xxh3-128 of each 64 KiB block) of every block of a pair's target disk. Reading
and hashing the whole disk for that is what bound the delta resync (bench/
RESULTS.md). The master target is the only writer of its target files while a
pair replicates, so it can remember the digest of every block it writes, and
keep that across the pair being disabled and a new pair (new id, same target
path: a reprotect, a second failback) being enabled onto the file. Then
BlockHashes reads and hashes only the blocks the map cannot vouch for.

On-disk layout: one file per target path, `<retention_dir>/.digest-maps/
<xxh3-128 of the resolved target path, hex>.map` (pairs.py), 16 bytes per block::

    bytes 0..4095     header (HEADER below), then zeros; its last 8 bytes are the
                      xxh3-64 of bytes 0..4087
                      magic "SRDM" | version u32 | state u32 (1 clean, 2 dirty) |
                      block bytes u32 | disk size u64 | stamp of the target file:
                      st_dev, st_ino, st_size u64, st_mtime_ns, st_ctime_ns i64 |
                      xxh3-64 of the digest area | length of the target path u32 |
                      the target path (UTF-8)
    4096 + 16 * i     the digest of block i; 16 zero bytes (`ABSENT`) = unknown

The map is read and written with pread/pwrite (a 2 TiB disk's map is 512 MiB:
page cache, not the heap; no mmap, so a full disk is an error, not a SIGBUS),
and allocated whole when created. Any error of the map file makes the live map
give up (every block unknown, never stamped clean): replication goes on. A block
is *unknown* when its entry is all zeros; a real digest that happens to be zero
only costs a read, never a wrong answer.

**The rule that makes it safe: a known entry is always the digest of the block's
current contents.** It holds while the map is live because every write of the
master target to the target file goes through `writing()`: the written blocks
are marked unknown *before* the file changes (`forget`), and get their new
digest only after the write (`learn`: hashed from the frame's data for whole
blocks; a block written in part stays unknown until BlockHashes reads it, or is
read back from the page cache and hashed when `PARTIAL_BLOCKS` says "read").
A write that fails half-way leaves its blocks unknown. Digests that BlockHashes
computed by reading unknown blocks are stored (`remember`) only when no write
began or was under way between the read and the store (`epoch` moves at both
ends of every write; `writers` counts the writes under way).

Across processes it holds because the map is **trusted at open only when the
master target can prove nobody changed the file since it last wrote it**:

- every change of the map file happens only after its header says *dirty* durably
  (`_make_dirty`: header written, fsync), so a map left by a crash (kill -9, power
  loss) in the middle of anything says dirty;
- `close` (pair closed: unassigned, daemon stopping) fsyncs the target, takes its
  identity (device, inode, size, mtime_ns, ctime_ns) with fstat, fsyncs the
  digests, and only then writes the header *clean* with that stamp and a checksum
  of the digest area, and fsyncs it;
- `open` trusts the map only when the header's checksum, version, disk size,
  block size and target path are right, the file has the right length, it says
  clean, its stamp equals the target file's identity now and the digest area's
  checksum matches. Any write by anyone else after our stamp changes the file's
  mtime and ctime (and a `touch` back to an old mtime still changes ctime, which
  cannot be set); a replaced or recreated file has another inode or ctime.
  Otherwise the map is *discarded*: replaced (new file, rename) by one whose
  blocks are all unknown, so BlockHashes reads the disk as before this map
  existed. The undo journal could prove some entries of a dirty map right again;
  that is not done: after a crash the next delta sync reads the disk once.

What a crash at each point leaves (the next `open` decides):

- before the first write after open: the header is as it was (clean, with the
  stamp of a file nobody has changed since: trusted and right);
- while the header is being made dirty: torn (checksum) or old-clean; the target
  is not written before the fsync of the dirty header returns, so an old-clean
  header still matches the untouched file;
- any time while dirty (applying, learning, remembering): dirty, discarded;
- in `close`, before the clean header's fsync returns: dirty or torn, discarded;
- after it: clean, stamp of the file as we left it, trusted when still equal;
- while a discarded map is replaced: the old file or the new all-unknown one
  (whose header says dirty), both handled above; a `.tmp` leftover is ignored
  and overwritten next time;
- a map that gave up (its file failed) before it could say dirty is clean on
  disk with the stamp of the file before our next write, which that write breaks.

What the argument assumes, as delta.py does: while a pair is open, the master
target is the only writer of its target file (a foreign write then would make
the replica wrong with or without this map).

A stamp compares equal after someone else wrote the file only if the file system
did not move mtime/ctime. File timestamps come from a coarse clock (one tick,
up to 10 ms): a foreign write in the same tick as our last one could leave them
as they were (Linux ≥ 6.13 gives a change after a stat a newer timestamp, older
kernels do not). So `close` stamps only once the wall clock is `TICK_NS` past the
file's timestamps, waiting for the rest when it is not: any later write then
gets a later tick. (A foreign writer starts only after the pair is gone, a VM
booted after failover, far later anyway.)
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from siterecovery.agents.master_target import blockio
from siterecovery.common import blockhash
from siterecovery.common.daemon import fsync_dir
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

B = blockhash.BLOCK_BYTES
D = blockhash.DIGEST_BYTES
ABSENT = blockhash.ABSENT
MAGIC = b"SRDM"
VERSION = 1
CLEAN, DIRTY = 1, 2
HEADER_BYTES = 4096
HEADER = struct.Struct("<4sIII Q QQQqq Q I")
_SUM_AT = HEADER_BYTES - 8
MAX_PATH_BYTES = _SUM_AT - HEADER.size
SUFFIX = ".map"
DIR_NAME = ".digest-maps"
# How the blocks that a frame covers only in part get their digest: "read" (read back
# from the page cache after the write and hash) or "forget" (left unknown: read, hashed
# and remembered by the next BlockHashes that asks for them). Measured with
# bench/digest_apply_cost.py (bench/RESULTS.md): "read" added 25-38 % of CPU per 16 KiB
# continuous write, "forget" 1-3 %; a full sync (whole blocks) is hashed from the frames
# either way.
PARTIAL_BLOCKS = "forget"

Stamp = tuple[int, int, int, int, int]


def map_path(directory: Path, target_path: Path) -> Path:
    """Where the map of the (resolved) target file `target_path` lives."""
    return directory / (xxhash.xxh3_128_hexdigest(os.fsencode(str(target_path))) + SUFFIX)


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _header(state: int, disk_size: int, stamp: Stamp, area_sum: int, target: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, state, B, disk_size, *stamp, area_sum, len(target)) + target
    head = head.ljust(_SUM_AT, b"\0")
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


class _Discard(Exception):
    """Why a map on disk is not trusted."""


class DigestMap:
    """The live digest map of one target file. Thread-safe; see the module docstring."""

    def __init__(self, path: Path, target_path: Path, disk_size: int, fd: int, *, clean_on_disk: bool,
                 trusted: str) -> None:
        self.path = path
        self.target_path = target_path
        self.disk_size = disk_size
        self.blocks = blockhash.blocks_of(disk_size)
        # "trusted", or why the map found at open was discarded (for logs and tests).
        self.opened_as = trusted
        self._target = os.fsencode(str(target_path))
        self._fd = fd  # -1 once closed or given up: every block unknown from then on
        self._clean_on_disk = clean_on_disk
        self._lock = threading.Lock()
        # `_epoch` moves at both ends of every write, `_writers` counts those under way.
        self._epoch = 0
        self._writers = 0
        # The target file this map describes (device, inode): BlockHashes uses the map only
        # for a descriptor of the same file.
        self.identity: tuple[int, int] | None = None

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, target_path: Path, target_fd: int, disk_size: int) -> DigestMap:
        """The map of the open target file `target_fd`: trusted when provably current, else all unknown."""
        length = HEADER_BYTES + blockhash.blocks_of(disk_size) * D
        target = os.fsencode(str(target_path))
        if len(target) > MAX_PATH_BYTES:
            raise ValueError(f"target path {target_path} is too long for a digest map")
        target_stat = os.fstat(target_fd)
        fd = -1
        trusted = "trusted"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            cls._check(fd, length, disk_size, target, stamp_of(target_stat))
        except (_Discard, OSError, ValueError) as exc:
            if fd >= 0:
                os.close(fd)
            trusted = "missing" if isinstance(exc, FileNotFoundError) else str(exc) or type(exc).__name__
            if not isinstance(exc, FileNotFoundError):
                log.info("digest map not trusted; the target's blocks are read when asked for",
                         map=str(path), target=str(target_path), reason=trusted)
            fd = cls._create(path, length, disk_size, target)
            out = cls(path, target_path, disk_size, fd, clean_on_disk=False, trusted=trusted)
        else:
            out = cls(path, target_path, disk_size, fd, clean_on_disk=True, trusted=trusted)
        out.identity = (target_stat.st_dev, target_stat.st_ino)
        return out

    @staticmethod
    def _check(fd: int, length: int, disk_size: int, target: bytes, stamp: Stamp) -> None:
        if os.fstat(fd).st_size != length:
            raise _Discard("wrong length")
        raw = os.pread(fd, HEADER_BYTES, 0)
        if len(raw) != HEADER_BYTES or struct.unpack_from("<Q", raw, _SUM_AT)[0] != xxhash.xxh3_64_intdigest(
            raw[:_SUM_AT]
        ):
            raise _Discard("header checksum")
        magic, version, state, block_bytes, size, *rest = HEADER.unpack_from(raw)
        their_stamp, area_sum, path_len = tuple(rest[:5]), rest[5], rest[6]
        if magic != MAGIC or version != VERSION or block_bytes != B or size != disk_size:
            raise _Discard("format or disk size")
        if path_len > MAX_PATH_BYTES or raw[HEADER.size:HEADER.size + path_len] != target:
            raise _Discard("another target path")
        if state != CLEAN:
            raise _Discard("dirty: the master target stopped without closing it")
        if their_stamp != stamp:
            raise _Discard("the target file changed since the master target last wrote it")
        if _area_sum(fd, length) != area_sum:
            raise _Discard("digest checksum")

    @staticmethod
    def _create(path: Path, length: int, disk_size: int, target: bytes) -> int:
        """A new all-unknown map (dirty) replacing whatever is at `path`; its descriptor."""
        blockio.make_dirs(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, length)  # every entry reads as zeros: unknown
            try:  # room for every entry now: a full retention disk then fails the open, not a write
                os.posix_fallocate(fd, 0, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            blockio.pwrite_all(fd, _header(DIRTY, disk_size, (0, 0, 0, 0, 0), 0, target), 0)
            os.fsync(fd)
            os.replace(tmp, path)  # a map still open elsewhere keeps its own (old) file
            fsync_dir(path.parent)
            return fd
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    # -- reading -------------------------------------------------------------------
    def lookup(self, first: int, count: int) -> tuple[bytes, int]:
        """(packed entries of blocks first..first+count-1, epoch); all unknown once closed or given up."""
        with self._lock:
            if self._fd >= 0:
                try:
                    return blockio.pread_all(self._fd, count * D, HEADER_BYTES + first * D), self._epoch
                except OSError as exc:
                    self._give_up(exc)
            return ABSENT * count, -1

    def remember(self, epoch: int, first: int, digests: bytes) -> bool:
        """Store digests read from the file (first block `first`) when no write began since `epoch`."""
        with self._lock:
            if self._fd < 0 or epoch != self._epoch or self._writers:
                return False
            try:
                self._make_dirty()
                blockio.pwrite_all(self._fd, digests, HEADER_BYTES + first * D)
            except OSError as exc:
                self._give_up(exc)
                return False
            return True

    # -- writing ---------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[DigestMap]:
        """Bracket every write to the target: `forget` before writing a range, `learn` after."""
        with self._lock:
            if self._fd >= 0:
                try:
                    self._make_dirty()
                except OSError as exc:
                    self._give_up(exc)
            self._epoch += 1
            self._writers += 1
        try:
            yield self
        finally:
            with self._lock:
                self._writers -= 1
                self._epoch += 1

    def forget(self, offset: int, length: int) -> None:
        """Mark the blocks that [offset, offset+length) touches unknown (before writing them)."""
        if length <= 0:
            return
        first, end = offset // B, blockhash.blocks_of(offset + length)
        self._store([(first, bytes((end - first) * D))])

    def learn(self, fd: int, written: list[tuple[int, int, bytes | memoryview | None]]) -> None:
        """After the writes `written` ((offset, length, data or None for zeros), in order) reached `fd`:
        store the new digests of the blocks they cover."""
        size = self.disk_size
        updates: list[tuple[int, bytes]] = []
        partial: set[int] = set()
        for offset, length, data in written:
            end = offset + length
            first_full = blockhash.blocks_of(offset)
            end_full = blockhash.blocks_of(end) if end >= size else end // B
            if offset % B:
                partial.add(offset // B)
            if end % B and end < size:
                partial.add(end // B)
            if first_full >= end_full:
                continue
            lo, hi = first_full * B, min(end_full * B, size)
            if data is None:
                digests = blockhash.zero_digests(lo, hi)
            else:
                digests = blockhash.block_digests(memoryview(data)[lo - offset:hi - offset])
            updates.append((first_full, digests))
        if PARTIAL_BLOCKS == "read":  # after every write of the batch: the block's final contents
            for block in sorted(partial):
                at = block * B
                updates.append((block, blockhash.block_digest(blockio.pread_all(fd, min(B, size - at), at))))
        else:
            updates.extend((block, ABSENT) for block in sorted(partial))
        self._store(updates)

    def _store(self, updates: list[tuple[int, bytes]]) -> None:
        """Write entries (first block, packed entries), in order, into a live map (inside `writing`)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                for first, entries in updates:
                    blockio.pwrite_all(self._fd, entries, HEADER_BYTES + first * D)
            except OSError as exc:
                self._give_up(exc)

    def _make_dirty(self) -> None:
        """Before the first change after a clean header: say dirty, durably (call with `_lock`)."""
        if self._clean_on_disk:
            blockio.pwrite_all(self._fd, _header(DIRTY, self.disk_size, (0, 0, 0, 0, 0), 0, self._target), 0)
            os.fsync(self._fd)
            self._clean_on_disk = False

    def _give_up(self, exc: OSError) -> None:
        """The map file failed us (call with `_lock`): know nothing from now on, never stamp it clean.

        Its header said dirty before any change, or nothing was changed and the target's
        next write breaks its stamp: either way it is not trusted at the next open."""
        log.warning("digest map failed; block hashes are read from the disk", map=str(self.path), error=str(exc))
        os.close(self._fd)
        self._fd = -1

    # -- closing ---------------------------------------------------------------------
    def close(self, target_fd: int) -> None:
        """Stamp the map clean for the target file as it is now (call after the last write), and close.

        `target_fd` < 0: close without stamping (the map stays dirty on disk when it was)."""
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            try:
                if target_fd >= 0 and not self._clean_on_disk and not self._writers:
                    os.fsync(target_fd)
                    st = os.fstat(target_fd)
                    _past_the_tick_of(max(st.st_mtime_ns, st.st_ctime_ns))
                    stamp = stamp_of(st)
                    length = HEADER_BYTES + self.blocks * D
                    area_sum = _area_sum(fd, length)
                    os.fsync(fd)
                    blockio.pwrite_all(fd, _header(CLEAN, self.disk_size, stamp, area_sum, self._target), 0)
                    os.fsync(fd)
                    self._clean_on_disk = True
            except OSError as exc:  # left dirty: discarded at the next open, which is safe
                log.warning("digest map not saved", map=str(self.path), error=str(exc))
            finally:
                os.close(fd)


# Longer than one tick of the kernel's coarse clock, which file timestamps use (HZ >= 100).
TICK_NS = 20_000_000


def _past_the_tick_of(timestamp_ns: int) -> None:
    """Return once the wall clock is TICK_NS past `timestamp_ns` (at most TICK_NS of waiting):
    a write after that cannot get the same timestamp."""
    wait = timestamp_ns + TICK_NS - time.time_ns()
    if 0 < wait <= TICK_NS:
        time.sleep(wait / 1e9)


def _area_sum(fd: int, length: int) -> int:
    """The xxh3-64 of a map file's digest area."""
    h = xxhash.xxh3_64()
    for at in range(HEADER_BYTES, length, blockhash.READ_BYTES):
        h.update(blockio.pread_all(fd, min(blockhash.READ_BYTES, length - at), at))
    return h.intdigest()


class NoMap:
    """Stands in for a DigestMap where none is kept: every block unknown."""

    identity = None
    opened_as = "none"

    def lookup(self, first: int, count: int) -> tuple[bytes, int]:
        return ABSENT * count, -1

    def remember(self, epoch: int, first: int, digests: bytes) -> bool:
        return False

    @contextmanager
    def writing(self) -> Iterator[NoMap]:
        yield self

    def forget(self, offset: int, length: int) -> None:
        pass

    def learn(self, fd: int, written: list[tuple[int, int, bytes | memoryview | None]]) -> None:
        pass

    def close(self, target_fd: int) -> None:
        pass
