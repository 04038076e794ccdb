"""A pair's target disk as it was at a recovery point.

- "latest" (or an empty point) without `output_path` is the target disk
  itself: no copy, `copied` false. It is only consistent while nothing applies
  to it, so the answer is given under the pair's apply lock, and a caller that
  goes on to use the disk pauses the pair first: the master target refuses
  apply streams of a pair whose desired state is PAUSED.
- "latest" with `output_path` is a copy of the target as it is, made under
  the apply lock (a failover that gives the recovered VM disks of its own, so
  the replica stays the replica).
- an older point (a tag id) is a new file at `output_path`, which must lie in
  a datastore directory and must not exist yet. Under the apply lock the target
  is copied sparsely (copy_file_range over the SEEK_DATA/SEEK_HOLE extents) and
  the journal's end is noted (a *cut*: the end of the last commit); then,
  without the lock, every undo record newer than the point up to the cut is put
  back onto the copy, newest first, and the copy is flushed. Replication goes
  on during that second phase; pruning waits for it.

A failure leaves no partial output file behind.

`revert` puts the target disk itself back to an older point (failback to a
point before the latest: the failback pair's target is the VM's own disk).
The pair is paused and its stream ended first (pairs.py); under the apply lock
every undo record newer than the point is written onto the disk, newest first,
the disk is flushed, and `reverted.json` in the journal directory records the
point. From then on the pair refuses streams (its seq bookkeeping no longer
describes the disk); the workflow removes it next. A crash before the record is
written is repaired by running it again: writing the same undo records newest
first leaves every block as the oldest record newer than the point had it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from siterecovery.agents.master_target import blockio, paths
from siterecovery.agents.master_target.target import PairTarget
from siterecovery.common import errors
from siterecovery.common.daemon import fsync_dir
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

log = get_logger(__name__)

LATEST = "latest"


def materialize(
    target: PairTarget, point: str, output_path: str, datastore_dirs: Sequence[Path]
) -> rpb.MaterializeReply:
    latest = point in ("", LATEST)
    if latest and not output_path:
        return _latest(target)
    wanted = None if latest else target.find_point(point)
    if not latest and wanted is None:
        raise unknown_point(target, point)
    out = paths.inside(output_path, datastore_dirs, what="output_path")
    if out == target.target_path.resolve():
        raise errors.InvalidInput(
            f"output_path {output_path} is the target disk itself",
            hint="choose a new file name on the datastore", code="output-is-target",
        )
    blockio.make_dirs(out.parent)
    try:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise errors.Conflict(
            f"{out} exists already", hint="choose another output_path or remove that file", code="output-exists"
        ) from None
    started = time.monotonic()
    try:
        if wanted is None:
            reply = _copy_latest(target, fd)
            undone = 0
        else:
            undone = _copy_and_undo(target, wanted, fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        out.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_dir(out.parent)
    elapsed = time.monotonic() - started
    tag_id, seq = (reply.tag_id, reply.seq) if wanted is None else (wanted["tag_id"], wanted["seq"])
    log.info("point materialised", pair=target.pair_id, tag=tag_id or LATEST, seq=seq, path=str(out),
             bytes_undone=undone, seconds=round(elapsed, 3))
    return rpb.MaterializeReply(path=str(out), tag_id=tag_id, seq=seq, bytes_undone=undone, copied=True)


def _copy_latest(target: PairTarget, fd: int) -> rpb.MaterializeReply:
    with target.lock:
        reply = _latest_locked(target)
        blockio.copy_sparse(target.fd, fd, target.disk_size)
    return reply


def _latest(target: PairTarget) -> rpb.MaterializeReply:
    with target.lock:
        return _latest_locked(target)


def _latest_locked(target: PairTarget) -> rpb.MaterializeReply:
    if not target.state.get("ever_synced") or not target.synced:
        raise errors.PreconditionFailed(
            f"the target disk of pair {target.pair_id} is not usable until its initial sync is done",
            hint="wait until the pair is replicating", code="not-synced",
        )
    points = target.state["points"]
    newest = points[-1] if points and points[-1]["seq"] == target.applied_seq else None
    return rpb.MaterializeReply(
        path=str(target.target_path),
        tag_id=newest["tag_id"] if newest else "",
        seq=target.applied_seq,
        copied=False,
    )


def _copy_and_undo(target: PairTarget, point: dict, fd: int) -> int:
    journal = target.journal
    undone = 0
    with contextlib.ExitStack() as stack:
        with target.lock:
            if target.find_point(point["tag_id"]) is None:  # pruned while we waited
                raise unknown_point(target, point["tag_id"])
            cut = journal.cut()
            blockio.copy_sparse(target.fd, fd, target.disk_size)
            stack.enter_context(journal.reading())
        for ref, data in journal.undo_after(point["seq"], cut):
            if data is None:
                blockio.zero_range(fd, ref.target_offset, ref.length)
            else:
                blockio.pwrite_all(fd, data, ref.target_offset)
            undone += ref.length
    return undone


def revert(target: PairTarget, point: str) -> rpb.MaterializeReply:
    if point in ("", LATEST):
        return _latest(target)
    with target.lock:
        done = target.reverted_to()
        if done is not None:
            if done["tag_id"] != point:
                raise errors.Conflict(
                    f"the target of pair {target.pair_id} was put back to point {done['tag_id']} already",
                    hint="remove the pair; create a new one to replicate again", code="pair-reverted",
                )
            return rpb.MaterializeReply(path=str(target.target_path), tag_id=done["tag_id"], seq=done["seq"],
                                        bytes_undone=done["bytes_undone"], copied=False)
        wanted = target.find_point(point)
        if wanted is None:
            raise unknown_point(target, point)
        if target.views:
            # A view reads unchanged blocks from the target: writing it without journaling
            # would change what the view shows.
            raise errors.Conflict(
                f"pair {target.pair_id} has {len(target.views)} point view(s) open; its disk cannot be put back "
                "in place meanwhile",
                hint="close them first (`srctl recovery-points close-view`)", code="views-open",
            )
        journal = target.journal
        cut = journal.cut()
        undone = 0
        with journal.reading(), target.digests.writing() as digests:
            for ref, data in journal.undo_after(wanted["seq"], cut):
                digests.forget(ref.target_offset, ref.length)  # before the block changes (digestmap.py)
                if data is None:
                    blockio.zero_range(target.fd, ref.target_offset, ref.length)
                else:
                    blockio.pwrite_all(target.fd, data, ref.target_offset)
                undone += ref.length
            os.fsync(target.fd)
        target.mark_reverted(wanted, undone)
    log.info("target put back to a point in place", pair=target.pair_id, tag=point, seq=wanted["seq"],
             bytes_undone=undone)
    return rpb.MaterializeReply(path=str(target.target_path), tag_id=wanted["tag_id"], seq=wanted["seq"],
                                bytes_undone=undone, copied=False)


def unknown_point(target: PairTarget, point: str) -> errors.NotFound:
    return target.unknown_point(point)
