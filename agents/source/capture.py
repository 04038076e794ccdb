"""Write capture: every write to a protected disk is journaled, in order, before it is acknowledged.

A `DiskCapture` is the NBD backend (see nbd.py) of one configured disk. While
the disk's pair replicates in nbd mode a `PairJournal` is attached to it, and a
write (WRITE, WRITE_ZEROES, TRIM) goes:

1. under the disk lock: take the next seq(s), build the frame(s)
   (`frames.write_frame`, `frames.zero_frame`; a write longer than
   `FRAME_DATA_BYTES` becomes several consecutive frames), queue them;
2. group commit: the first writer to find no commit running takes every frame
   queued so far, appends them to the journal with one fsync, then pwrites (or
   zeroes) each on the disk file in seq order, and wakes the writers it carried;
3. the NBD reply goes out.

So the journal order is the seq order is the order the disk file saw, and a
write the client saw acknowledged is in the journal on disk. FUA needs nothing
more (the journal is durable); FLUSH also fdatasyncs the disk file. TRIM and
WRITE_ZEROES both make the range read as zeros (a hole is punched unless the
client set NO_HOLE), so source and target agree on what a trimmed range holds.
While no pair is attached (a disk not replicated, or replicated in scan mode)
writes go straight to the file: nothing is journaled.

`quiesced()` holds new writes back and waits until none is in flight: inside
it every seq handed out so far is journaled and on the disk file. The
replicator reads initial-sync chunks, hashes scan blocks and inserts tags there,
so each is ordered exactly before or after every write.

On-disk layout of a pair (the replicator owns `<state_dir>/pairs/<pair_id>/`)::

    journal/    a FrameLog (common/framelog.py) of the pair's journaled frames
    seq.json    {"lease_until": N}: no seq above N has been handed out

Seq lease. Seqs are never reused, even across a crash. Not every frame is
journaled: initial-sync chunks, scan blocks and the end-of-sync marker are
volatile (regenerated from the disk after a restart) yet carry seqs, and the
process server may have made one durable and acknowledged it when the
acknowledgement was lost with our process. Restarting at "journal's last seq +
1" would hand such a seq out again; the process server, which ignores (but
acks) a frame whose seq it already holds, would silently drop the new frame.
So before handing out a seq above the persisted `lease_until`, the lease is
moved to `seq + LEASE_SPAN` (atomic replace + fsync); a restarted process
starts at `lease_until + 1`. Gaps are allowed; reuse is not.

What a crash leaves behind, and how opening repairs it:

- after the journal fsync but before (or during) the pwrite: the write is in the
  journal, maybe not on the disk file. `attach` replays every unreleased frame
  onto the disk file in order (idempotent: the last write to each byte wins,
  exactly as before) and fsyncs it, before the NBD export serves anything.
- before the journal fsync: the write was never acknowledged; the journal's
  torn tail is truncated when the FrameLog opens.
- releasing: `release_through` fsyncs the disk file first and never releases a
  frame not yet written to it, so every released frame is durably on the disk.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from siterecovery.common import daemon, errors, frames
from siterecovery.common.framelog import FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

log = get_logger(__name__)

LEASE_SPAN = 100_000
LEASE_FILE = "seq.json"
JOURNAL_DIR = "journal"
# The largest write payload one frame carries (a gRPC message is at most 8 MiB).
FRAME_DATA_BYTES = 4 * 1024 * 1024
_ZERO_CHUNK = 1024 * 1024

# -- zeroing ranges ------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_unsupported_modes: set[int] = set()


def _try_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    if mode in _unsupported_modes:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        _unsupported_modes.add(mode)
        return False
    raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int, *, punch: bool = True) -> None:
    """Make [offset, offset+length) read as zeros: punch a hole (unless `punch` is False),
    else zero it in place, else write zeros."""
    if punch and _try_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        return
    if _try_fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length):
        return
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)
        offset += n


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def apply_frame(fd: int, frame: rpb.Frame) -> None:
    """Put a write or zero frame's effect on the disk file (tags and markers change nothing)."""
    body = frame.WhichOneof("body")
    if body == "write":
        _pwrite_all(fd, frames.payload(frame), frame.write.offset)
    elif body == "zero":
        zero_range(fd, frame.zero.offset, frame.zero.length)


# -- the seq lease ---------------------------------------------------------------------


class SeqLease:
    """Hands out strictly increasing seqs that are never reused (see the module docstring)."""

    def __init__(self, path: Path, *, span: int = LEASE_SPAN) -> None:
        self.path = path
        self.span = span
        self._lock = threading.Lock()
        try:
            until = int(json.loads(path.read_text())["lease_until"])
        except FileNotFoundError:
            until = 0
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.Integrity(
                f"seq lease {path} is unreadable",
                hint="the file system damaged it; remove the pair's state to resynchronise it from scratch",
                code="seq-lease-damaged",
            ) from exc
        self._until = until
        self._next = until + 1

    @property
    def last_taken(self) -> int:
        """The highest seq handed out (or skipped) so far; 0 before any."""
        with self._lock:
            return self._next - 1

    def take(self, count: int = 1) -> int:
        """The first of `count` consecutive fresh seqs."""
        with self._lock:
            first = self._next
            last = first + count - 1
            if last > self._until:
                self._persist(last + self.span)
            self._next = last + 1
            return first

    def skip_past(self, seq: int) -> None:
        """Never hand out `seq` or anything below it."""
        with self._lock:
            if seq >= self._next:
                if seq > self._until:
                    self._persist(seq + self.span)
                self._next = seq + 1

    def _persist(self, until: int) -> None:
        daemon.write_json_atomically(self.path, {"lease_until": until}, mode=0o600)
        self._until = until


# -- a pair's journal --------------------------------------------------------------------


class PairJournal:
    """A pair's journal (FrameLog) and seq lease, in `directory` (see the module docstring)."""

    def __init__(self, directory: Path, pair_id: str, *, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = Path(directory)
        self.pair_id = pair_id
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = FrameLog(self.directory / JOURNAL_DIR, segment_bytes=segment_bytes)
        self.lease = SeqLease(self.directory / LEASE_FILE)
        self.lease.skip_past(self.log.last_seq)
        # Every journaled frame <= applied_seq is on the disk file (set by the attached DiskCapture).
        self.applied_seq = self.log.last_seq
        self.disk: DiskCapture | None = None
        # Set when a journaled frame could not be written to the disk file: nothing more is released.
        self.failed = ""
        # Called after every append (the shipper wakes up on it).
        self.on_append: Callable[[], None] = lambda: None

    def release_through(self, seq: int) -> None:
        """Acknowledged by the next hop: drop frames <= seq (never one not yet on the disk file)."""
        if self.failed:
            return
        disk = self.disk
        seq = min(seq, self.applied_seq if disk is not None else seq, self.log.last_seq)
        if seq <= self.log.released_seq:
            return
        if disk is not None:
            disk.sync()
        self.log.release_through(seq)

    def append(self, batch: list[rpb.Frame]) -> None:
        """Journal frames directly (tags and markers); call inside `DiskCapture.quiesced()`."""
        self.log.append(batch)
        if not self.failed:
            self.applied_seq = batch[-1].seq
        self.on_append()

    def close(self) -> None:
        self.log.close()


# -- the captured disk -------------------------------------------------------------------


@dataclass
class _Pending:
    frames: list[rpb.Frame]
    offset: int
    length: int
    data: bytes | None  # None: zero the range
    punch: bool
    done: bool = False
    error: OSError | None = None


class DiskCapture:
    """One protected disk: the NBD backend, its lock, and (when attached) its pair's journal."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._cond = threading.Condition()
        self._holds = 0
        self._inflight = 0
        self._journal: PairJournal | None = None
        self._queue: list[_Pending] = []
        self._leader = False
        self.commits = 0  # group commits done (for measurements)
        self.committed_frames = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def journal(self) -> PairJournal | None:
        return self._journal

    def close(self) -> None:
        os.close(self._fd)

    # -- attaching a pair ----------------------------------------------------------
    def attach(self, journal: PairJournal) -> None:
        """Journal every write from now on; first replay what the journal holds unreleased."""
        with self.quiesced():
            replayed = self._replay(journal)
            journal.applied_seq = journal.log.last_seq
            journal.disk = self
            self._journal = journal
        log.info("capturing writes", disk=self.name, pair=journal.pair_id, replayed_frames=replayed)

    def detach(self) -> PairJournal | None:
        with self.quiesced():
            journal, self._journal = self._journal, None
            if journal is not None:
                journal.disk = None
        return journal

    def _replay(self, journal: PairJournal) -> int:
        first = journal.log.first_pending_seq
        if first is None:
            return 0
        count = 0
        for frame in journal.log.read_from(first):
            frames.verify(journal.pair_id, frame)
            apply_frame(self._fd, frame)
            count += 1
        os.fsync(self._fd)
        return count

    # -- holding writes --------------------------------------------------------------
    @contextmanager
    def quiesced(self) -> Iterator[PairJournal | None]:
        """Hold new writes back and wait for those in flight; yields the attached journal.

        Inside, the disk file holds every write that has a seq, and no other
        seq can be taken: read the disk, take a seq, journal a tag.
        """
        with self._cond:
            self._holds += 1
            try:
                self._cond.wait_for(lambda: self._inflight == 0)
                yield self._journal
            finally:
                self._holds -= 1
                self._cond.notify_all()

    def hold(self) -> None:
        """Hold writes (until `release`) once those in flight are done: a multi-VM barrier."""
        with self._cond:
            self._holds += 1
            self._cond.wait_for(lambda: self._inflight == 0)

    def release(self) -> None:
        with self._cond:
            self._holds -= 1
            self._cond.notify_all()

    def read_locked(self, offset: int, length: int) -> bytes:
        """Read inside `quiesced()` (no lock taken here)."""
        return os.pread(self._fd, length, offset)

    # -- the NBD backend -------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        self._mutate(offset, len(data), data, punch=False, fua=fua)

    def write_zeroes(self, offset: int, length: int, *, fua: bool, punch: bool) -> None:
        self._mutate(offset, length, None, punch=punch, fua=fua)

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self._mutate(offset, length, None, punch=True, fua=fua)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def _mutate(self, offset: int, length: int, data: bytes | None, *, punch: bool, fua: bool) -> None:
        with self._cond:
            while self._holds:
                self._cond.wait()
            self._inflight += 1
            journal = self._journal
            try:
                if journal is not None:
                    self._capture(journal, _Pending([], offset, length, data, punch))
            except BaseException:
                self._done_locked()
                raise
        try:
            if journal is None:
                self._apply(offset, length, data, punch)
                if fua:
                    os.fdatasync(self._fd)
        finally:
            with self._cond:
                self._done_locked()

    def _done_locked(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._cond.notify_all()

    def _capture(self, journal: PairJournal, item: _Pending) -> None:
        """With the lock held: seq, frame, group commit. Returns once journaled and applied."""
        now = time.time()
        pair = journal.pair_id
        if item.data is None:
            item.frames = [frames.zero_frame(pair, journal.lease.take(), item.offset, item.length, captured_at=now)]
        else:
            pieces = range(0, item.length, FRAME_DATA_BYTES)
            seq = journal.lease.take(len(pieces))
            view = memoryview(item.data)
            item.frames = [
                frames.write_frame(
                    pair, seq + i, item.offset + start, bytes(view[start:start + FRAME_DATA_BYTES]), captured_at=now
                )
                for i, start in enumerate(pieces)
            ]
        self._queue.append(item)
        while not item.done:
            if self._leader:
                self._cond.wait()
                continue
            self._leader = True
            batch, self._queue = self._queue, []
            self._cond.release()
            try:
                self._commit(journal, batch)
            finally:
                self._cond.acquire()
                self._leader = False
                for pending in batch:
                    pending.done = True
                self._cond.notify_all()
        if item.error is not None:
            raise item.error

    def _commit(self, journal: PairJournal, batch: list[_Pending]) -> None:
        batch_frames = [f for item in batch for f in item.frames]
        try:
            journal.log.append(batch_frames)
        except errors.SiteRecoveryError as exc:
            failure = OSError(errno.ENOSPC if exc.code == "disk-full" else errno.EIO, exc.message)
            log.error("journaling writes failed", disk=self.name, pair=journal.pair_id, error=exc.message)
            for item in batch:
                item.error = failure
            return
        except OSError as exc:
            for item in batch:
                item.error = exc
            return
        self.commits += 1
        self.committed_frames += len(batch_frames)
        for item in batch:
            try:
                self._apply(item.offset, item.length, item.data, item.punch)
            except OSError as exc:
                # Journaled but not on the disk file: the next start replays it. Release nothing more.
                journal.failed = f"writing the disk file failed: {exc.strerror or exc}"
                log.error("writing the disk file failed", disk=self.name, error=str(exc))
                item.error = exc
        if not journal.failed:
            journal.applied_seq = batch_frames[-1].seq
        journal.on_append()

    def _apply(self, offset: int, length: int, data: bytes | None, punch: bool) -> None:
        if data is None:
            zero_range(self._fd, offset, length, punch=punch)
        else:
            _pwrite_all(self._fd, data, offset)
