"""Write capture: every write to a protected disk is journaled, in order, before it is acknowledged.

A `DiskCapture` is the NBD backend (see nbd.py) of one configured disk. While
the disk's pair replicates in nbd mode a `PairJournal` is attached to it. A
write (WRITE, WRITE_ZEROES, TRIM) is submitted without waiting
(`submit_write`, `submit_zeroes`: the NBD connection's reader thread does it)
and goes:

1. under the disk lock: queued, with its capture time (nothing else);
2. the disk's one committer thread, when writes are queued and none is held,
   takes every queued write under the disk lock and counts a commit in flight
   (so `quiesced()`, inside which seqs are taken too, waits); then it takes
   their seqs (consecutive, in queue order; a write longer than
   `FRAME_DATA_BYTES` gets one per frame), builds their frames
   (`frames.serialized_write`, `frames.zero_frame`), appends them to the journal
   with one write (synced only when a write in it asked for FUA, see
   "Write-back"), keeps them in memory for the shipper (`PairJournal.remember`),
   pwrites (or zeroes) each on the disk file in seq order;
3. the committer calls each write's `done` (the NBD connection notes the
   reply) and then each connection's `after` once (it sends the commit's
   replies with one send).

So a write costs one thread hand-off (reader to committer), and a commit
carries every write that arrived while the one before it ran. The journal
order is the seq order is the order the disk file saw, and a write the client
saw acknowledged is in the journal and on the disk file (in the page cache,
which outlives our process). FUA makes the commit's journal append durable;
FLUSH syncs the journal and fdatasyncs the disk file.
TRIM and WRITE_ZEROES both make the range read as zeros (a hole is punched
unless the client set NO_HOLE), so source and target agree on what a trimmed
range holds. While no pair is attached (a disk not replicated, or replicated in
scan mode) the committer writes straight to the file (one fdatasync per commit
when a write in it asked for FUA): nothing is journaled. `write`,
`write_zeroes` and `trim` are the same, waiting for the outcome. Reads
(`read`) are a pread on the caller's thread: a write is on the disk file before
it is acknowledged, so a read sees every acknowledged write.

`quiesced()` holds new writes back and waits until none is in flight: inside
it every seq handed out so far is journaled and on the disk file, and writes
submitted meanwhile wait in the queue without a seq (the committer takes
nothing while a hold lasts). The replicator reads initial-sync chunks, hashes
scan blocks and inserts tags there, so each is ordered exactly before or after
every write; `hold()`/`release()` do the same for a multi-VM barrier.

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

Write-back. A disk with a volatile write cache acknowledges a write once it
is in that cache and promises durability only for what a FLUSH covered or a
FUA write carried; the NBD export says it is such a disk (SEND_FLUSH,
SEND_FUA), and every file system and database issues those where it needs
them. So the journal's appends are synced only for FUA (and FLUSH syncs it):
a write is acknowledged after two writes into the page cache instead of a
sync (bench/RESULTS.md: fio's latency through the export). A kill -9 of this
process loses nothing by it: the page cache holds the journal and the disk
file as they were. A power loss or a kernel crash can: the journal may then
miss records (never below its last sync) whose writes reached the disk file,
or hold writes the disk file lost, and the process server may hold frames
the journal lost. That is detected, not guessed: `boot.json` in the pair's
directory holds the kernel's boot id (/proc/sys/kernel/random/boot_id) and
whether the journal was closed cleanly (synced). A journal found open under
another boot means the pair resynchronises: the replicator starts a delta
sync (delta.py: only blocks whose digest differs from the target's travel),
after the replay below, and `resync` stays set in `boot.json` until the
pair's state records that sync. Where the kernel has no boot id, every
commit is synced as before (`PairJournal.write_back` False).

Journal limit. A journal grows while the next hop does not keep up (a
process server away, or writes faster than the pipeline carries), and a full
state volume would make the guest's writes fail. So a pair's journal has a
limit: `limit_bytes` of unreleased records, and `reserve_fraction` of the
state volume kept free. A commit that would pass it is not journaled: its
writes go to the disk file and the blocks they touch are marked in the pair's
changed-block map (dirtymap.py); so is a commit the journal refused for want
of space. From then on the pair *tracks* (`PairJournal.tracking`): every
write is marked, none journaled, until its catch-up (catchup.py) has read
every marked block back into the journal, as the next hop acknowledges what
is there. The target holds a consistent but older disk while the pair tracks;
the catch-up's frames make it inconsistent until the last one, so the
catch-up brackets them in sync markers and no recovery point is taken
meanwhile (a sync under way waits with its INITIAL_DONE until nothing is
marked).

What a crash leaves behind, and how opening repairs it:

- after the journal fsync but before (or during) the pwrite: the write is in the
  journal, maybe not on the disk file. `attach` replays every unreleased frame
  onto the disk file in order (idempotent: the last write to each byte wins,
  exactly as before) and fsyncs it, before the NBD export serves anything.
- before the journal fsync: the write was never acknowledged; the journal's
  torn tail is truncated when the FrameLog opens.
- releasing: `release_through` fsyncs the disk file first and never releases a
  frame not yet written to it, so every released frame is durably on the disk.
  Acknowledged frames are released at most once per `RELEASE_INTERVAL`
  (`PairJournal.acknowledge`): a crash before that leaves acknowledged frames
  unreleased, which is harmless (`attach` replays them, idempotently; the
  process server ignores frames it already holds, and the shipper resumes after
  its durable seq). The pair's reported backlog counts frames above the
  acknowledged seq, not above the release mark.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from siterecovery.common import daemon, errors, frames
from siterecovery.common.framelog import PREALLOCATE_BYTES, RELEASE_BYTES, RELEASE_INTERVAL, FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .dirtymap import DIRTY_FILE, DirtyMap

log = get_logger(__name__)

LEASE_SPAN = 100_000
LEASE_FILE = "seq.json"
BOOT_FILE = "boot.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
JOURNAL_DIR = "journal"
# The largest write payload one frame carries (a gRPC message is at most 8 MiB).
FRAME_DATA_BYTES = 4 * 1024 * 1024
_ZERO_CHUNK = 1024 * 1024
# Releasing acknowledged frames (fsync of the disk file, of the release mark and of its directory)
# is paced by framelog's RELEASE_INTERVAL and RELEASE_BYTES (imported here, read at call time).
# Frames just journaled, kept in memory for the shipper (`PairJournal.remember`) up to this size.
RECENT_BYTES = 8 * 1024 * 1024
# The journal's limit is checked at most once per this many bytes journaled (or this often).
ROOM_CHECK_BYTES = 8 * 1024 * 1024
ROOM_CHECK_SECONDS = 0.5

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

    def __init__(
        self,
        directory: Path,
        pair_id: str,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        boot_id: str | None = None,
        limit_bytes: int = 0,
        reserve_fraction: float = 0.0,
    ) -> None:
        self.directory = Path(directory)
        self.pair_id = pair_id
        # The journal limit (0: none) and the share of the state volume kept free (module docstring).
        self.limit_bytes = limit_bytes
        self.reserve_fraction = reserve_fraction
        self.directory.mkdir(parents=True, exist_ok=True)
        # Write-back needs the kernel's boot id to tell, after a restart, whether a power loss
        # or a kernel crash may have taken journal records away (see "Write-back" above).
        self.boot_id = current_boot_id() if boot_id is None else boot_id
        self.write_back = bool(self.boot_id)
        self.resync_needed = _resync_needed(self.directory / BOOT_FILE, self.boot_id)
        # Only the last segment can hold records never synced (a roll syncs the segment it
        # leaves), so a power loss tears nothing but its tail, which opening truncates.
        self.log = FrameLog(self.directory / JOURNAL_DIR, segment_bytes=segment_bytes)
        self._write_boot(clean=False)
        self.lease = SeqLease(self.directory / LEASE_FILE)
        self.lease.skip_past(self.log.last_seq)
        # Every journaled frame <= applied_seq is on the disk file (set by the attached DiskCapture).
        self.applied_seq = self.log.last_seq
        # Journaled frames <= synced_seq are durable in the journal (FUA, FLUSH, or no write-back);
        # those <= disk_synced_seq durably on the disk file too. A tracked write syncs the disk
        # file first when the first is ahead (`DiskCapture._track`).
        self.synced_seq = self.disk_synced_seq = self.log.last_seq
        self.disk: DiskCapture | None = None
        # Set when a journaled frame could not be written to the disk file: nothing more is released.
        self.failed = ""
        # Called after every append (the shipper wakes up on it).
        self.on_append: Callable[[], None] = lambda: None
        self._acknowledged = 0  # the highest seq the next hop acknowledged (not persisted)
        self._released_at = float("-inf")  # time.monotonic() of the last release
        # Frames just journaled, serialized, for the shipper: every journaled frame with a seq
        # above _recent_floor is in _recent, in order (see `remember`).
        self._recent_lock = threading.Lock()
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0
        self._recent_floor = self.log.last_seq
        # Changed-block tracking (opened by `DiskCapture.attach`, which knows the disk's size).
        self.dirty: DirtyMap | None = None
        self.full_reason = ""  # why the pair last started tracking
        self.room = threading.Event()  # set when acknowledgements may have made room (the catch-up waits on it)
        self._full = False
        self._margin = ROOM_CHECK_BYTES * 4  # the state volume's free bytes above its reserve, last seen
        self._unchecked = 0
        self._checked_at = float("-inf")

    @property
    def tracking(self) -> bool:
        """Whether writes are marked in the changed-block map instead of journaled."""
        return self.dirty is not None and self.dirty.count > 0

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more may be journaled within the limit (checked every ROOM_CHECK_BYTES)."""
        if self.dirty is None:
            return True  # nothing to track with: journal as before the limit
        self._unchecked += nbytes
        every = min(ROOM_CHECK_BYTES, self._margin // 4)
        if self.limit_bytes:
            every = min(every, self.limit_bytes // 16)
        if self._unchecked < every and time.monotonic() - self._checked_at < ROOM_CHECK_SECONDS:
            return not self._full
        self._unchecked = 0
        self._checked_at = time.monotonic()
        reason = ""
        if self.limit_bytes and self.log.pending_bytes + nbytes > self.limit_bytes:
            if self._acknowledged > self.log.released_seq:
                self.release_through(self._acknowledged)  # acknowledged frames waiting for their release
            if self.log.pending_bytes + nbytes > self.limit_bytes:
                reason = f"the journal reached its limit of {self.limit_bytes // 2**20} MiB (journal_limit_bytes)"
        if not reason:  # the journal may write zeros ahead of its records (framelog.py, "Zeros ahead")
            reason = self.volume_short(nbytes + PREALLOCATE_BYTES)
        self._full = bool(reason)
        if reason:
            self.full_reason = reason
        return not reason

    def volume_short(self, nbytes: int) -> str:
        """Why journaling `nbytes` more would eat into the state volume's reserve ('' if it would not)."""
        if not self.reserve_fraction:
            return ""
        st = os.statvfs(self.directory)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        self._margin = max(0, int(free - total * self.reserve_fraction))
        if free - nbytes >= total * self.reserve_fraction:
            return ""
        return (f"the state volume has {free // 2**20} of {total // 2**20} MiB free, and journaling more would "
                f"leave less than the {self.reserve_fraction:.0%} kept free (journal_reserve_percent)")

    def append_read_back(self, records: list[tuple[int, bytes]]) -> None:
        """Journal frames read from the disk file (the catch-up's; call inside `DiskCapture.quiesced()`)."""
        self.log.append_serialized(records, durable=not self.write_back)
        if not self.write_back:
            self.synced_seq = records[-1][0]
        self.remember(records)
        if not self.failed:
            self.applied_seq = records[-1][0]
        self.on_append()

    def _write_boot(self, *, clean: bool) -> None:
        daemon.write_json_atomically(
            self.directory / BOOT_FILE,
            {"boot_id": self.boot_id, "clean": clean, "resync": self.resync_needed},
            mode=0o600,
        )

    def resync_recorded(self) -> None:
        """The pair's state now says it resyncs (saved): a restart need not be told again."""
        if self.resync_needed:
            self.resync_needed = False
            self._write_boot(clean=False)

    def flush(self) -> None:
        """Make every frame journaled so far durable (an NBD FLUSH), and what the changed-block map holds."""
        through = self.log.last_seq
        try:
            self.log.sync()
        except errors.SiteRecoveryError as exc:
            raise OSError(errno.EIO, exc.message) from exc
        self.synced_seq = max(self.synced_seq, through)
        if self.dirty is not None and self.dirty.count:
            self.dirty.sync()

    def remember(self, records: list[tuple[int, bytes]]) -> None:
        """The committer journaled `records` (seq, serialized frame): keep them for the shipper.

        The shipper used to read every frame back from the journal just written
        (a pread and a record hash each: 15 % of the source agent's GIL time
        under 16 KiB writes, bench/RESULTS.md); it takes them from here instead
        (`recent_from`) and reads the journal only for what is not here (after a
        reconnect, or when it fell more than RECENT_BYTES behind). What is
        remembered is journaled, though under write-back not necessarily synced:
        only a power loss can take it from the journal then, and that makes the
        pair resynchronise (module docstring, "Write-back").
        """
        with self._recent_lock:
            self._recent.extend(records)
            self._recent_bytes += sum(len(body) for _seq, body in records)
            while self._recent_bytes > RECENT_BYTES:
                seq, body = self._recent.popleft()
                self._recent_bytes -= len(body)
                self._recent_floor = seq

    def recent_from(self, seq: int) -> list[tuple[int, bytes]] | None:
        """Every remembered frame from `seq` on (handed over once: forgotten here), or None when
        journaled frames from `seq` on may be missing here (read them from the journal)."""
        with self._recent_lock:
            if seq <= self._recent_floor or not self._recent or self._recent[-1][0] < seq:
                return None
            recent = self._recent
            while recent[0][0] < seq:
                self._recent_floor = recent[0][0]
                self._recent_bytes -= len(recent.popleft()[1])
            out = list(recent)
            recent.clear()
            self._recent_bytes = 0
            self._recent_floor = out[-1][0]
            return out

    def _forget_recent(self) -> None:
        with self._recent_lock:
            self._recent.clear()
            self._recent_bytes = 0
            self._recent_floor = self.log.last_seq

    @property
    def acknowledged_seq(self) -> int:
        """The highest seq the next hop acknowledged in this run (0: none yet)."""
        return self._acknowledged

    def acknowledge(self, seq: int) -> None:
        """The next hop holds every frame <= seq: release them, now or within RELEASE_INTERVAL."""
        self._acknowledged = max(self._acknowledged, seq)
        self.release_due()
        if self.tracking:
            self.room.set()

    def release_due(self, *, now: bool = False) -> None:
        """Release what was acknowledged if the last release is RELEASE_INTERVAL old, or
        RELEASE_BYTES of acknowledged frames wait, or `now` (the shipper also calls it when idle)."""
        acknowledged = self._acknowledged
        log_ = self.log
        if acknowledged <= log_.released_seq:
            return
        if not now and time.monotonic() - self._released_at < RELEASE_INTERVAL:
            if log_.pending_bytes_through(acknowledged) < RELEASE_BYTES:
                return
        self._released_at = time.monotonic()
        self.release_through(acknowledged)

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
            self.disk_synced_seq = max(self.disk_synced_seq, seq)
        self.log.release_through(seq)

    def append(self, batch: list[rpb.Frame]) -> None:
        """Journal frames directly (tags and markers); call inside `DiskCapture.quiesced()`."""
        self.log.append(batch)
        self._forget_recent()  # these are not remembered: the shipper reads them from the journal
        if not self.failed:
            self.applied_seq = batch[-1].seq
        self.on_append()

    def close(self) -> None:
        """Sync what was written back and say so (a restart on another boot then needs no resync).

        The changed-block map too: once the journal is marked clean, a power loss no longer
        means a resync, so a mark lost from the page cache would be a block never sent."""
        try:
            self.log.sync()
            if self.dirty is not None:
                self.dirty.sync()
            if self.failed:  # the disk file may not hold what the journal says it does
                raise OSError(errno.EIO, self.failed)
            self._write_boot(clean=True)
        except (OSError, errors.SiteRecoveryError) as exc:
            log.warning("journal not synced at close; a power loss before the next start means a resync",
                        pair=self.pair_id, error=str(exc))
        self.log.close()
        if self.dirty is not None:
            self.dirty.close()
            self.dirty = None


def current_boot_id() -> str:
    """The running kernel's boot id ('' where there is none: no write-back then)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _resync_needed(path: Path, boot_id: str) -> bool:
    """Whether the journal in this directory may have lost records to a power loss or a kernel
    crash: it was in use (not closed cleanly) under another boot, or a resync found then
    is not yet recorded in the pair's state."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return False  # a new pair, or one journaled before write-back (every record synced)
    except ValueError:
        return True  # torn by the very crash it records
    if not isinstance(data, dict):
        return True
    if data.get("resync"):
        return True
    return not data.get("clean") and data.get("boot_id") != boot_id


# -- the captured disk -------------------------------------------------------------------


Done = Callable[[OSError | None], None]


@dataclass
class _Pending:
    offset: int
    length: int
    data: bytes | None  # None: zero the range
    punch: bool
    fua: bool
    captured_at: float
    done: Done
    # Called once per commit for each distinct `after` among the commit's writes, after every `done`.
    after: Callable[[], None] | None = None
    error: OSError | None = None


class DiskCapture:
    """One protected disk: the NBD backend, its lock, its committer and (when attached) its pair's journal."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # holds and in-flight commits changed
        self._work = threading.Condition(self._lock)  # the committer: writes queued, holds gone, closing
        self._holds = 0
        self._inflight = 0  # commits taken from the queue and not yet on the disk file
        self._journal: PairJournal | None = None
        self._queue: list[_Pending] = []
        self._committer: threading.Thread | None = None
        self._closing = False
        self.commits = 0  # group commits journaled (for measurements and the crash tests)
        self.committed_frames = 0
        # What the committer's groups looked like since the last "write commits" log line:
        # the NBD write path's latency follows them (bench/RESULTS.md, continuous).
        self._stats = _CommitStats()

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
        """Stop the committer (writes still queued fail with ESHUTDOWN) and close the disk file."""
        with self._lock:
            self._closing = True
            committer = self._committer
            self._work.notify_all()
        if committer is not None and committer is not threading.current_thread():
            committer.join()
        os.close(self._fd)

    # -- attaching a pair ----------------------------------------------------------
    def attach(self, journal: PairJournal) -> None:
        """Journal every write from now on; first replay what the journal holds unreleased."""
        with self.quiesced():
            if journal.dirty is None:
                journal.dirty = DirtyMap(journal.directory / DIRTY_FILE, self._size)
            replayed = self._replay(journal)
            os.fsync(self._fd)  # what a killed run left in the page cache is durable from here on
            journal.applied_seq = journal.synced_seq = journal.disk_synced_seq = journal.log.last_seq
            journal.disk = self
            self._journal = journal
        log.info("capturing writes", disk=self.name, pair=journal.pair_id, replayed_frames=replayed,
                 tracked_bytes=journal.dirty.dirty_bytes if journal.dirty is not None else 0)

    def detach(self) -> PairJournal | None:
        """Stop journaling; the disk file is synced first, so every frame the journal holds is
        durably on it (a restart skips replaying those a tracked write followed: `_replay`)."""
        with self.quiesced():
            journal, self._journal = self._journal, None
            if journal is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:  # the journal is not marked clean then: see PairJournal.close
                    journal.failed = journal.failed or f"syncing the disk file failed: {exc.strerror or exc}"
                journal.disk = None
        return journal

    def _replay(self, journal: PairJournal) -> int:
        """Put the journal's unreleased frames onto the disk file, except those a tracked write
        followed (all on the disk file already, and older than it: dirtymap.py, `applied_through`)."""
        first = journal.log.first_pending_seq
        if journal.dirty is not None and first is not None:
            first = max(first, journal.dirty.applied_through + 1)
            if first > journal.log.last_seq:
                return 0
        if first is None:
            return 0
        count = 0
        for frame in journal.log.read_from(first):
            frames.verify(journal.pair_id, frame)
            apply_frame(self._fd, frame)
            count += 1
        return count  # attach fsyncs the disk file after it

    # -- holding writes --------------------------------------------------------------
    @contextmanager
    def quiesced(self) -> Iterator[PairJournal | None]:
        """Hold new writes back and wait for those in flight; yields the attached journal.

        Inside, the disk file holds every write that has a seq, and no other
        seq can be taken: read the disk, take a seq, journal a tag. Writes
        submitted meanwhile wait in the queue, without a seq.
        """
        with self._cond:
            self._holds += 1
            try:
                self._cond.wait_for(lambda: self._inflight == 0)
                yield self._journal
            finally:
                self._unhold_locked()

    def hold(self) -> None:
        """Hold writes (until `release`) once those in flight are done: a multi-VM barrier."""
        with self._cond:
            self._holds += 1
            self._cond.wait_for(lambda: self._inflight == 0)

    def release(self) -> None:
        with self._cond:
            self._unhold_locked()

    def _unhold_locked(self) -> None:
        self._holds -= 1
        if not self._holds:
            self._work.notify()

    def read_locked(self, offset: int, length: int) -> bytes:
        """Read inside `quiesced()` (no lock taken here)."""
        return os.pread(self._fd, length, offset)

    # -- the NBD backend -------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def submit_write(
        self, offset: int, data: bytes, *, fua: bool, done: Done, after: Callable[[], None] | None = None
    ) -> None:
        """Queue a write; the committer calls `done(None)` once it is journaled and on the disk file,
        or `done(error)`. `data` must not change until then. Never blocks on the disk."""
        self._submit(_Pending(offset, len(data), data, False, fua, 0.0, done, after))

    def submit_zeroes(
        self, offset: int, length: int, *, fua: bool, punch: bool, done: Done,
        after: Callable[[], None] | None = None,
    ) -> None:
        """Queue making [offset, offset+length) read as zeros (WRITE_ZEROES, and TRIM with punch=True)."""
        self._submit(_Pending(offset, length, None, punch, fua, 0.0, done, after))

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        self._wait(lambda done: self.submit_write(offset, data, fua=fua, done=done), len(data))

    def write_zeroes(self, offset: int, length: int, *, fua: bool, punch: bool) -> None:
        self._wait(lambda done: self.submit_zeroes(offset, length, fua=fua, punch=punch, done=done), length)

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self.write_zeroes(offset, length, fua=fua, punch=True)

    def flush(self) -> None:
        """NBD FLUSH: every write acknowledged so far becomes durable (the journal first: a restart
        replays it onto the disk file)."""
        journal = self._journal
        applied = journal.applied_seq if journal is not None else 0
        if journal is not None:
            journal.flush()
        os.fdatasync(self._fd)
        if journal is not None:
            journal.disk_synced_seq = max(journal.disk_synced_seq, applied)

    def sync(self) -> None:
        os.fsync(self._fd)

    @staticmethod
    def _wait(submit: Callable[[Done], None], length: int) -> None:
        """Submit and wait for the outcome (the synchronous backend calls)."""
        if not length:
            return
        finished = threading.Event()
        outcome: list[OSError | None] = []

        def done(error: OSError | None) -> None:
            outcome.append(error)
            finished.set()

        submit(done)
        finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def _submit(self, item: _Pending) -> None:
        if not item.length:
            item.done(None)
            if item.after is not None:
                item.after()
            return
        with self._lock:
            if self._closing:
                raise OSError(errno.ESHUTDOWN, f"disk {self.name} is closed")
            item.captured_at = time.time()
            self._queue.append(item)
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name=f"commit-{self.name}", daemon=True)
                self._committer.start()
            elif len(self._queue) == 1 and not self._holds:
                self._work.notify()

    # -- the committer ----------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and (not self._queue or self._holds):
                    self._work.wait()
                batch, self._queue = self._queue, []
                if self._closing:
                    break
                journal = self._journal
                self._inflight += 1
            try:
                # Outside the lock but in flight: quiesced() callers, the only other seq takers, wait.
                started, started_wall = time.monotonic(), time.time()
                self._commit(journal, batch)
                self._stats.add(batch, started, started_wall)
            except BaseException as exc:  # the seq lease not persisted, or a bug: fail these writes, go on
                log.exception("committing writes failed", disk=self.name, error=str(exc))
                for item in batch:
                    item.error = OSError(errno.EIO, f"committing the write failed: {exc}")
            finally:
                with self._lock:
                    self._inflight -= 1
                    if not self._inflight:
                        self._cond.notify_all()
            self._finish(batch)
            self._stats.maybe_log(self.name)
        for item in batch:
            item.error = OSError(errno.ESHUTDOWN, f"disk {self.name} was closed before the write")
        self._finish(batch)

    @staticmethod
    def _finish(batch: list[_Pending]) -> None:
        afters: dict[Callable[[], None], None] = {}  # bound methods of one object compare equal
        for item in batch:
            try:
                item.done(item.error)
            except Exception as exc:
                log.exception("completing a write failed", error=str(exc))
            if item.after is not None:
                afters[item.after] = None
        for after in afters:
            try:
                after()
            except Exception as exc:
                log.exception("completing a write failed", error=str(exc))

    def _commit(self, journal: PairJournal | None, batch: list[_Pending]) -> None:
        """Journal `batch` (one append, synced for FUA), then apply it to the disk file in seq order;
        or, past the journal's limit, mark it in the changed-block map and apply it (`_track`)."""
        if journal is None:
            self._apply_all(batch, None)
            if any(item.fua for item in batch):
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    for item in batch:
                        if item.fua:
                            item.error = exc
            return
        if journal.tracking or not journal.has_room(sum(_journal_bytes(item) for item in batch)):
            self._track(journal, batch)
            return
        first = journal.lease.take(sum(_frame_count(item) for item in batch))
        batch_frames = _make_frames(journal.pair_id, batch, first)
        try:
            started = time.monotonic()
            durable = not journal.write_back or any(item.fua for item in batch)
            journal.log.append_serialized(batch_frames, durable=durable)
            if durable:
                journal.synced_seq = batch_frames[-1][0]
            self._stats.journal_seconds += time.monotonic() - started
        except errors.SiteRecoveryError as exc:
            if exc.code == "disk-full" and journal.dirty is not None:
                journal.full_reason = f"the state volume is full ({exc.message})"
                self._track(journal, batch)
                return
            failure = OSError(errno.ENOSPC if exc.code == "disk-full" else errno.EIO, exc.message)
            log.error("journaling writes failed", disk=self.name, pair=journal.pair_id, error=exc.message)
            for item in batch:
                item.error = failure
            return
        except OSError as exc:
            for item in batch:
                item.error = exc
            return
        journal.remember(batch_frames)
        self.commits += 1
        self.committed_frames += len(batch_frames)
        self._apply_all(batch, journal)
        if not journal.failed:
            journal.applied_seq = batch_frames[-1][0]
        journal.on_append()

    def _track(self, journal: PairJournal, batch: list[_Pending]) -> None:
        """Mark `batch`'s blocks in the changed-block map (first), then apply it to the disk file.

        The mark also moves the map's `applied_through`: a restart replays no journaled frame up
        to it, trusting the disk file to hold them. A power loss can take them from its page
        cache. With write-back that means a resync anyway (and a clean stop syncs the disk
        file, `detach`), except for the frames made durable (FUA, FLUSH): so when the journal
        holds durable frames the disk file may not (`synced_seq` > `disk_synced_seq`), the disk
        file is synced before the mark. Without write-back every commit is durable: the batch's
        writes are synced after it too.
        """
        dirty = journal.dirty
        assert dirty is not None
        every_commit = not journal.write_back
        starting = not dirty.count
        applied_through = journal.log.last_seq  # every journaled frame is on the disk file by now
        try:
            if journal.synced_seq > journal.disk_synced_seq:
                os.fdatasync(self._fd)
                journal.disk_synced_seq = applied_through
            for item in batch:
                dirty.mark(item.offset, item.length, applied_through)
            if every_commit:
                dirty.sync()
        except OSError as exc:
            for item in batch:
                item.error = exc
            return
        if starting:
            log.warning("journal full: tracking changed blocks instead; they are sent once the process server "
                        "catches up, and no recovery point is taken until then",
                        disk=self.name, pair=journal.pair_id, reason=journal.full_reason)
            journal.room.set()
        self._apply_all(batch, journal)
        if every_commit or any(item.fua for item in batch):
            try:
                os.fdatasync(self._fd)
                journal.disk_synced_seq = max(journal.disk_synced_seq, applied_through)
            except OSError as exc:
                for item in batch:
                    if every_commit or item.fua:
                        item.error = exc

    def _apply_all(self, batch: list[_Pending], journal: PairJournal | None) -> None:
        for item in batch:
            try:
                self._apply(item.offset, item.length, item.data, item.punch)
            except OSError as exc:
                if journal is not None:
                    # Journaled but not on the disk file: the next start replays it. Release nothing more.
                    journal.failed = f"writing the disk file failed: {exc.strerror or exc}"
                log.error("writing the disk file failed", disk=self.name, error=str(exc))
                item.error = exc

    def _apply(self, offset: int, length: int, data: bytes | None, punch: bool) -> None:
        if data is None:
            zero_range(self._fd, offset, length, punch=punch)
        else:
            _pwrite_all(self._fd, data, offset)


class _CommitStats:
    """Group commits of one disk since the last log line, logged at most every LOG_SECONDS:
    writes per commit, how long a commit took (journal append and sync, disk file
    writes), of which the journal's append and sync, and how long its writes had
    waited for it since they were submitted."""

    LOG_SECONDS = 10.0

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._commits = self._writes = 0
        self._commit_seconds = self._wait_seconds = self.journal_seconds = 0.0

    def add(self, batch: list[_Pending], started: float, started_wall: float) -> None:
        """One commit of `batch`, begun at `started` (monotonic) / `started_wall` (the clock of
        the writes' capture times)."""
        self._commits += 1
        self._writes += len(batch)
        self._commit_seconds += time.monotonic() - started
        self._wait_seconds += sum(max(0.0, started_wall - item.captured_at) for item in batch)

    def maybe_log(self, disk: str) -> None:
        now = time.monotonic()
        if now - self._since < self.LOG_SECONDS or not self._commits:
            return
        log.info("write commits", disk=disk, seconds=round(now - self._since, 1), commits=self._commits,
                 writes_per_commit=round(self._writes / self._commits, 2),
                 commit_ms=round(1000 * self._commit_seconds / self._commits, 2),
                 journal_ms=round(1000 * self.journal_seconds / self._commits, 2),
                 queued_ms=round(1000 * self._wait_seconds / max(1, self._writes), 2))
        self._since = now
        self._commits = self._writes = 0
        self._commit_seconds = self._wait_seconds = self.journal_seconds = 0.0


def _journal_bytes(item: _Pending) -> int:
    """About what `item` takes in the journal."""
    return (item.length if item.data is not None else 0) + 64 * _frame_count(item)


def _frame_count(item: _Pending) -> int:
    return 1 if item.data is None else -(-item.length // FRAME_DATA_BYTES)


def _make_frames(pair: str, batch: list[_Pending], seq: int) -> list[tuple[int, bytes]]:
    """(seq, serialized frame) of each frame of `batch`, seqs from `seq` on, in order (a write
    longer than FRAME_DATA_BYTES is several)."""
    out = []
    for item in batch:
        if item.data is None:
            frame = frames.zero_frame(pair, seq, item.offset, item.length, captured_at=item.captured_at)
            out.append((seq, frame.SerializeToString()))
            seq += 1
            continue
        view = memoryview(item.data)
        for start in range(0, item.length, FRAME_DATA_BYTES):
            out.append((seq, _write_body(pair, seq, item.offset + start, view[start:start + FRAME_DATA_BYTES],
                                         item.captured_at)))
            seq += 1
    return out


def _write_body(pair: str, seq: int, offset: int, data: memoryview, captured_at: float | None) -> bytes:
    # By hand, without a protobuf object (one copy of the data, the join; frames.serialized_write).
    return frames.serialized_write(pair, seq, offset, data, captured_at=captured_at)
