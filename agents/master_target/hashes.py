"""MasterTarget.BlockHashes: the digests of a range of a pair's target disk (delta sync).

The pair's process server asks on behalf of the pair's source agent, which
compares them with its own blocks and sends only those that differ (see
agents/source/delta.py for the whole argument). Here the target file is read
through a descriptor of its own, without the pair's apply lock: a read that
overlaps a batch being applied sees each byte either before or after the
frame that writes it, and the delta sync is correct for any such mixture
(delta.py explains why), so applying never waits for hashing.

A block the file does not hold entirely (the file is missing, or shorter than
the disk) is reported as absent rather than hashed: `present_blocks` counts the
leading blocks that are there. The pair's target is normally opened first
(pairs.py), which creates a missing file sparse at the disk's size, so absent
blocks mean someone truncated or removed the file under us.
"""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.common import blockhash, errors
from siterecovery.common.pb import replication_pb2 as rpb


def target_hashes(path: Path, offset: int, block_count: int, disk_size: int) -> rpb.BlockHashesReply:
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
        digests, present, size = blockhash.file_digests(fd, offset, block_count, disk_size)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        os.close(fd)
    reply.digests, reply.present_blocks = digests, present
    reply.target_exists, reply.target_size_bytes = True, size
    return reply


def _unreadable(path: Path, exc: OSError) -> errors.Unavailable:
    return errors.Unavailable(
        f"reading target disk {path} failed: {exc.strerror or exc}",
        hint="check the datastore's disk; the source agent asks again by itself",
        code="target-read-failed",
    )
