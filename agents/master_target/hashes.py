"""MasterTarget.BlockHashes: the digests of a range of a pair's target disk (delta sync).

The pair's process server asks on behalf of the pair's source agent, which
compares them with its own blocks and sends only those that differ (see
agents/source/delta.py for the whole argument). Each block's digest comes from
the target's digest map (digestmap.py) when the map knows it, and is otherwise
read and hashed from the target file, through a descriptor of its own and
without the pair's apply lock. Both are right for the delta sync:

- a known entry of the map is the digest of the block as it was after some
  batch was applied, and the block stayed so until at least the moment it was
  looked up (a batch marks the blocks it writes unknown before it writes them):
  the target's contents at one moment before the reply, which is what delta.py's
  argument needs;
- a read that overlaps a batch being applied sees each byte either before or
  after the frame that writes it, and the delta sync is correct for any such
  mixture (delta.py explains why), so applying never waits for hashing. What was
  read is stored in the map only when no write began meanwhile
  (`DigestMap.remember`), so a mixture never becomes a known entry.

The map is used only for a descriptor of the very file it describes (same
device and inode): a file replaced under the master target is read.

A block the file does not hold entirely (the file is missing, or shorter than
the disk) is reported as absent rather than hashed: `present_blocks` counts the
leading blocks that are there. The pair's target is normally opened first
(pairs.py), which creates a missing file sparse at the disk's size, so absent
blocks mean someone truncated or removed the file under us.
"""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.agents.master_target.digestmap import DigestMap, NoMap
from siterecovery.common import blockhash, errors
from siterecovery.common.pb import replication_pb2 as rpb

B = blockhash.BLOCK_BYTES
D = blockhash.DIGEST_BYTES
ABSENT = blockhash.ABSENT


def target_hashes(
    path: Path, offset: int, block_count: int, disk_size: int, digests: DigestMap | NoMap | None = None
) -> rpb.BlockHashesReply:
    """The reply for a checked range (`blockhash.check_range`) of the disk file at `path`."""
    reply = rpb.BlockHashesReply(offset=offset, block_bytes=blockhash.BLOCK_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        reply.digests = blockhash.ABSENT * block_count
        return reply
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    try:
        st = os.fstat(fd)
        if digests is None or digests.identity != (st.st_dev, st.st_ino):
            out, present, size = blockhash.file_digests(fd, offset, block_count, disk_size)
        else:
            out, present, size = _mapped_digests(fd, offset, block_count, disk_size, digests)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        os.close(fd)
    reply.digests, reply.present_blocks = out, present
    reply.target_exists, reply.target_size_bytes = True, size
    return reply


def _mapped_digests(
    fd: int, offset: int, block_count: int, disk_size: int, digests: DigestMap | NoMap
) -> tuple[bytes, int, int]:
    """As `blockhash.file_digests`, with the known blocks taken from the map and only the others read."""
    file_size = os.lseek(fd, 0, os.SEEK_END)
    present_at = blockhash.present_end(file_size, offset, min(offset + block_count * B, disk_size))
    present = blockhash.blocks_of(present_at - offset)
    first = offset // B
    known, epoch = digests.lookup(first, present)
    out = bytearray(known)
    index = 0
    while index < present:  # each run of unknown blocks: read, hash, remember
        at = index * D
        if out[at:at + D] != ABSENT:
            index += 1
            continue
        run_end = index + 1
        while run_end < present and out[run_end * D:(run_end + 1) * D] == ABSENT:
            run_end += 1
        read = blockhash.range_digests(fd, offset + index * B, min(offset + run_end * B, present_at))
        out[at:run_end * D] = read
        digests.remember(epoch, first + index, read)
        index = run_end
    return bytes(out) + ABSENT * (block_count - present), present, file_size


def _unreadable(path: Path, exc: OSError) -> errors.Unavailable:
    return errors.Unavailable(
        f"reading target disk {path} failed: {exc.strerror or exc}",
        hint="check the datastore's disk; the source agent asks again by itself",
        code="target-read-failed",
    )
