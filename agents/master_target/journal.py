"""The undo journal of one pair: the old contents of everything the master target overwrote.

The master target applies a pair's frames to its target disk in batches. Before
any byte of the target changes, the bytes it will replace are appended here and
made durable (write-ahead undo); after the target is written and flushed a
commit record makes the batch's new state durable. A recovery point is then
"the target as it is, with every undo record newer than the point put back,
newest first" (see materialize.py), and crash recovery is "put back every undo
record after the last commit" (see target.py).

On-disk layout (`journal_dir`, by default `<retention_dir>/<pair_id>/`)::

    0000000001.seg          segments, numbered from 1, each appended to in order
    0000000002.seg          (only the newest one is ever written)
    .0000000003.seg.tmp     a segment being created; deleted on open

A segment is a sequence of records. Each record is a 20-byte header followed by
its body::

    "SRJ1" | kind u8 | 3 zero bytes | body length u32 | xxh3-64(kind, length, body) u64 | body

    kind 1 CHECKPOINT  JSON: the pair's whole state (applied seq, sync phase,
                       counters, every live recovery point). The first record of
                       every segment, and only there.
    kind 2 UNDO        seq u64 | target offset u64 | length u64 | flags u8 | 3 zero bytes |
                       fields sum u32 | old data
                       flags bit 0: the old contents were zeros; no data follows.
                       flags bit 1: "fields sum" is the CRC-32 of the 28 bytes before it
                       (seq to the zero bytes); without it (records written before
                       it existed) those 4 bytes are zero too.
                       A frame's range is cut into records of at most 4 MiB.
    kind 3 COMMIT      JSON: what one batch changed (the same keys as a checkpoint,
                       except "points", plus "points_added").

The state of the pair is the newest segment's checkpoint with its commits
merged in order (`merge`). Every undo record of segment N has a seq greater
than the `applied_seq` of N's checkpoint (segments are rotated only between
batches), so the records newer than seq S start in the last segment whose
checkpoint has `applied_seq <= S`, and pruning whole segments from the front
leaves every point with `seq >= applied_seq of the oldest checkpoint` complete.

What a crash at any point leaves behind:

- while undo records are appended, before the commit: a tail of undo records
  (possibly a torn last record) after the last commit. `open` returns those
  records as `uncommitted`; the caller puts them back onto the target (newest
  first) and then calls `discard_uncommitted`, which truncates the segment to
  the end of the last commit. Putting back is idempotent, so a crash while doing
  it only means doing it again.
- a torn commit record: same as above; the batch did not happen.
- while a new segment is created: a `.tmp` file, deleted on open; the previous
  segment still ends with the last commit.
- while pruning: some of the oldest segments are gone, the rest is intact.

Point views (pitview.py) read the journal while it grows. A view *pins* the
seq of its point (`pin`): pruning then keeps every segment that holds records
newer than that seq. It also *watches* the journal (`watch`): it is told of
every undo record as it is appended - before the target changes - and of every
commit and discard, so it can keep the pre-images of blocks the apply path
overwrites after the view was opened. Pins and watchers live in memory only:
after a restart there are no views.

A damaged record in the middle of the newest segment cannot be told from a torn
tail: everything from it on is treated as uncommitted. Damage in an older
segment is found (checksum) when a point is materialised or opened as a view
through it.

Why an undo record has a second, small checksum (the fields sum). Opening a
view indexes every undo record newer than the point; hashing each record's
old data at open cost as much CPU as everything else per record together. A
view checks the data of a record instead when a read first touches it
(`check_undo`, pitview.py): no byte is served before the record it comes from
was checked. That is only as safe as the index itself, because a byte the
index sends to the target disk is never checked against anything: a damaged
seq, target offset, length or flag would move a record's range silently (a
read of the true range would then serve the disk as it is now). So what the
index is built from must be checked at open, and it is, without the data:
the fields sum covers seq, target offset, length and flags; the header's
body length must then equal 32 + length (32 for zeros), so a garbage body
length cannot slip by (nor misplace the next record); a damaged kind fails
the record's full checksum (every record that is not an undo record with a
fields sum is checked in full at open, commits and older records included);
the magic is compared. What is left to the first read is the data and the
body checksum itself, and a damaged one fails that read (EIO, the segment
and offset logged), never serves wrong data. A record whose old contents
were zeros has no data: its fields sum checks all of it at open.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import xxhash

from siterecovery.agents.master_target import blockio
from siterecovery.common import errors
from siterecovery.common.daemon import fsync_dir
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

MAGIC = b"SRJ1"
_HEAD = struct.Struct("<4sB3xIQ")  # magic, kind, body length, checksum
_UNDO = struct.Struct("<QQQB7x")  # seq, target offset, length, flags (and the fields sum, not read here)
_FIELDS = struct.Struct("<QQQB3x")  # what the fields sum covers: the first 28 bytes of an undo body
KIND_CHECKPOINT = 1
KIND_UNDO = 2
KIND_COMMIT = 3
FLAG_ZEROS = 0x01
FLAG_FIELDS_SUM = 0x02
MAX_UNDO_CHUNK = 4 * 1024 * 1024
_MAX_BODY = 64 * 1024 * 1024
SUFFIX = ".seg"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# Module-level so tests can stand in for a full disk (see tests/unit/test_master_target_retention.py).
free_bytes = blockio.free_bytes
_pwritev = os.pwritev
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class RetentionFull(Exception):
    """The retention directory has no room for what a batch must journal."""

    def __init__(self, directory: Path, needed: int, free: int) -> None:
        super().__init__(f"{directory}: {needed} bytes needed, {free} free")
        self.directory = directory
        self.needed = needed
        self.free = free


@dataclass(frozen=True)
class UndoRef:
    """Where one undo record lies, and what it restores."""

    segment: int
    offset: int  # of the record's header within the segment
    body_length: int
    seq: int
    target_offset: int
    length: int
    zeros: bool

    @property
    def end(self) -> int:
        return self.offset + _HEAD.size + self.body_length

    @property
    def data_offset(self) -> int:
        """Where the old contents start within the segment (meaningless when `zeros`)."""
        return self.offset + _HEAD.size + _UNDO.size

    @property
    def stored_bytes(self) -> int:
        return 0 if self.zeros else self.length


@dataclass
class Segment:
    number: int
    path: Path
    # From its checkpoint: every undo record in this segment has a greater seq.
    applied_seq: int
    # From its checkpoint: the newest capture time of any frame applied before it.
    newest_captured_at_ns: int
    size: int


@dataclass(frozen=True)
class Cut:
    """A consistent end of the journal: the end of the last commit at some moment."""

    segment: int
    offset: int


def merge(state: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The state after a commit record `delta`."""
    out = dict(state)
    added = delta.get("points_added", [])
    out.update({k: v for k, v in delta.items() if k != "points_added"})
    out["points"] = [*state.get("points", []), *added]
    return out


def _checksum(kind: int, body_length: int, *parts: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(struct.pack("<BI", kind, body_length))
    for part in parts:
        h.update(part)
    return h.intdigest()


def _record(kind: int, *parts: bytes) -> list[bytes]:
    length = sum(len(p) for p in parts)
    return [_HEAD.pack(MAGIC, kind, length, _checksum(kind, length, *parts)), *parts]


def _segment_name(number: int) -> str:
    return f"{number:010d}{SUFFIX}"


def _first_record_end(fd: int) -> int:
    _magic, _kind, length, _sum = _HEAD.unpack(os.pread(fd, _HEAD.size, 0))
    return _HEAD.size + length


class _Torn(Exception):
    pass


def _read_record(fd: int, offset: int, file_size: int) -> tuple[int, bytes]:
    """(kind, body) of the record at `offset`, checked; _Torn when it is incomplete or damaged."""
    if offset + _HEAD.size > file_size:
        raise _Torn("incomplete header")
    magic, kind, length, checksum = _HEAD.unpack(os.pread(fd, _HEAD.size, offset))
    if magic != MAGIC or kind not in (KIND_CHECKPOINT, KIND_UNDO, KIND_COMMIT) or length > _MAX_BODY:
        raise _Torn("not a record header")
    if offset + _HEAD.size + length > file_size:
        raise _Torn("incomplete body")
    body = blockio.pread_all(fd, length, offset + _HEAD.size)
    if _checksum(kind, length, body) != checksum:
        raise _Torn("checksum mismatch")
    return kind, body


def _undo_ref(segment: int, offset: int, body: bytes | memoryview) -> UndoRef:
    seq, target_offset, length, flags = _UNDO.unpack_from(body)
    zeros = bool(flags & FLAG_ZEROS)
    if not zeros and len(body) - _UNDO.size != length:
        raise _Torn("undo record length does not match its data")
    return UndoRef(segment, offset, len(body), seq, target_offset, length, zeros)


class UndoWatcher(Protocol):
    """Told of the journal's changes, on the apply path (under the pair's lock); must be quick."""

    def undo_appended(self, ref: UndoRef) -> None: ...

    def committed(self) -> None: ...

    def discarded(self) -> None: ...


def _pruned(seq: int) -> errors.NotFound:
    return errors.NotFound(
        f"the undo journal no longer reaches back to seq {seq}",
        hint="the point fell out of the retention window; choose a newer point",
        code="point-pruned",
    )


# The scan of undo_extents_after reads segments in pieces of this size, into one reused buffer.
_SCAN_CHUNK = 4 * 1024 * 1024
# How many segments the scan's read-ahead thread may run ahead of the one being parsed.
READ_AHEAD_SEGMENTS = 2
_KIND_LENGTH = struct.Struct("<BI")
# A record's header and, when it is an undo record, its fixed fields: unpacked in one call.
_HEAD_UNDO = struct.Struct("<4sBxxxIQQQQB3xI")  # _HEAD, then _UNDO with its fields sum

# (start, end) on the target disk, the journal segment, where the old data of `start` lies in
# that segment or UNDO_ZEROS, and where the record's header lies when its data is still to
# be checked (`check_undo`) or UNDO_CHECKED: the shape extentmap.Extent takes.
UndoExtent = tuple[int, int, int, int, int]
UNDO_ZEROS = -1
UNDO_CHECKED = -1


class _ReadAhead:
    """Asks the kernel to read segments into the page cache (POSIX_FADV_WILLNEED, which
    returns at once unless the device's queue is full), on a thread of its own, at most
    `depth` segments ahead of the one being parsed (`reached`).

    The hints go in the largest pieces the kernel takes in one (blockio.read_ahead_chunk:
    8 MiB on this machine, not 128 KiB): between two of them the thread must take the
    GIL again, which the parsing thread holds most of the time (512 hints a segment at
    128 KiB; 8 at 8 MiB). A hint only: a segment that cannot be opened here is read (and
    its problem reported) by the parsing."""

    def __init__(self, wanted: list[tuple[Segment, int]], depth: int) -> None:
        self._wanted = wanted
        self._allowed = threading.Semaphore(depth + 1)
        self._stopped = False
        self._started = False
        self._thread = threading.Thread(target=self._run, name="journal-read-ahead", daemon=True)
        if depth > 0:
            self._thread.start()

    def _run(self) -> None:
        for segment, end in self._wanted:
            self._allowed.acquire()
            if self._stopped:
                return
            try:
                fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                blockio.read_ahead(fd, 0, end, blockio.read_ahead_chunk(fd))
            except OSError:
                pass
            finally:
                os.close(fd)

    def reached(self, segment: Segment) -> None:
        """The parsing starts `segment`: one more may be read ahead (the first is counted in)."""
        if self._started:
            self._allowed.release()
        self._started = True

    def close(self) -> None:
        self._stopped = True
        self._allowed.release()
        if self._thread.is_alive():
            self._thread.join()


class _RecordScanner:
    """The undo records of one segment with a seq above `after_seq`, from pieces of it read in
    order (`feed`); a record cut by the end of a piece is completed from the next one.

    What is checked here: every byte the index is built from (module docstring, "Why an
    undo record has a second, small checksum"). An undo record with a fields sum has its
    fields checked and its lengths compared, and its data is left to `check_undo` at the
    first read (its extent names the record); any other record (a commit, an undo record
    written before fields sums) is checked against its full checksum here. Written for
    speed: opening a point view costs this loop per record (one unpack of the header and
    the undo fields, one CRC-32 of 28 bytes)."""

    def __init__(self, segment: Segment, end: int, after_seq: int) -> None:
        self.segment = segment
        self.end = end
        self.after_seq = after_seq
        self._hasher = xxhash.xxh3_64()
        self._prefixes: dict[int, bytes] = {}
        self._carry = bytearray()  # the start of a record the last piece cut
        self._carry_at = 0  # its offset in the segment

    def feed(self, buf: bytes | bytearray, base: int, n: int, found: list[UndoExtent]) -> None:
        """Parse buf[:n], the segment's bytes from offset `base`; append to `found`."""
        at = 0
        if self._carry:
            at = self._complete(buf, n, found)
        stop = self._parse(buf, at, n, base, found)
        if stop < n:
            self._carry[:] = memoryview(buf)[stop:n]
            self._carry_at = base + stop

    def finish(self) -> None:
        """At the segment's end: a record left incomplete is damage."""
        if self._carry:
            raise _damaged(self.segment, self._carry_at)

    def _complete(self, buf: bytes | bytearray, n: int, found: list[UndoExtent]) -> int:
        """Complete the carried record from buf[:n]; how much of buf it took."""
        carry = self._carry
        head_size = _HEAD.size
        taken = 0
        if len(carry) < head_size:
            taken = min(head_size - len(carry), n)
            carry += memoryview(buf)[:taken]
            if len(carry) < head_size:
                return taken
        magic, _kind, length, _sum = _HEAD.unpack_from(carry)
        if magic != MAGIC or length > _MAX_BODY or self._carry_at + head_size + length > self.end:
            raise _damaged(self.segment, self._carry_at)
        more = min(head_size + length - len(carry), n - taken)
        carry += memoryview(buf)[taken : taken + more]
        taken += more
        if len(carry) == head_size + length:
            if self._parse(carry, 0, len(carry), self._carry_at, found) != len(carry):
                raise _damaged(self.segment, self._carry_at)
            carry.clear()
        return taken

    def _parse(self, buf: bytes | bytearray, at: int, limit: int, base: int, found: list[UndoExtent]) -> int:
        """Parse the whole records of buf[at:limit] (segment offset of buf[0]: `base`); returns
        where the first record not wholly inside starts."""
        head_undo, head, kind_length = _HEAD_UNDO.unpack_from, _HEAD.unpack_from, _KIND_LENGTH.pack
        head_size, undo_size, both_size = _HEAD.size, _UNDO.size, _HEAD_UNDO.size
        fields_size = _FIELDS.size
        crc32 = zlib.crc32
        hasher, prefixes = self._hasher, self._prefixes
        reset, update, digest = hasher.reset, hasher.update, hasher.intdigest
        append, segment, after_seq = found.append, self.segment.number, self.after_seq
        stop = self.end - base  # the segment's end, in buf's terms
        view = memoryview(buf)
        while True:
            if at + both_size <= limit:
                magic, kind, length, checksum, seq, target_offset, undo_length, flags, fields_sum = head_undo(buf, at)
            elif at + head_size <= limit:
                # an undo record ending inside buf has its fields here: this one is not one
                magic, kind, length, checksum = head(buf, at)
                seq = target_offset = undo_length = flags = fields_sum = 0
            else:
                return at
            record_end = at + head_size + length
            if magic != MAGIC or length > _MAX_BODY or record_end > stop:
                raise _damaged(self.segment, base + at)
            if record_end > limit:
                return at
            if kind == KIND_UNDO and flags & FLAG_FIELDS_SUM:
                # The fields, then the body length against them; the data waits for check_undo.
                fields_at = at + head_size
                if crc32(view[fields_at : fields_at + fields_size]) != fields_sum:
                    raise _damaged(self.segment, base + at)
                if flags & FLAG_ZEROS:
                    if length != undo_size:
                        raise _damaged(self.segment, base + at)
                    if seq > after_seq:
                        append((target_offset, target_offset + undo_length, segment, UNDO_ZEROS, UNDO_CHECKED))
                elif length - undo_size != undo_length:
                    raise _damaged(self.segment, base + at)
                elif seq > after_seq:
                    append((target_offset, target_offset + undo_length, segment, base + fields_at + undo_size,
                            base + at))
                at = record_end
                continue
            prefix = prefixes.get(length << 8 | kind)
            if prefix is None:
                prefix = prefixes[length << 8 | kind] = kind_length(kind, length)
            reset()
            update(prefix)
            update(view[at + head_size : record_end])
            if digest() != checksum:
                raise _damaged(self.segment, base + at)
            if kind == KIND_UNDO:
                if flags & FLAG_ZEROS:
                    if length < undo_size:
                        raise _damaged(self.segment, base + at)
                    if seq > after_seq:
                        append((target_offset, target_offset + undo_length, segment, UNDO_ZEROS, UNDO_CHECKED))
                elif length - undo_size != undo_length or length < undo_size:
                    raise _damaged(self.segment, base + at)
                elif seq > after_seq:
                    append((target_offset, target_offset + undo_length, segment, base + at + head_size + undo_size,
                            UNDO_CHECKED))
            at = record_end


def _damaged(segment: Segment, offset: int) -> errors.Integrity:
    return _damaged_at(segment.path, offset)


def _damaged_at(path: Path, offset: int) -> errors.Integrity:
    return errors.Integrity(
        f"undo journal segment {path} is damaged at offset {offset}",
        hint="points older than this offset cannot be opened or materialised; newer points are unaffected",
        code="journal-corrupt",
    )


def check_undo(fd: int, path: Path, offset: int) -> None:
    """Check the undo record whose header is at `offset` of the segment open as `fd` (`path`)
    against its full checksum: what a point view does at the first read of a record the
    scan left unchecked (UndoExtent's last field). Integrity (naming the segment and the
    offset) when it is damaged or cut short."""
    try:
        magic, kind, length, checksum = _HEAD.unpack(blockio.pread_all(fd, _HEAD.size, offset))
        if magic != MAGIC or kind != KIND_UNDO or length > _MAX_BODY:
            raise _damaged_at(path, offset)
        body = blockio.pread_all(fd, length, offset + _HEAD.size)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        raise _damaged_at(path, offset) from exc
    if _checksum(kind, length, body) != checksum:
        raise _damaged_at(path, offset)


class UndoJournal:
    """One pair's journal directory. Not thread-safe: the caller holds the pair's lock,
    except for `undo_after`/`read_undo` inside `reading()` and `undo_extents_after` of a
    pinned seq, which may run alongside appends, and `pin`/`unpin`, which lock for themselves."""

    def __init__(self, directory: Path, *, segment_bytes: int, reserve_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.reserve_bytes = reserve_bytes
        self.segments: list[Segment] = []
        self._fd = -1
        self._end = 0
        self._commit_end = 0
        self._pending: list[UndoRef] = []
        self.pending_bytes = 0
        self._readers = 0
        self._readers_lock = threading.Lock()
        # Seqs whose newer undo records pruning keeps (views), by holder.
        self._pins: dict[object, int] = {}
        # Told of undo appends, commits and discards (views; see the module docstring).
        self._watchers: list[UndoWatcher] = []

    # -- opening and recovery ------------------------------------------------
    def open(self, initial_state: dict[str, Any]) -> tuple[dict[str, Any], list[UndoRef]]:
        """The committed state and the undo records after the last commit (oldest first).

        The caller must put those records back onto the target, newest first, and
        then call `discard_uncommitted` before appending anything.
        """
        blockio.make_dirs(self.directory)
        for leftover in self.directory.glob(".*.tmp"):
            leftover.unlink()
        numbers = sorted(int(p.name[: -len(SUFFIX)]) for p in self.directory.glob(f"*{SUFFIX}")
                         if p.name[: -len(SUFFIX)].isdigit())
        if not numbers:
            self._create_segment(1, initial_state)
            numbers = [1]
        self.segments = []
        for number in numbers[:-1]:
            path = self.directory / _segment_name(number)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                state = self._checkpoint_at_start(fd, path, size)
            finally:
                os.close(fd)
            self.segments.append(self._segment(number, path, state, size))
        number = numbers[-1]
        path = self.directory / _segment_name(number)
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        state = self._checkpoint_at_start(self._fd, path, size)
        self.segments.append(self._segment(number, path, state, size))
        state, self._commit_end, self._end, self._pending = self._scan_tail(number, state, size)
        self.pending_bytes = sum(r.stored_bytes for r in self._pending)
        if self._end < size:
            log.warning("journal has a torn tail", directory=str(self.directory), segment=number,
                        discarded_bytes=size - self._end)
        return state, list(self._pending)

    def _segment(self, number: int, path: Path, state: dict[str, Any], size: int) -> Segment:
        return Segment(number, path, int(state.get("applied_seq", 0)),
                       int(state.get("newest_captured_at_ns", 0)), size)

    def _checkpoint_at_start(self, fd: int, path: Path, size: int) -> dict[str, Any]:
        try:
            kind, body = _read_record(fd, 0, size)
            if kind != KIND_CHECKPOINT:
                raise _Torn("the first record is not a checkpoint")
            return json.loads(body)
        except (_Torn, ValueError) as exc:
            raise errors.Integrity(
                f"undo journal segment {path} is damaged at its start ({exc})",
                hint="the pair's recovery points cannot be trusted: move the journal directory away "
                "and resynchronise the pair",
                code="journal-corrupt",
            ) from exc

    def _scan_tail(
        self, number: int, state: dict[str, Any], size: int
    ) -> tuple[dict[str, Any], int, int, list[UndoRef]]:
        """Read the newest segment: (state, end of last commit, end of valid records, undo after it)."""
        kind, body = _read_record(self._fd, 0, size)
        pos = commit_end = _HEAD.size + len(body)
        pending: list[UndoRef] = []
        while pos < size:
            try:
                kind, body = _read_record(self._fd, pos, size)
                if kind == KIND_UNDO:
                    pending.append(_undo_ref(number, pos, body))
                elif kind == KIND_COMMIT:
                    state = merge(state, json.loads(body))
                    pending = []
                    commit_end = pos + _HEAD.size + len(body)
                else:
                    raise _Torn("a checkpoint after the start of a segment")
            except (_Torn, ValueError, struct.error):
                break
            pos += _HEAD.size + len(body)
        return state, commit_end, pos, pending

    def _create_segment(self, number: int, state: dict[str, Any]) -> int:
        path = self.directory / _segment_name(number)
        tmp = self.directory / f".{path.name}.tmp"
        parts = _record(KIND_CHECKPOINT, json.dumps(state, separators=(",", ":")).encode())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            blockio.pwrite_all(fd, b"".join(parts), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.directory)
        return sum(len(p) for p in parts)

    # -- appending -------------------------------------------------------------
    def _append(self, parts: list[bytes], *, reserve: int) -> int:
        """Write a record at the end; returns where it starts. RetentionFull on no space."""
        size = sum(len(p) for p in parts)
        free = free_bytes(self.directory)
        if free < reserve + size:
            raise RetentionFull(self.directory, reserve + size, free)
        at = self._end
        try:
            written = 0
            for first in range(0, len(parts), _IOV_MAX):  # pwritev takes at most IOV_MAX buffers
                chunk = parts[first:first + _IOV_MAX]
                chunk_size = sum(len(p) for p in chunk)
                n = _pwritev(self._fd, chunk, at + written)
                if n < chunk_size:
                    blockio.pwrite_all(self._fd, memoryview(b"".join(chunk))[n:], at + written + n)
                written += chunk_size
        except OSError as exc:
            if exc.errno in _FULL:
                raise RetentionFull(self.directory, size, free_bytes(self.directory)) from exc
            raise
        self._end = at + size
        return at

    def append_undo(self, seq: int, offset: int, length: int, old: bytes | None) -> UndoRef:
        """Journal the old contents of [offset, offset+length) before frame `seq` overwrites
        it; `old` None means the range held zeros. Not durable until `sync`."""
        return self.append_undos([(seq, offset, length, old)])[0]

    def append_undos(self, records: Sequence[tuple[int, int, int, bytes | None]]) -> list[UndoRef]:
        """`append_undo` of each (seq, offset, length, old), in order, with one free-space
        check and one write (pwritev) for all of them.

        A group of 16 KiB frames paid a statvfs and a pwritev per record (about 10 us
        each; bench/RESULTS.md, "Small writes"). On RetentionFull
        or an error nothing of them counts as appended (part of them may be in the
        file past the last commit: `discard_uncommitted` cuts it off, as after a
        crash). Not durable until `sync`."""
        number = self.segments[-1].number
        parts: list[bytes] = []
        refs: list[UndoRef] = []
        at = self._end
        for seq, offset, length, old in records:
            data = b"" if old is None else old
            fields = _FIELDS.pack(seq, offset, length, FLAG_FIELDS_SUM | (FLAG_ZEROS if old is None else 0))
            fixed = fields + zlib.crc32(fields).to_bytes(4, "little")
            record = _record(KIND_UNDO, fixed, data)
            parts += record
            refs.append(UndoRef(number, at, len(fixed) + len(data), seq, offset, length, old is None))
            at += _HEAD.size + len(fixed) + len(data)
        if not refs:
            return refs
        self._append(parts, reserve=self.reserve_bytes)
        self._pending.extend(refs)
        self.pending_bytes += sum(ref.stored_bytes for ref in refs)
        for ref in refs:
            for watcher in self._watchers:
                watcher.undo_appended(ref)
        return refs

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def commit(self, delta: dict[str, Any]) -> None:
        """Append and flush a commit record: the batch's undo records become committed."""
        self._append(_record(KIND_COMMIT, json.dumps(delta, separators=(",", ":")).encode()), reserve=0)
        os.fdatasync(self._fd)
        self._commit_end = self._end
        self.segments[-1].size = self._end
        self._pending = []
        self.pending_bytes = 0
        for watcher in self._watchers:
            watcher.committed()

    def uncommitted(self) -> list[UndoRef]:
        return list(self._pending)

    @property
    def pending_records(self) -> int:
        return len(self._pending)

    def discard_uncommitted(self) -> None:
        """Drop everything after the last commit (after the caller put it back on the target)."""
        for watcher in self._watchers:  # first: they stop pointing at what is cut off next
            watcher.discarded()
        if os.fstat(self._fd).st_size != self._commit_end:
            os.ftruncate(self._fd, self._commit_end)
            os.fsync(self._fd)
        self._end = self._commit_end
        self.segments[-1].size = self._end
        self._pending = []
        self.pending_bytes = 0

    # -- segments ----------------------------------------------------------------
    def maybe_rotate(self, state: dict[str, Any]) -> None:
        if self._end >= self.segment_bytes:
            self.rotate(state)

    def rotate(self, state: dict[str, Any]) -> None:
        """Start a new segment whose checkpoint is `state` (the state after the last commit)."""
        assert not self._pending, "rotate only between batches"
        number = self.segments[-1].number + 1
        size = self._create_segment(number, state)
        path = self.directory / _segment_name(number)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fd
        self.segments.append(self._segment(number, path, state, size))
        self._end = self._commit_end = size

    def prune(self, cutoff_ns: int, state: dict[str, Any]) -> int:
        """Delete the oldest segments whose every frame was captured before `cutoff_ns`.

        Returns how many were deleted (0 while a point is being materialised). Segments
        a pinned seq needs (`pin`) are kept, and so are all after them.
        """
        with self._readers_lock:
            if self._readers:
                return 0
            keep_from = len(self.segments)
            if self._pins:
                keep_from = self._first_needed(min(self._pins.values()))
            expired = 0
            for index in range(min(keep_from, len(self.segments))):
                later = self.segments[index + 1] if index + 1 < len(self.segments) else None
                newest = later.newest_captured_at_ns if later else int(state.get("newest_captured_at_ns", 0))
                if newest >= cutoff_ns:
                    break
                expired += 1
            if expired == len(self.segments):
                if self._end <= _first_record_end(self._fd):
                    expired -= 1  # the active segment holds nothing but its checkpoint
                else:
                    self.rotate(state)
            doomed, self.segments = self.segments[:expired], self.segments[expired:]
            for segment in doomed:
                segment.path.unlink(missing_ok=True)
            if doomed:
                fsync_dir(self.directory)
                log.info("journal pruned", directory=str(self.directory), segments=len(doomed),
                         floor_seq=self.floor_seq)
            return len(doomed)

    def _first_needed(self, seq: int) -> int:
        """The index of the first segment holding undo records newer than `seq`."""
        older = [i for i, s in enumerate(self.segments) if s.applied_seq <= seq]
        return older[-1] if older else 0

    # -- pins and watchers (views) ------------------------------------------------
    def pin(self, holder: object, seq: int) -> None:
        """Keep every segment with undo records newer than `seq` until `unpin(holder)`.

        NotFound (`point-pruned`) when they are gone already."""
        with self._readers_lock:
            if not self.segments or self.segments[0].applied_seq > seq:
                raise _pruned(seq)
            self._pins[holder] = seq

    def unpin(self, holder: object) -> None:
        with self._readers_lock:
            self._pins.pop(holder, None)

    @property
    def pinned_seqs(self) -> list[int]:
        with self._readers_lock:
            return sorted(self._pins.values())

    def watch(self, watcher: UndoWatcher) -> None:
        """Tell `watcher` of every later undo append, commit and discard (call under the pair's lock)."""
        self._watchers.append(watcher)

    def unwatch(self, watcher: UndoWatcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def segment_path(self, number: int) -> Path:
        return self.directory / _segment_name(number)

    @property
    def floor_seq(self) -> int:
        """Points at or after this seq have every undo record they need."""
        return self.segments[0].applied_seq

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self.segments[:-1]) + self._end

    # -- reading -------------------------------------------------------------------
    def cut(self) -> Cut:
        assert not self._pending, "cut only between batches"
        return Cut(self.segments[-1].number, self._commit_end)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """While inside, no segment is pruned."""
        with self._readers_lock:
            self._readers += 1
        try:
            yield
        finally:
            with self._readers_lock:
                self._readers -= 1

    def read_undo(self, ref: UndoRef, fd: int | None = None) -> bytes | None:
        """The old contents an undo record holds (None: zeros), checked against its checksum."""
        own = fd is None
        if fd is None:
            if ref.segment == self.segments[-1].number:
                fd, own = self._fd, False
            else:
                fd = os.open(self.directory / _segment_name(ref.segment), os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = blockio.pread_all(fd, ref.end - ref.offset, ref.offset)
        finally:
            if own:
                os.close(fd)
        magic, kind, length, checksum = _HEAD.unpack_from(raw)
        body = memoryview(raw)[_HEAD.size:]
        if magic != MAGIC or kind != KIND_UNDO or length != ref.body_length or _checksum(kind, length, body) != checksum:
            raise errors.Integrity(
                f"undo journal record at {self.directory / _segment_name(ref.segment)}:{ref.offset} is damaged",
                hint="points older than this record cannot be materialised; newer points and the latest "
                "state are unaffected",
                code="journal-corrupt",
            )
        return None if ref.zeros else bytes(body[_UNDO.size:])

    def _refs(self, segment: Segment, fd: int, end: int) -> Iterator[UndoRef]:
        """Every undo record of a segment before `end`, oldest first (headers only)."""
        pos = _first_record_end(fd)
        probe = _HEAD.size + _UNDO.size
        while pos < end:
            raw = os.pread(fd, probe, pos)
            magic, kind, length, _sum = _HEAD.unpack_from(raw)
            if magic != MAGIC or pos + _HEAD.size + length > end:
                raise errors.Integrity(
                    f"undo journal segment {segment.path} is damaged at offset {pos}",
                    hint="points older than this offset cannot be materialised",
                    code="journal-corrupt",
                )
            if kind == KIND_UNDO:
                yield UndoRef(segment.number, pos, length, *self._undo_fields(raw))
            pos += _HEAD.size + length

    @staticmethod
    def _undo_fields(raw: bytes) -> tuple[int, int, int, bool]:
        seq, target_offset, length, flags = _UNDO.unpack_from(raw, _HEAD.size)
        return seq, target_offset, length, bool(flags & FLAG_ZEROS)

    def undo_after(self, seq: int, cut: Cut) -> Iterator[tuple[UndoRef, bytes | None]]:
        """Every committed undo record with a seq greater than `seq` up to `cut`, newest
        first, with its old contents. Call inside `reading()`."""
        segments = [s for s in self.segments if s.number <= cut.segment]
        if not segments or segments[0].applied_seq > seq:
            raise _pruned(seq)
        start = max(i for i, s in enumerate(segments) if s.applied_seq <= seq)
        for segment in reversed(segments[start:]):
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                end = cut.offset if segment.number == cut.segment else os.fstat(fd).st_size
                # Both passes below read in an order the kernel's readahead does not follow (a
                # header per record forwards, then whole records backwards), so cold each read
                # waited for the disk: asking for the segment up front makes them cache hits.
                blockio.read_ahead(fd, 0, end)
                refs = [r for r in self._refs(segment, fd, end) if r.seq > seq]
                for ref in reversed(refs):
                    yield ref, self.read_undo(ref, fd)
            finally:
                os.close(fd)

    def undo_extents_after(
        self, seq: int, cut: Cut, segments: list[Segment]
    ) -> Iterator[tuple[int, int, list[UndoExtent]]]:
        """Every committed undo record with a seq greater than `seq` up to `cut`, oldest first,
        each checked against its checksum, as (segment number, bytes read, extents) pieces;
        `segments` is the journal's list as it was at the cut.

        One sequential pass in large reads into one reused buffer (what reading the
        journal costs, and little more): the caller learns where each record's old
        contents lie, not the contents. The segments must be kept from pruning meanwhile
        (`pin`).

        The parsing reads on the calling thread; a thread of its own asks the kernel to
        read the segments ahead (`_ReadAhead`), so the parsing mostly finds them in the
        page cache while the disk goes on reading."""
        segments = [s for s in segments if s.number <= cut.segment]
        if not segments or segments[0].applied_seq > seq:
            raise _pruned(seq)
        start = max(i for i, s in enumerate(segments) if s.applied_seq <= seq)
        wanted = [(s, cut.offset if s.number == cut.segment else s.path.stat().st_size) for s in segments[start:]]
        buf = bytearray(_SCAN_CHUNK)
        view = memoryview(buf)
        ahead = _ReadAhead(wanted, READ_AHEAD_SEGMENTS)
        try:
            for segment, end in wanted:
                ahead.reached(segment)
                scanner = _RecordScanner(segment, end, seq)
                fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    for base in range(0, end, len(buf)):
                        n = min(len(buf), end - base)
                        blockio.pread_into(fd, view[:n], base)
                        found: list[UndoExtent] = []
                        scanner.feed(buf, base, n, found)
                        yield segment.number, n, found
                    scanner.finish()
                finally:
                    os.close(fd)
        finally:
            ahead.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
