"""Block hashes: a disk seen as fixed 64 KiB blocks, each named by its xxh3-128 digest.

One definition for everything that compares disks by hash: scan mode on the
source (agents/source/scan.py), the delta sync (agents/source/delta.py), and
the master target's `BlockHashes` (agents/master_target/hashes.py), so both
sides of a comparison always hash the same bytes the same way:

- block i of a disk covers [i * 64 KiB, (i + 1) * 64 KiB); the disk's last block
  is shorter when the size is not a multiple of 64 KiB, and is hashed at its
  real length (both sides know the disk size);
- a digest is `xxhash.xxh3_128_digest(block)`: 16 bytes, canonical (big-endian);
- digests of consecutive blocks are packed back to back, 16 bytes each.

Hashing goes over large reads (`READ_BYTES`) sliced with memoryviews, so there
is one read per several MiB and no copy per block; a hole (SEEK_DATA) is not
read at all: its blocks get the digest of zeros.
"""

from __future__ import annotations

import errno
import functools
import os

import xxhash

from siterecovery.common import errors, pagecache
from siterecovery.common.pb import replication_pb2 as rpb

BLOCK_BYTES = 64 * 1024
DIGEST_BYTES = 16
# At most this many blocks per BlockHashes call: 1 GiB of disk, 256 KiB of digests.
MAX_BLOCKS_PER_CALL = 16384
# Reads are this large (a multiple of BLOCK_BYTES).
READ_BYTES = 8 * 1024 * 1024
ABSENT = bytes(DIGEST_BYTES)


def block_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


@functools.lru_cache(maxsize=8)
def zero_digest(length: int = BLOCK_BYTES) -> bytes:
    """The digest of `length` zero bytes (a hole, a zeroed block)."""
    return block_digest(bytes(length))


def block_digests(data: bytes | memoryview) -> bytes:
    """The packed digests of the consecutive blocks of `data` (its last block may be short)."""
    view = memoryview(data)
    return b"".join(xxhash.xxh3_128_digest(view[i:i + BLOCK_BYTES]) for i in range(0, len(view), BLOCK_BYTES))


def zero_digests(start: int, end: int) -> bytes:
    """The packed digests of the blocks of [start, end) when it reads as zeros."""
    return b"".join(zero_digest(min(BLOCK_BYTES, end - at)) for at in range(start, end, BLOCK_BYTES))


def blocks_of(size: int) -> int:
    return (size + BLOCK_BYTES - 1) // BLOCK_BYTES


def next_data(fd: int, offset: int, size: int) -> int:
    """The first offset >= `offset` that may hold data (`size` when none; `offset` when unknown)."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), size)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        return offset  # SEEK_DATA not supported here: assume data


# How long a BlockHashes answer waits for its target to apply through the asked seq (a delta
# sync's INITIAL_STARTED is usually a moment behind) before it refuses with target-catching-up.
APPLIED_WAIT_SECONDS = 5.0


def check_applied(request: rpb.BlockHashesRequest, applied_seq: int, *, holder: str, hint: str) -> None:
    """Refuse (Unavailable `target-catching-up`) a request whose `applied_through_seq` is above
    `applied_seq`, what the target has applied: its digests would miss frames from before the
    delta sync began (agents/source/delta.py, fact d). `holder` says what holds the frames."""
    if request.applied_through_seq > applied_seq:
        raise errors.Unavailable(
            f"pair {request.pair_id}: {holder} frames through seq {applied_seq}, the delta sync needs "
            f"{request.applied_through_seq} first",
            hint=hint,
            code="target-catching-up",
        )


def check_range(offset: int, block_count: int, disk_size: int) -> None:
    """Refuse (InvalidInput) a BlockHashes range that is not 1..MAX blocks, aligned, inside the disk."""
    if not 1 <= block_count <= MAX_BLOCKS_PER_CALL:
        raise errors.InvalidInput(
            f"block_count {block_count} is out of range",
            hint=f"ask for 1 to {MAX_BLOCKS_PER_CALL} blocks of {BLOCK_BYTES} bytes per call",
            code="hash-range-invalid",
        )
    if offset % BLOCK_BYTES:
        raise errors.InvalidInput(
            f"offset {offset} is not a multiple of the block size {BLOCK_BYTES}",
            hint="ask for whole blocks", code="hash-range-invalid",
        )
    last_start = offset + (block_count - 1) * BLOCK_BYTES
    if offset >= disk_size or last_start >= disk_size:
        raise errors.InvalidInput(
            f"blocks {offset // BLOCK_BYTES}..{last_start // BLOCK_BYTES} lie past the end of the "
            f"{disk_size}-byte disk (it has {blocks_of(disk_size)} blocks)",
            hint="ask only for blocks that start inside the disk", code="hash-range-invalid",
        )


def check_reply(reply: rpb.BlockHashesReply, request: rpb.BlockHashesRequest) -> None:
    """A BlockHashes reply must hold one digest per block asked for, at the offset asked for."""
    if (
        reply.offset != request.offset
        or reply.block_bytes != BLOCK_BYTES
        or len(reply.digests) != request.block_count * DIGEST_BYTES
        or reply.present_blocks > request.block_count
    ):
        raise errors.Internal(
            f"the block hashes of pair {request.pair_id} do not match the request (offset {reply.offset}, "
            f"{len(reply.digests)} digest bytes, block size {reply.block_bytes})",
            hint="the process server or master target runs an incompatible version; upgrade it",
            code="hashes-malformed",
        )


def file_digests(fd: int, offset: int, block_count: int, disk_size: int) -> tuple[bytes, int, int]:
    """Digests of `block_count` blocks of the disk file `fd` from `offset` (a checked range).

    Returns (packed digests, present blocks, file size): a block is present when
    the file holds all of it; the blocks after the first absent one are absent
    too (their digests are `ABSENT`, meaningless zeros).
    """
    file_size = os.lseek(fd, 0, os.SEEK_END)
    present_at = present_end(file_size, offset, min(offset + block_count * BLOCK_BYTES, disk_size))
    present = blocks_of(present_at - offset)
    return range_digests(fd, offset, present_at) + ABSENT * (block_count - present), present, file_size


def present_end(file_size: int, offset: int, end: int) -> int:
    """The end of the blocks of [offset, end) that a file of `file_size` bytes holds entirely."""
    if file_size >= end:
        return end
    # only whole blocks can be present: a short block is the disk's last, and lies past file_size
    return offset + max(0, file_size - offset) // BLOCK_BYTES * BLOCK_BYTES


def range_digests(fd: int, start: int, end: int) -> bytes:
    """The packed digests of the blocks of [start, end) of `fd` (`start` block-aligned; holes are not read)."""
    out: list[bytes] = []
    behind = pagecache.DropBehind(fd, start)  # a hashing pass reads each block once
    at = start
    while at < end:
        chunk_end = min(at + READ_BYTES, end)
        if next_data(fd, at, chunk_end) >= chunk_end:
            out.append(zero_digests(at, chunk_end))
        else:
            out.append(block_digests(_pread_all(fd, chunk_end - at, at)))
            behind.passed(chunk_end)
        at = chunk_end
    return b"".join(out)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts, got = [data], len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read at {offset + got}: the file ends early")
        parts.append(more)
        got += len(more)
    return b"".join(parts)
