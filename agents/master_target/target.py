"""One pair on the master target: its target disk, its undo journal, its recovery points.

`PairTarget.apply` applies a batch of checked frames with write-ahead undo
(group commit):

1. for every write or zero frame, the range's old contents - the target as it
   was before the batch, overlaid with the new data of earlier frames of the
   same batch that overlap it, so each record is exact even inside a batch -
   are appended to the journal (journal.py), then the journal is flushed;
2. every frame is written to the target (zero ranges are punched as holes),
   then the target is flushed;
3. a commit record (applied seq, sync phase, counters, new recovery points) is
   appended and flushed; only then is the batch acknowledged.

The target file is `target_path` (created sparse at the disk size when
missing, or when empty: a hypervisor's new thin extent; never for a delta
pair, which compares an existing disk); the journal lives in `journal_dir` (layout in journal.py). Nothing
else is kept on disk: the pair's state is the journal's committed state.

Crash analysis (kill -9 or power loss at any moment; `open` runs recovery):

- before step 1 is flushed: the target is untouched; recovery puts back the
  undo tail (a no-op: those bytes still hold their old contents) and drops it.
- after step 1, during or after step 2, before the commit is durable: the
  target holds part of the batch; every changed byte is covered by a flushed
  undo record after the last commit, so recovery puts them back newest first
  and the target is exactly as at the committed `applied_seq`.
- after step 3: the batch is committed; the sender may not have its ack, and
  resends frames the receiver skips (seq <= applied_seq) but acknowledges.
- during recovery itself: putting back is idempotent; it is redone.

So the target is always exactly the disk at the committed `applied_seq`, the
seq the stream open reports as `durable_seq`.

**The first initial sync journals no undo.** Until the pair has seen
INITIAL_DONE once (`ever_synced`), the target is not a usable point, and
journaling the old contents of a whole disk's worth of first writes would only
cost space. Then a crash in steps 2-3 leaves the target holding part of a batch
beyond `applied_seq` with nothing to put back. That is harmless: the sender
resends every frame after `applied_seq` - the very same frames, from its spool -
and each write sets its whole range to fixed contents, so applying them again,
in order, over any mixture of their old and new contents yields exactly the
disk at the resent seq. Every byte the torn batch changed lies in some resent
frame's range. Batches are cut after every sync marker, so no batch mixes frames
with and without undo. Later resyncs (INITIAL_STARTED after the pair was
synced once) keep journaling, so older points stay reachable through them;
tags that arrive while a sync runs are not points and are dropped.

**A delta pair** (`delta`: failback to the original disk, reprotect onto an
existing replica) starts on a target file that already holds an older copy of
the disk, and its first sync sends only the blocks that differ (BlockHashes,
hashes.py). The file is used as it is: never truncated or recreated (a missing
one is created sparse, and then every block that is not all zeros is sent); one
whose size is not the disk's is refused (`target-size-mismatch`, with a hint to
resize it or to enable a full sync onto a new file): growing or cutting a disk
we did not write would hide the mistake of pointing the pair at the wrong file.
Its first sync journals no undo either, by the same rule: the pair's journal is
empty, the old contents are no recovery point of this pair, and the resend
argument above holds for delta frames as for any others (each sets its whole
range to fixed contents). The cost is that the disk's previous contents are
overwritten block by block as the differences arrive: whoever wants to keep
them (the disk as it was before a failback) copies or snapshots the file before
enabling the pair. Journaling them would keep only the overwritten blocks, yet
no point could name them, since a tag during a sync is not a point.

Locking: `lock` is the pair's apply lock; `apply`, recovery, pruning, the
copy phase of a materialisation and opening or closing a point view
(pitview.py) hold it. `status` reads a snapshot published
after every change and never waits for it.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.agents.master_target import blockio, journal
from siterecovery.agents.master_target.digestmap import DigestMap, NoMap
from siterecovery.agents.master_target.journal import RetentionFull, UndoJournal, UndoRef
from siterecovery.common import errors, pagecache
from siterecovery.common.daemon import fsync_dir, write_json_atomically
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

log = get_logger(__name__)

MiB = 1024 * 1024
DEFAULT_RETENTION_SECONDS = 86400
STATE_FORMAT = 1
SYNC_NONE, SYNC_STARTED, SYNC_DONE = "none", "started", "done"
RETENTION_FULL = "retention-full"
RESUME_HEADROOM = 4 * MiB
DATASTORE_FULL = "datastore-full"
# A group's undo records are written together up to this many bytes of old contents.
_UNDO_WRITE_BYTES = 4 * MiB
# A group's ranges up to this long are read ahead together before their undo records are made.
_PREFETCH_MAX = 1 * MiB
# Written when the disk was put back to a point in place (materialize.revert).
REVERTED = "reverted.json"


@dataclass(frozen=True)
class TargetOptions:
    """Tunables of the apply path (defaults suit production; tests shrink them)."""

    # A batch (one group commit) holds at most this many frames / payload bytes. Each group
    # costs three syncs (undo, target, commit), so when the process server has a backlog of
    # small writes the group size sets the pace: 64 frames of 16 KiB applied ~58 MB/s in the
    # continuous benchmark, a spool backlog that kept growing; 256 drained it (bench/RESULTS.md).
    # 512 was no faster and held 10-20 MiB more.
    batch_frames: int = 256
    batch_bytes: int = 8 * MiB
    # Journal segments are rotated past this size; pruning deletes whole segments.
    segment_bytes: int = 64 * MiB
    # Undo is not appended when the retention directory would keep less free space than this.
    reserve_bytes: int = 64 * MiB
    # How often the retention window is enforced (seconds).
    prune_interval: float = 60.0


DEFAULT_OPTIONS = TargetOptions()


class PairTarget:
    def __init__(
        self,
        *,
        pair_id: str,
        target_path: Path,
        journal_dir: Path,
        disk_size: int,
        options: TargetOptions | None = None,
        clock: Callable[[], float] = time.time,
        delta: bool = False,
        digest_map: Path | None = None,
    ) -> None:
        self.pair_id = pair_id
        # The pair's first sync is a delta sync onto a disk that existed before it.
        self.delta = delta
        self.target_path = target_path
        self.journal_dir = journal_dir
        # Where the target file's digest map lives (digestmap.py); None keeps none.
        self.digest_map_path = digest_map
        self.digests: DigestMap | NoMap = NoMap()
        self.disk_size = disk_size
        self.options = options = options or DEFAULT_OPTIONS
        self.clock = clock
        self.lock = threading.Lock()
        # Notified whenever the committed state changes (`wait_applied`).
        self._published = threading.Condition()
        self.retention_window = DEFAULT_RETENTION_SECONDS
        # The apply stream that owns the pair now; an older stream finds it replaced.
        self.owner: object | None = None
        # (reason_code, reason) while PAUSED / ERROR.
        self.paused: tuple[str, str] | None = None
        self.error: tuple[str, str] | None = None
        # Tests set this to kill the process at a named step ("undo-record", "undo-synced",
        # "target-frame", "target-synced", "committed", "rollback-record").
        self.crash_hook: Callable[[str], None] | None = None
        # Called when the state, reason or number of points changes (say, to heartbeat now).
        self.on_change: Callable[[], None] | None = None
        self._published_key: tuple[Any, ...] = ()
        self.state: dict[str, Any] = {}
        self._fd = -1
        self._journal = UndoJournal(
            journal_dir, segment_bytes=options.segment_bytes, reserve_bytes=options.reserve_bytes
        )
        self._last_prune = 0.0
        self._snapshot: tuple[dict[str, Any], int] = ({}, 0)
        self.opened = False
        # Undo records of an unfinished batch put back by the last open (crash recovery).
        self.rolled_back_at_open = 0
        # Open point views (pitview.py), by view id; closed with the pair.
        self.views: dict[str, Any] = {}

    # -- opening -----------------------------------------------------------------
    def open(self) -> None:
        """Open (creating the target sparse when missing) and recover to the committed state."""
        with self.lock:
            self._open_locked()

    def _open_locked(self) -> None:
        try:
            self._open_and_recover()
        except errors.SiteRecoveryError as exc:
            self.error = (exc.code, str(exc))
            self._publish()
            raise
        except OSError as exc:
            error = errors.Unavailable(
                f"pair {self.pair_id} cannot be opened: {exc}",
                hint="check the datastore and retention directories; the pair is opened again at the next stream",
                code="pair-open-failed",
            )
            self.error = (error.code, str(error))
            self._publish()
            raise error from exc

    def _open_and_recover(self) -> None:
        self._close_locked()
        created = self._open_target()
        try:
            self._open_digests(created)
            state, uncommitted = self._journal.open(self._initial_state())
            if state.get("pair_id") != self.pair_id:
                raise errors.Conflict(
                    f"journal directory {self.journal_dir} belongs to pair {state.get('pair_id')!r}, "
                    f"not {self.pair_id}",
                    hint="each pair needs its own journal directory",
                    code="journal-other-pair",
                )
            if int(state.get("disk_size", 0)) != self.disk_size:
                raise errors.PreconditionFailed(
                    f"the journal of pair {self.pair_id} is for a {state.get('disk_size')}-byte disk, "
                    f"not {self.disk_size}",
                    hint="a disk cannot change size under replication; re-create the pair",
                    code="disk-size-mismatch",
                )
            if created and int(state.get("applied_seq", 0)) > 0:
                if self._was_empty:  # not ours to remove: leave it as empty as it was
                    os.ftruncate(self._fd, 0)
                else:
                    os.unlink(self.target_path)
                raise errors.PreconditionFailed(
                    f"target disk {self.target_path} was missing, but the journal says frames up to "
                    f"{state['applied_seq']} were applied to it",
                    hint=f"move {self.journal_dir} away to start a full resynchronisation",
                    code="target-missing",
                )
            if uncommitted:
                log.info("rolling back an unfinished batch", pair=self.pair_id, records=len(uncommitted))
                self._put_back(uncommitted)
            self.rolled_back_at_open = len(uncommitted)
            self._journal.discard_uncommitted()
        except BaseException:
            self._close_locked()
            raise
        floor = self._journal.floor_seq
        state["points"] = [p for p in state.get("points", []) if p["seq"] >= floor]
        self.state = state
        self.error = None
        self.opened = True
        self._publish()
        log.info("pair opened", pair=self.pair_id, applied_seq=state["applied_seq"], sync=state["sync"],
                 points=len(state["points"]), journal_bytes=self._journal.size_bytes)

    def _open_digests(self, created: bool) -> None:
        """Open the target's digest map (before anything else writes the target: recovery does)."""
        if self.digest_map_path is None:
            return
        if created:  # a new file: whatever map is there describes another one
            self.digest_map_path.unlink(missing_ok=True)
        try:
            self.digests = DigestMap.open(self.digest_map_path, target_path=self.target_path, target_fd=self._fd,
                                          disk_size=self.disk_size)
            log.info("digest map opened", pair=self.pair_id, map=str(self.digest_map_path),
                     trusted=self.digests.opened_as == "trusted", reason=self.digests.opened_as)
        except (OSError, ValueError) as exc:
            # Without a map BlockHashes reads the disk; a map left on disk no longer matches
            # the file once we write it (its stamp), so it is never trusted later.
            log.warning("no digest map for this target; block hashes are read from the disk",
                        pair=self.pair_id, map=str(self.digest_map_path), error=str(exc))
            self.digests = NoMap()

    def _initial_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "pair_id": self.pair_id,
            "disk_size": self.disk_size,
            "applied_seq": 0,
            "applied_captured_at_ns": 0,
            "newest_captured_at_ns": 0,
            "sync": SYNC_NONE,
            "ever_synced": False,
            "applied_bytes_total": 0,
            "undo_bytes": 0,
            "undo_records": 0,
            "points": [],
        }

    def _open_target(self) -> bool:
        """Open the target disk; create it sparse when missing. True when created."""
        path = self.target_path
        created = False
        self._was_empty = False
        if not path.exists():
            blockio.make_dirs(path.parent)
            tmp = path.with_name(f".{path.name}.creating")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.disk_size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            created = True
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = blockio.device_size(self._fd)
        if size == 0 and self.disk_size and not self.delta and path.is_file():
            # An empty file is a disk never written (a hypervisor's new thin extent, say a new
            # VM's for failback): it gets the disk's size, sparse, and counts as created.
            os.ftruncate(self._fd, self.disk_size)
            os.fsync(self._fd)
            size, created, self._was_empty = self.disk_size, True, True
        if size != self.disk_size:
            os.close(self._fd)
            self._fd = -1
            hint = "remove or rename the file (it is not this pair's disk), then resume the pair"
            if self.delta:
                hint = (
                    f"a delta sync compares the existing disk with the source block by block, so both must be "
                    f"{self.disk_size} bytes: check that {path} is the right disk and resize it (qemu-img resize), "
                    "or disable the pair and enable a full sync onto a new file"
                )
            raise errors.PreconditionFailed(
                f"target disk {path} holds {size} bytes; pair {self.pair_id} needs {self.disk_size}",
                hint=hint,
                code="target-size-mismatch",
            )
        return created

    def close(self) -> None:
        with self.lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self.opened = False
        views, self.views = list(self.views.values()), {}
        for view in views:  # they read the files and watch the journal closed here
            view.close()
        self._journal.close()
        digests, self.digests = self.digests, NoMap()
        digests.close(self._fd)  # stamped with the file as we leave it
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def journal(self) -> UndoJournal:
        return self._journal

    @property
    def applied_seq(self) -> int:
        return int(self.state.get("applied_seq", 0))

    def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait up to `timeout` s for the frames through `seq` to be applied; whether they are."""
        with self._published:
            return self._published.wait_for(lambda: self.applied_seq >= seq, timeout)

    @property
    def synced(self) -> bool:
        return self.state.get("sync") == SYNC_DONE

    # -- put back in place (materialize.revert) -----------------------------------
    def reverted_to(self) -> dict[str, Any] | None:
        """The point the disk was put back to in place, or None."""
        try:
            return json.loads((self.journal_dir / REVERTED).read_text())
        except FileNotFoundError:
            return None

    def mark_reverted(self, point: dict[str, Any], bytes_undone: int) -> None:
        write_json_atomically(
            self.journal_dir / REVERTED,
            {"tag_id": point["tag_id"], "seq": point["seq"], "bytes_undone": bytes_undone},
        )

    # -- resuming after a pause --------------------------------------------------
    def ensure_ready(self) -> None:
        """At a stream open: reopen after an error, resume after a pause when space returned."""
        with self.lock:
            reverted = self.reverted_to()
            if reverted is not None:
                raise errors.PreconditionFailed(
                    f"the target of pair {self.pair_id} was put back to point {reverted['tag_id']} in place; "
                    "it takes no more frames",
                    hint="remove the pair; create a new one to replicate again", code="pair-reverted",
                )
            if self.error is not None or not self.opened:
                self._open_locked()
            if self.paused is None:
                return
            code, _reason = self.paused
            where = self.journal_dir if code == RETENTION_FULL else self.target_path.parent
            reserve = self.options.reserve_bytes if code == RETENTION_FULL else 0
            free = journal.free_bytes(where)
            # Room for a few frames' undo is enough to go on: batches that do not
            # fit are split (see _apply_group); the headroom keeps it from flapping.
            if free < reserve + min(self.options.batch_bytes, RESUME_HEADROOM):
                raise self._full_error(code, where, free)
            log.info("space returned; pair resumes", pair=self.pair_id, directory=str(where), free=free)
            self.paused = None
            self._publish()

    def _full_error(self, code: str, where: Path, free: int) -> errors.Unavailable:
        if code == RETENTION_FULL:
            return errors.Unavailable(
                f"pair {self.pair_id} is paused: the retention directory {where} is full "
                f"({free // MiB} MiB free) and the undo journal cannot grow",
                hint=f"free space in {where}, move the retention directory to a larger disk, or shorten the "
                "pair's retention window; replication resumes by itself when there is room",
                code=RETENTION_FULL,
            )
        return errors.Unavailable(
            f"pair {self.pair_id} is paused: the datastore holding {self.target_path} is full "
            f"({free // MiB} MiB free)",
            hint=f"free space on the datastore of {self.target_path}; replication resumes by itself",
            code=DATASTORE_FULL,
        )

    # -- applying ------------------------------------------------------------------
    def apply(self, batch: Sequence[tuple[rpb.Frame, bytes]], owner: object | None = None) -> int:
        """Apply checked frames (seq increasing, all above applied_seq); returns applied_seq.

        `batch` holds (frame, uncompressed payload) pairs that passed frames.validate and
        frames.verify. Raises errors.Unavailable when the pair is paused or the stream was
        replaced, with nothing of the failing group written.
        """
        with self.lock:
            if owner is not None and self.owner is not owner:
                raise errors.Unavailable(
                    f"the apply stream of pair {self.pair_id} was replaced by a newer one or stopped",
                    hint="the process server reconnects by itself", code="stream-replaced",
                )
            if not self.opened:
                raise errors.Unavailable(f"pair {self.pair_id} is not open", code="pair-closed")
            if self.error is not None:
                raise errors.Unavailable(self.error[1], code=self.error[0])
            if self.paused is not None:
                raise errors.Unavailable(self.paused[1], code=self.paused[0])
            try:
                group: list[tuple[rpb.Frame, bytes]] = []
                for item in batch:
                    if item[0].seq <= self.applied_seq or (group and item[0].seq <= group[-1][0].seq):
                        continue
                    group.append(item)
                    if item[0].WhichOneof("body") == "sync":  # cut after every sync marker
                        self._apply_group(group)
                        group = []
                if group:
                    self._apply_group(group)
                self._prune_if_due()
            except errors.SiteRecoveryError:
                raise
            except Exception as exc:
                log.error("apply crashed", pair=self.pair_id, exc_info=exc)
                self._undo_failed_batch()
                self._fail("internal", f"applying frames to pair {self.pair_id} failed unexpectedly: {exc}",
                           "see the master target's log; the pair is reopened at the next stream")
            return self.applied_seq

    def _apply_group(self, group: list[tuple[rpb.Frame, bytes]]) -> None:
        keep_undo = bool(self.state["ever_synced"])
        try:
            marks = self._journal_undo(group) if keep_undo else {}
            if keep_undo:
                self._journal.sync()
            self._hook("undo-synced")
        except RetentionFull as exc:
            self._journal.discard_uncommitted()
            if len(group) > 1:
                # Nothing was written yet. A smaller batch may fit: the pair is full
                # only when one frame's undo does not.
                half = len(group) // 2
                self._apply_group(group[:half])
                self._apply_group(group[half:])
                return
            self._pause(RETENTION_FULL, exc.directory, exc.free)
        except OSError as exc:
            # Nothing reached the target; whatever the journal kept is dropped at the next open.
            self._fail("journal-io", f"writing the undo journal in {self.journal_dir} failed: {exc}",
                       "check the retention directory's disk; the pair resumes at the next stream")
        try:
            with self.digests.writing() as digests:
                written: list[tuple[int, int, bytes | None]] = []
                for frame, data in group:
                    body = frame.WhichOneof("body")
                    if body == "write":
                        digests.forget(frame.write.offset, frame.write.length)
                        blockio.pwrite_all(self._fd, data, frame.write.offset)
                        written.append((frame.write.offset, frame.write.length, data))
                    elif body == "zero":
                        digests.forget(frame.zero.offset, frame.zero.length)
                        blockio.zero_range(self._fd, frame.zero.offset, frame.zero.length)
                        written.append((frame.zero.offset, frame.zero.length, None))
                    else:
                        continue
                    self._hook("target-frame")
                # fdatasync: the data and what reading it back needs (allocation, size), not the
                # timestamps; the digest map's clean stamp is taken after a full fsync (close).
                os.fdatasync(self._fd)
                self._hook("target-synced")
                digests.learn(self._fd, written)
            for offset, length, data in written:
                if data is not None and length >= pagecache.LARGE_WRITE:
                    pagecache.drop(self._fd, offset, length)  # durable now; pagecache.py says why
        except OSError as exc:
            self._undo_failed_batch()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._pause(DATASTORE_FULL, self.target_path.parent, blockio.free_bytes(self.target_path.parent))
            self._fail("target-io", f"writing target disk {self.target_path} failed: {exc}",
                       "check the datastore's disk; the pair resumes at the next stream")
        delta = self._delta(group, marks)
        try:
            self._journal.commit(delta)
        except (RetentionFull, OSError) as exc:
            self._undo_failed_batch()
            if isinstance(exc, RetentionFull):
                self._pause(RETENTION_FULL, exc.directory, exc.free)
            self._fail("journal-io", f"writing the undo journal in {self.journal_dir} failed: {exc}",
                       "check the retention directory's disk; the pair resumes at the next stream")
        self._hook("committed")
        self.state = journal.merge(self.state, delta)
        self._journal.maybe_rotate(self.state)
        self._publish()

    def _journal_undo(self, group: list[tuple[rpb.Frame, bytes]]) -> dict[int, tuple[int, int]]:
        """Append the undo records of a group; returns each tag's (undo bytes, records) mark.

        The records are gathered first and appended with one write (`append_undos`):
        reading the old contents looks at the target (which does not change until
        the records are synced) and the group's earlier frames, never the journal.
        The records before a tag are appended before its mark is taken."""
        marks: dict[int, tuple[int, int]] = {}
        earlier = _EarlierRanges()
        records: list[tuple[int, int, int, bytes | None]] = []
        held = 0
        self._prefetch_old(group)
        for frame, data in group:
            body = frame.WhichOneof("body")
            if body == "tag":
                self._append_undos(records)
                records, held = [], 0
                marks[frame.seq] = (
                    self.state["undo_bytes"] + self._journal.pending_bytes,
                    self.state["undo_records"] + self._journal.pending_records,
                )
                continue
            changed = _changed_range(frame)
            if changed is None:
                continue
            offset, length = changed
            end = offset + length
            for at in range(offset, end, journal.MAX_UNDO_CHUNK):
                n = min(journal.MAX_UNDO_CHUNK, end - at)
                old = self._old_contents(at, n, earlier.overlapping(at, n))
                records.append((frame.seq, at, n, old))
                held += 0 if old is None else n
                if held >= _UNDO_WRITE_BYTES:  # what is held in memory stays bounded
                    self._append_undos(records)
                    records, held = [], 0
            earlier.add(offset, length, data if body == "write" else None)
        self._append_undos(records)
        return marks

    def _prefetch_old(self, group: list[tuple[rpb.Frame, bytes]]) -> None:
        """Start reading every small range the group overwrites, all at once, before the undo
        reads take them one by one: the device then serves them side by side. A sync leaves
        the target out of the page cache (common/pagecache.py), so a random small write's old
        contents are usually on disk only: 69-75 us a 16 KiB read one after another, 21-26 us
        with the group read ahead (`bench/page_cache_folios.py`)."""
        for frame, _data in group:
            changed = _changed_range(frame)
            if changed is not None and changed[1] <= _PREFETCH_MAX:
                try:
                    blockio.read_ahead(self._fd, *changed)
                except OSError:
                    return  # only a hint

    def _append_undos(self, records: list[tuple[int, int, int, bytes | None]]) -> None:
        self._journal.append_undos(records)
        for _record in records:
            self._hook("undo-record")

    def _old_contents(self, offset: int, length: int, earlier: list[_Range]) -> bytes | None:
        """The range as it is just before the next frame: the target overlaid with the
        earlier frames of the batch that overlap it (`earlier`, in seq order)."""
        old = blockio.read_range(self._fd, offset, length)
        if not earlier:
            return old
        buf = bytearray(length) if old is None else bytearray(old)
        end = offset + length
        for f_off, f_len, data in earlier:
            lo, hi = max(offset, f_off), min(end, f_off + f_len)
            if data is not None:
                buf[lo - offset : hi - offset] = data[lo - f_off : hi - f_off]
            else:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        return None if blockio.is_zero(buf) else bytes(buf)

    def _delta(self, group: list[tuple[rpb.Frame, bytes]], marks: dict[int, tuple[int, int]]) -> dict[str, Any]:
        state = self.state
        sync, ever_synced = state["sync"], state["ever_synced"]
        newest = state["newest_captured_at_ns"]
        applied_bytes = state["applied_bytes_total"]
        known = {p["tag_id"] for p in state["points"]}
        added: list[dict[str, Any]] = []
        for frame, _data in group:
            captured = frame.captured_at.ToNanoseconds()
            newest = max(newest, captured)
            body = frame.WhichOneof("body")
            if body == "write":  # data that travelled; zeroed ranges move no data
                applied_bytes += frame.write.length
            if body == "sync":
                if frame.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED:
                    sync = SYNC_STARTED
                elif frame.sync.phase == rpb.SYNC_PHASE_INITIAL_DONE:
                    sync, ever_synced = SYNC_DONE, True
            elif body == "tag":
                tag = frame.tag
                if sync != SYNC_DONE or not ever_synced:
                    log.info("tag during a sync is not a recovery point", pair=self.pair_id, tag=tag.tag_id,
                             seq=frame.seq)
                elif tag.tag_id in known:
                    log.warning("duplicate tag id ignored", pair=self.pair_id, tag=tag.tag_id, seq=frame.seq)
                else:
                    undo_bytes, _records = marks.get(frame.seq, (state["undo_bytes"], state["undo_records"]))
                    known.add(tag.tag_id)
                    added.append({
                        "tag_id": tag.tag_id, "kind": int(tag.kind), "seq": frame.seq, "captured_at_ns": captured,
                        "group_id": tag.group_id, "note": tag.note, "on_demand": bool(tag.on_demand),
                        "undo_mark": undo_bytes,
                    })
        last = group[-1][0]
        return {
            "applied_seq": last.seq,
            "applied_captured_at_ns": last.captured_at.ToNanoseconds(),
            "newest_captured_at_ns": newest,
            "sync": sync,
            "ever_synced": ever_synced,
            "applied_bytes_total": applied_bytes,
            "undo_bytes": state["undo_bytes"] + self._journal.pending_bytes,
            "undo_records": state["undo_records"] + self._journal.pending_records,
            "points_added": added,
        }

    def _put_back(self, refs: Sequence[UndoRef]) -> None:
        """Restore the old contents of undo records onto the target, newest first; flush."""
        with self.digests.writing() as digests:
            for ref in reversed(refs):
                data = self._journal.read_undo(ref)
                digests.forget(ref.target_offset, ref.length)
                if data is None:
                    blockio.zero_range(self._fd, ref.target_offset, ref.length)
                else:
                    blockio.pwrite_all(self._fd, data, ref.target_offset)
                self._hook("rollback-record")
            os.fsync(self._fd)

    def _undo_failed_batch(self) -> None:
        """After a failure between the undo flush and the commit: put the target back."""
        try:
            self._put_back(self._journal.uncommitted())
            self._journal.discard_uncommitted()
        except OSError as exc:
            # The journal keeps the records; the next open puts them back.
            self._fail("target-io", f"rolling back a failed batch of pair {self.pair_id} failed: {exc}",
                       "check the datastore and retention disks; the pair recovers at the next stream")

    def _pause(self, code: str, where: Path, free: int) -> None:
        error = self._full_error(code, where, free)
        self.paused = (code, f"{error.message}; {error.hint}")
        self._publish()
        log.error("pair paused", pair=self.pair_id, code=code, directory=str(where), free=free)
        raise error

    def _fail(self, code: str, message: str, hint: str) -> None:
        self.error = (code, f"{message}; {hint}")
        self._publish()
        log.error("pair failed", pair=self.pair_id, code=code, error=message)
        raise errors.Unavailable(message, hint=hint, code=code)

    def _hook(self, step: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(step)

    # -- retention ---------------------------------------------------------------------
    def _prune_if_due(self) -> None:
        now = self.clock()
        if 0 <= now - self._last_prune < self.options.prune_interval:
            return  # (a clock stepped back makes it due at once rather than never)
        self._last_prune = now
        self.prune_locked(now)

    def prune_locked(self, now: float) -> int:
        """Enforce the retention window (call with `lock` held); returns segments deleted."""
        if not self.opened:
            return 0
        # The window ends at the older of two clocks: ours, and the source's newest
        # capture time. A clock stepped forward on either side alone (a bad NTP
        # server, a VM resumed) then expires nothing early; both must agree.
        newest_ns = int(self.state.get("newest_captured_at_ns", 0))
        reference_ns = min(int(now * 1e9), newest_ns) if newest_ns else int(now * 1e9)
        cutoff_ns = reference_ns - int(self.retention_window * 1e9)
        removed = self._journal.prune(cutoff_ns, self.state)
        if removed:
            floor = self._journal.floor_seq
            before = len(self.state["points"])
            self.state["points"] = [p for p in self.state["points"] if p["seq"] >= floor]
            log.info("recovery points expired", pair=self.pair_id, points=before - len(self.state["points"]))
            self._publish()
        return removed

    def maybe_prune(self) -> None:
        """From a timer or the heartbeat: prune when due, unless a batch holds the lock now."""
        if self.lock.acquire(blocking=False):
            try:
                self._prune_if_due()
            finally:
                self.lock.release()

    # -- reading ------------------------------------------------------------------------
    def find_point(self, tag_id: str) -> dict[str, Any] | None:
        return next((p for p in self.state.get("points", []) if p["tag_id"] == tag_id), None)

    def unknown_point(self, point: str) -> errors.NotFound:
        names = [p["tag_id"] for p in self.state.get("points", [])]
        listed = ", ".join(names[-20:]) + (f" (and {len(names) - 20} older)" if len(names) > 20 else "")
        return errors.NotFound(
            f"pair {self.pair_id} has no recovery point {point!r}; it has: {listed or 'none'}",
            hint="use \"latest\" or one of the listed tag ids", code="point-not-found",
        )

    def _publish(self) -> None:
        state = dict(self.state)
        state["points"] = list(self.state.get("points", []))
        self._snapshot = (state, self._journal.size_bytes if self.opened else 0)
        with self._published:
            self._published.notify_all()
        key = (self.error, self.paused, state.get("sync"), len(state["points"]))
        if key != self._published_key:
            self._published_key = key
            if self.on_change is not None:
                self.on_change()

    def status(self) -> rpb.PairStatus:
        state, journal_bytes = self._snapshot
        out = rpb.PairStatus(pair_id=self.pair_id)
        if self.error is not None:
            out.state = rpb.PAIR_STATE_ERROR
            out.reason_code, out.reason = self.error
        elif self.paused is not None:
            out.state = rpb.PAIR_STATE_PAUSED
            out.reason_code, out.reason = self.paused
        elif state.get("sync") == SYNC_DONE:
            out.state = rpb.PAIR_STATE_REPLICATING
        else:
            out.state = rpb.PAIR_STATE_INITIAL_SYNC
        if "applied_seq" not in state:  # never opened
            return out
        out.last_seq = state["applied_seq"]
        if state["applied_captured_at_ns"]:
            out.applied_captured_at.CopyFrom(_stamp(state["applied_captured_at_ns"]))
        out.journal_bytes = journal_bytes
        out.applied_bytes_total = state["applied_bytes_total"]
        out.points.extend(point_proto(p, state["undo_bytes"]) for p in state["points"])
        for view in sorted(self.views.values(), key=lambda v: v.opened_at):
            out.views.add(view_id=view.view_id, tag_id=view.tag_id, seq=view.seq,
                          opened_at=_stamp(int(view.opened_at * 1e9)))
        return out


def _changed_range(frame: rpb.Frame) -> tuple[int, int] | None:
    """(offset, length) of the target range a write or zero frame changes; None for others."""
    body = frame.WhichOneof("body")
    if body == "write":
        return frame.write.offset, frame.write.length
    if body == "zero":
        return frame.zero.offset, frame.zero.length
    return None


def _stamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def point_proto(point: dict[str, Any], undo_bytes_now: int) -> rpb.RecoveryPoint:
    return rpb.RecoveryPoint(
        tag_id=point["tag_id"],
        kind=point["kind"],
        seq=point["seq"],
        captured_at=_stamp(point["captured_at_ns"]),
        journal_bytes_back=undo_bytes_now - point["undo_mark"],
        group_id=point["group_id"],
        note=point["note"],
        on_demand=point["on_demand"],
    )


# (offset, length, data: None for a zeroed range) of a frame applied earlier in the batch.
_Range = tuple[int, int, "bytes | None"]


class _EarlierRanges:
    """The ranges a batch has written so far, found by the 1 MiB chunks they touch.

    An undo record must hold the range as the batch's earlier frames left it;
    looking at every earlier frame for every record made a batch quadratic in its
    frames (a third of the master target's Python time with 64 small writes per
    batch), while this looks only at those sharing a chunk.
    """

    CHUNK = MiB

    def __init__(self) -> None:
        self._ranges: list[_Range] = []
        self._by_chunk: dict[int, list[int]] = {}

    def add(self, offset: int, length: int, data: bytes | None) -> None:
        index = len(self._ranges)
        self._ranges.append((offset, length, data))
        for chunk in range(offset // self.CHUNK, (offset + length - 1) // self.CHUNK + 1):
            self._by_chunk.setdefault(chunk, []).append(index)

    def overlapping(self, offset: int, length: int) -> list[_Range]:
        """The earlier ranges that overlap [offset, offset + length), oldest first."""
        found: set[int] = set()
        for chunk in range(offset // self.CHUNK, (offset + length - 1) // self.CHUNK + 1):
            found.update(self._by_chunk.get(chunk, ()))
        end = offset + length
        out = []
        for index in sorted(found):
            f_off, f_len, data = self._ranges[index]
            if f_off < end and offset < f_off + f_len:
                out.append((f_off, f_len, data))
        return out
