"""A durable, append-only log of one pair's frames, kept in segment files.

The source agent keeps the frames it has not had acknowledged yet in one; the
process server spools each pair's frames in one until the master target has
them. Frames go in with strictly increasing `seq`; a reader gets them back in
order; `release_through(seq)` says frames up to `seq` are no longer needed.

On-disk layout (everything inside `directory`)::

    00000000000000000001.seg    segments, named by the seq of their first record
    00000000000000004711.seg    (20 decimal digits, so names sort like seqs)
    release.json                {"released_seq": N, "last_seq": M}

A segment is an 8-byte magic (``SRFLOG1\\n``) followed by records::

    u32 length | u64 seq | u64 xxh3-64 | body (length bytes)       little-endian

`body` is the serialized `rpb.Frame` (stored as given: the process server
stores compressed frames, the source uncompressed ones), or, when the log has
a cipher, that sealed with AES-GCM (common/sealing.py); the xxh3-64 covers
length, seq and body. `release.json` is replaced atomically (write a temporary
file, fsync, rename, fsync the directory). `last_seq` in it keeps the highest
seq ever appended once every segment holding it has been deleted.

Writing: `append` writes all its records with one `write` at the end of the
active segment and syncs once (group commit, `fdatasync`; see "Zeros ahead"); only then are they visible to
readers and counted. Before a batch, the writer rolls to a new segment when the
active one has reached `segment_bytes` (so a segment may pass it by one batch),
or when every record in the active one has been released. Releasing persists
the mark first and then deletes the segments whose records are all <= the mark
(the active segment is deleted by the writer when it rolls, never under it —
before it writes the new one, so a full disk gets that space back).

Writing back. `append(..., durable=False)` writes its records without the
sync and returns: they are visible to readers at once and survive the
process being killed (they are in the kernel's page cache), but not a power
loss or a kernel crash until `sync()` or the next durable append (which syncs
the segment, so everything before it too); rolling to a new segment syncs the
one left behind first. The source agent's journal appends this way (the NBD
client's FLUSH and FUA ask for durability; capture.py). After a power loss
such a log may have lost any of its unsynced records, not only a tail: a hole
mid-segment reads as a torn record and opening truncates there (the
records after it go too); the caller must not rely on them (capture.py
resynchronises the pair).

Zeros ahead. An append that grows the segment file makes its fsync commit
the file system's journal too (new size, new blocks): about 7.5 ms of a 10 ms
group commit of 16 KiB NBD writes on the loaded dev machine (bench/RESULTS.md,
continuous). So an append under `PREALLOCATE_BELOW` bytes that would grow the
file writes `PREALLOCATE_BYTES` of zeros after its records (in the same sync);
the appends after it overwrite those zeros, and `fdatasync` then has only
their data to write. Large appends (the full sync's 1 MiB frames) grow the
file as before: zeros written first would double their writes. So do appends
that are not `durable` (written back): no sync follows them, and zeros ahead
would double their writes for nothing (the source journal's 16 KiB writes:
bench/RESULTS.md, "Journal zeros"); the sync that comes later (a FLUSH)
commits the new size once for all of them. A segment's
zeros are truncated when the writer rolls to the next one (not synced), so the
last segment ends in zeros and, after a crash, an earlier one may: opening
takes zeros from a record boundary to the end of a file as that segment's end
(a zero header is never a record: seqs start at 1), in any segment, and keeps
the last segment's for the writer.

What a crash at any point leaves behind:

- mid-`append` (before its fsync returned): the last segment may end in a torn
  or garbled record, or a new segment may be shorter than its magic. Opening
  the log truncates that tail (logging a warning) or removes the empty segment.
  Every batch whose `append` returned is intact: it was fsynced first.
- mid-`release_through`: either the old or the new `release.json` (never half
  of one; a leftover ``.release.json.tmp`` is ignored and replaced), and maybe
  segments the mark already covers, which opening deletes.
- anything else found on open is damage, not a crash: a bad record, a seq out
  of order or a bad magic in any segment but the last, or an unreadable
  `release.json`, raises `errors.Integrity` naming the file. Nothing is guessed.

Opening verifies every record's hash in the last segment (where torn writes
are) and walks only the record headers of earlier ones, so opening a full spool
does not read all of it; `read_from` verifies each record's hash as it reads it
(and so does `read_serialized_from`, which hands the frame's bytes over unparsed).

Memory: 16 bytes of index per unreleased record (its seq and offset), never
frame data; a reader keeps a read-ahead window of about 1 MiB.

Threads: one writer (`append`) at a time, serialised by a lock anyway;
`release_through`, `read_from` (whose iterator may be consumed in another
thread and sees frames appended while it runs), `wait_for` and the status
properties may be called from any thread concurrently with it.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.common import errors, sealing
from siterecovery.common.daemon import fsync_dir
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.common.sealing import RecordCipher

log = get_logger(__name__)

MAGIC = b"SRFLOG1\n"
_HEADER = struct.Struct("<IQQ")
HEADER_SIZE = _HEADER.size
# A record larger than this is damage (a frame carries at most 32 MiB of data).
MAX_RECORD_BODY = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
MARK_FILE = "release.json"
SEGMENT_SUFFIX = ".seg"
_READ_WINDOW = 1024 * 1024
# Small appends go into zeros written ahead of them (see "Zeros ahead" in the module docstring):
# an append below PREALLOCATE_BELOW bytes that would grow the file writes this many zeros after
# itself, so the appends after it overwrite those zeros instead of growing the file.
# How often a log's owner releases what the next hop acknowledged (the source's journal, the
# process server's spool): a release writes and syncs the release mark and its directory, so
# per acknowledgement it cost tens of metadata syncs a second. At most once per
# RELEASE_INTERVAL seconds, or at once when the acknowledged, unreleased records take
# RELEASE_BYTES (`pending_bytes_through`).
RELEASE_INTERVAL = 1.0
RELEASE_BYTES = 64 * 1024 * 1024
PREALLOCATE_BYTES = 4 * 1024 * 1024
PREALLOCATE_BELOW = 1024 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _record_hash(length: int, seq: int, body: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(struct.pack("<IQ", length, seq))
    h.update(body)
    return h.intdigest()


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


@dataclass
class _Segment:
    path: Path
    first_seq: int
    seqs: array = field(default_factory=lambda: array("Q"))
    offsets: array = field(default_factory=lambda: array("Q"))
    size: int = len(MAGIC)  # end of the last complete record

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def end_of(self, index: int) -> int:
        return self.offsets[index + 1] if index + 1 < len(self.offsets) else self.size


class _Window:
    """Reads a segment through a small read-ahead window, never past `limit`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._start = 0
        self._data = b""

    def read(self, offset: int, length: int, limit: int) -> bytes:
        end = offset + length
        if self._start <= offset and end <= self._start + len(self._data):
            return self._data[offset - self._start : end - self._start]
        # A read larger than the window is read exactly (and returned without a copy).
        want = max(length, min(_READ_WINDOW, limit - offset))
        self._data = os.pread(self.fd, want, offset) if want > 0 else b""
        self._start = offset
        return self._data[:length]


class FrameLog:
    """See the module docstring for the layout, crash behaviour and threading."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        cipher: RecordCipher | None = None,
        seal: bool = True,
    ) -> None:
        if segment_bytes < 4096:
            raise errors.InvalidInput(f"segment_bytes {segment_bytes} is below 4096", code="config-range")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self._fsync = fsync
        # Opens sealed records (common/sealing.py) and, with `seal`, seals every
        # record appended from now on; sealed and plain records are both read back.
        self._cipher = cipher
        self._seal = seal and cipher is not None
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._append_lock = threading.Lock()
        self._release_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._released = 0
        self._last_seq = 0
        self._mark_last_seq = 0
        self._fd: int | None = None  # the active (last) segment, open for writing
        self._zeroed_end = 0  # the active segment's file size: its records, then zeros ahead
        # Records appended without a sync since the last one (`durable=False`), and whether
        # a segment was created since the directory was last synced.
        self._unsynced = False
        self._unsynced_dir = False
        self._broken: str = ""
        self._closed = False
        self._oldest: tuple[int, Timestamp] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._open()

    # -- opening -----------------------------------------------------------
    def _open(self) -> None:
        self._released, self._mark_last_seq = self._read_mark()
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
        for i, path in enumerate(paths):
            try:
                first = int(path.name[: -len(SEGMENT_SUFFIX)])
            except ValueError as exc:
                raise self._damage(path, "its name is not a sequence number") from exc
            segment = self._scan(path, first, last=i == len(paths) - 1)
            if segment is None:
                continue
            if self._segments and segment.first_seq <= self._segments[-1].last_seq:
                raise self._damage(path, "it overlaps the segment before it")
            self._segments.append(segment)
        self._last_seq = max(self._mark_last_seq, self._segments[-1].last_seq if self._segments else 0)
        for segment in list(self._segments[:-1]):
            if segment.last_seq <= self._released:
                self._unlink(segment)
        if self._segments:
            last = self._segments[-1]
            if last.seqs:
                # Reading the newest record proves, at once, that a sealed log has its key.
                self._read_record(last, len(last.seqs) - 1)
            self._fd = os.open(last.path, os.O_WRONLY)
            os.lseek(self._fd, last.size, os.SEEK_SET)
            self._zeroed_end = os.fstat(self._fd).st_size  # the zeros ahead of it are kept

    def _damage(self, path: Path, what: str) -> errors.Integrity:
        return errors.Integrity(
            f"frame log segment {path} is damaged: {what}",
            hint="the disk or filesystem damaged it; restore the file or re-protect the pair (full resync)",
            code="framelog-damaged",
        )

    def _read_mark(self) -> tuple[int, int]:
        path = self.directory / MARK_FILE
        try:
            data = json.loads(path.read_bytes())
            return int(data["released_seq"]), int(data["last_seq"])
        except FileNotFoundError:
            return 0, 0
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.Integrity(
                f"frame log release mark {path} is unreadable",
                hint="the disk or filesystem damaged it; re-protect the pair (full resync)",
                code="framelog-damaged",
            ) from exc

    def _scan(self, path: Path, first: int, *, last: bool) -> _Segment | None:
        """Index one segment; a torn tail of the last one is truncated."""
        segment = _Segment(path=path, first_seq=first)
        with open(path, "rb") as handle:
            fd = handle.fileno()
            file_size = os.fstat(fd).st_size
            magic = os.pread(fd, len(MAGIC), 0)
            if magic != MAGIC:
                if last and file_size <= len(MAGIC) and MAGIC.startswith(magic.rstrip(b"\0")):
                    log.warning("frame log: removing a segment torn before its first record", path=str(path))
                    self._unlink_path(path)
                    return None
                raise self._damage(path, "it does not start with the segment magic")
            window = _Window(fd)
            offset, prev = len(MAGIC), first - 1
            zeros_ahead = False  # the last segment's zeros ahead are kept for the writer
            while offset < file_size:
                problem, seq, length = self._check_record(window, offset, file_size, prev, verify=last)
                if problem and _zeros_to_end(fd, offset, file_size):
                    # Zeros written ahead of the records (a crash between a roll and the old
                    # segment's truncation leaves them in one that is not the last): the end.
                    if not last:
                        log.info("frame log: zeros ahead past the last record", path=str(path), offset=offset)
                    zeros_ahead = last
                    break
                if problem:
                    if not last:
                        raise self._damage(path, f"{problem} at offset {offset}")
                    log.warning(
                        "frame log: truncating a torn tail", path=str(path), offset=offset,
                        dropped_bytes=file_size - offset, reason=problem,
                    )
                    break
                segment.seqs.append(seq)
                segment.offsets.append(offset)
                offset += HEADER_SIZE + length
                prev = seq
        if offset < file_size and not zeros_ahead:
            self._truncate(path, offset)
        if not segment.seqs:
            if not last:
                raise self._damage(path, "it holds no records")
            log.warning("frame log: removing an empty last segment", path=str(path))
            self._unlink_path(path)
            return None
        if segment.seqs[0] != first:
            raise self._damage(path, f"its first record has seq {segment.seqs[0]}, its name says {first}")
        segment.size = offset
        return segment

    @staticmethod
    def _check_record(
        window: _Window, offset: int, limit: int, prev: int, *, verify: bool
    ) -> tuple[str, int, int]:
        """('', seq, length) for a good record at `offset`, else (what is wrong, 0, 0)."""
        if limit - offset < HEADER_SIZE:
            return "a record header is cut short", 0, 0
        if verify:
            header = window.read(offset, HEADER_SIZE, limit)
        else:
            header = os.pread(window.fd, HEADER_SIZE, offset)
        length, seq, digest = _HEADER.unpack(header)
        if length > MAX_RECORD_BODY:
            return f"a record states {length} bytes", 0, 0
        if offset + HEADER_SIZE + length > limit:
            return "a record is cut short", 0, 0
        if seq <= prev:
            return f"record seq {seq} does not follow {prev}", 0, 0
        if verify:
            body = window.read(offset + HEADER_SIZE, length, limit)
            if _record_hash(length, seq, body) != digest:
                return "a record fails its hash", 0, 0
        return "", seq, length

    def _truncate(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink_path(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self._fsync:
            fsync_dir(self.directory)

    def _unlink(self, segment: _Segment) -> None:
        self._segments.remove(segment)
        self._unlink_path(segment.path)

    # -- status ------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The highest seq ever appended (0: none), kept across releases and restarts."""
        with self._lock:
            return self._last_seq

    @property
    def released_seq(self) -> int:
        with self._lock:
            return self._released

    def _first_pending_locked(self, after: int | None = None) -> tuple[_Segment, int] | None:
        """The first record above `after` (default: the release mark) and not released."""
        above = self._released if after is None else max(after, self._released)
        for segment in self._segments:
            if segment.last_seq > above:
                return segment, bisect_right(segment.seqs, above)
        return None

    @property
    def first_pending_seq(self) -> int | None:
        """The seq of the oldest unreleased frame, or None when none is left."""
        with self._lock:
            found = self._first_pending_locked()
            return found[0].seqs[found[1]] if found else None

    @property
    def pending_frames(self) -> int:
        return self.pending_frames_after(None)

    def pending_frames_after(self, seq: int | None) -> int:
        """Unreleased frames above `seq` (None: all unreleased ones)."""
        with self._lock:
            found = self._first_pending_locked(seq)
            if found is None:
                return 0
            start = self._segments.index(found[0])
            return len(found[0].seqs) - found[1] + sum(len(s.seqs) for s in self._segments[start + 1 :])

    @property
    def pending_bytes(self) -> int:
        """Bytes on disk (headers included) of the unreleased records."""
        return self.pending_bytes_after(None)

    def pending_bytes_after(self, seq: int | None) -> int:
        """Bytes on disk (headers included) of the unreleased records above `seq` (None: all)."""
        with self._lock:
            found = self._first_pending_locked(seq)
            if found is None:
                return 0
            segment, index = found
            start = self._segments.index(segment)
            total = segment.size - segment.offsets[index]
            return total + sum(s.size - len(MAGIC) for s in self._segments[start + 1 :])

    def pending_bytes_through(self, seq: int) -> int:
        """Bytes on disk (headers included) of the unreleased records at or below `seq`."""
        return self.pending_bytes - self.pending_bytes_after(seq)

    @property
    def disk_bytes(self) -> int:
        """Bytes the segment files take, released records not yet deleted included."""
        with self._lock:
            return sum(s.size for s in self._segments)

    @property
    def oldest_pending_captured_at(self) -> Timestamp | None:
        """`captured_at` of the oldest unreleased frame (read from disk once, then cached)."""
        return self.oldest_captured_at_after(None)

    def oldest_captured_at_after(self, seq: int | None) -> Timestamp | None:
        """`captured_at` of the oldest unreleased frame above `seq` (None: of all; cached by seq)."""
        with self._lock:
            found = self._first_pending_locked(seq)
            if found is None:
                return None
            segment, index = found
            seq = segment.seqs[index]
            if self._oldest is None or self._oldest[0] != seq:
                frame = self._read_record(segment, index)
                self._oldest = (seq, frame.captured_at)
            out = Timestamp()
            out.CopyFrom(self._oldest[1])
            return out

    def _read_record(self, segment: _Segment, index: int) -> rpb.Frame:
        offset, end = segment.offsets[index], segment.end_of(index)
        with open(segment.path, "rb") as handle:
            data = os.pread(handle.fileno(), end - offset, offset)
        return self._parse(segment.path, offset, data)

    def _parse(self, path: Path, offset: int, record: bytes) -> rpb.Frame:
        seq, body = self._open_record(path, offset, record)
        try:
            frame = rpb.Frame.FromString(body)
        except DecodeError as exc:
            raise self._damage(path, f"the record at offset {offset} is not a frame") from exc
        if frame.seq != seq:
            raise self._damage(path, f"the record at offset {offset} holds frame {frame.seq}, not {seq}")
        return frame

    def _open_record(self, path: Path, offset: int, record: bytes) -> tuple[int, bytes | memoryview]:
        """(seq, the serialized frame) of a whole record: its hash checked, opened when sealed."""
        length, seq, digest = _HEADER.unpack_from(record)
        body = memoryview(record)[HEADER_SIZE : HEADER_SIZE + length]
        if len(body) != length or _record_hash(length, seq, body) != digest:
            raise self._damage(path, f"the record at offset {offset} fails its hash")
        if sealing.is_sealed(body):
            if self._cipher is None:
                raise errors.Integrity(
                    f"frame log {self.directory}: record {seq} is encrypted and no key is configured",
                    hint="configure the key this log was written with (spool_encryption and its key file)",
                    code="record-sealed-no-key",
                )
            return seq, self._cipher.open(self.directory.name, seq, bytes(body))
        return seq, body

    # -- appending ---------------------------------------------------------
    def append(self, frames: Sequence[rpb.Frame], *, durable: bool = True) -> None:
        """Write `frames` durably (one fsync); on return they survive a crash.

        Seqs must be strictly increasing and above `last_seq` (InvalidInput
        otherwise: a caller's bug). On a full disk raises Unavailable
        (`disk-full`) and leaves the log as it was. With `durable` False see
        "Writing back" in the module docstring.
        """
        self.append_serialized([(frame.seq, frame.SerializeToString()) for frame in frames], durable=durable)

    def append_serialized(self, frames: Sequence[tuple[int, bytes]], *, durable: bool = True) -> None:
        """`append` for frames the caller has serialized already: (seq, `Frame` bytes) each.

        The bytes must be the serialization of a frame with that seq (a reader
        checks it); the process server serializes each frame once, when it
        receives it, to know its size for the spool's bound.
        """
        if not frames:
            return
        with self._append_lock:
            self._check_writable()
            prev = self.last_seq
            records: list[bytes] = []
            seqs: list[int] = []
            for seq, body in frames:
                if seq <= prev:
                    raise errors.InvalidInput(
                        f"frame log {self.directory}: frame {seq} does not follow {prev}",
                        hint="frames must be appended with strictly increasing seq (a bug in the caller)",
                        code="seq-order",
                    )
                if self._seal:
                    body = self._cipher.seal(self.directory.name, seq, body)
                records.append(_HEADER.pack(len(body), seq, _record_hash(len(body), seq, body)))
                records.append(body)
                seqs.append(seq)
                prev = seq
            with self._lock:
                active = self._segments[-1] if self._segments else None
                spent = active is not None and active.last_seq <= self._released
                roll = active is None or active.size >= self.segment_bytes or spent
            if spent:
                # Every record in it is released (the mark, with last_seq, is on disk): delete it
                # before the new one is written, not after — on a full disk its space is what
                # the new batch needs, and a log that kept it would never take a frame again.
                with self._appended:
                    self._retire_active_locked()
            if roll:
                active = _Segment(path=self.directory / _segment_name(seqs[0]), first_seq=seqs[0])
            assert active is not None
            offsets = array("Q")
            end = active.size
            for i in range(0, len(records), 2):
                offsets.append(end)
                end += len(records[i]) + len(records[i + 1])
            if roll:
                records.insert(0, MAGIC)
            if roll and self._unsynced and self._fd is not None:
                self._sync_locked()  # the segment left behind holds written-back records: make them durable
            fd = self._write(active, records, new=roll, durable=durable)
            with self._appended:
                if roll:
                    old_fd, self._fd = self._fd, fd
                    if old_fd is not None:
                        # Its zeros ahead go (not synced: opening takes zeros after the last record
                        # as the end, in any segment).
                        _drop_zeros_ahead(old_fd, self._segments[-1].size)
                        os.close(old_fd)
                    self._segments.append(active)
                    self._drop_released_locked()
                active.seqs.extend(seqs)
                active.offsets.extend(offsets)
                active.size = end
                self._last_seq = seqs[-1]
                self._appended.notify_all()

    def _retire_active_locked(self) -> None:
        segment = self._segments[-1]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unlink(segment)

    def _check_writable(self) -> None:
        if self._closed:
            raise errors.Internal(f"frame log {self.directory} is closed", code="framelog-closed")
        if self._broken:
            raise errors.Unavailable(
                f"frame log {self.directory} failed earlier ({self._broken}) and takes no more frames",
                hint="check the disk, then restart the daemon; it reopens the log and resumes",
                code="disk-error",
            )

    def _write(self, segment: _Segment, buffers: list[bytes], *, new: bool, durable: bool = True) -> int:
        """Write `buffers` at the end of `segment` and fsync (unless not `durable`); undo it all on failure.

        One writev per IOV_MAX buffers, not a join: a batch is up to tens of MiB, and
        joining it first doubled the writer's memory and copied every byte once more.
        """
        if new:
            fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            start, zeroed = 0, 0
        else:
            assert self._fd is not None
            fd = self._fd
            start, zeroed = segment.size, self._zeroed_end
        total = sum(map(len, buffers))
        end = start + total
        try:
            _write_all(fd, buffers, total)
            if self._fsync and durable and end > zeroed and total < PREALLOCATE_BELOW:
                _write_zeros(fd, end, PREALLOCATE_BYTES)
                zeroed = end + PREALLOCATE_BYTES
            if self._fsync and durable:
                # fdatasync: inside the zeros ahead nothing but the data changes (no size, no
                # allocation), so it syncs the data alone; past them it syncs the new size too.
                # It covers the records written back before it in this segment too.
                os.fdatasync(fd)
                if new or self._unsynced_dir:
                    fsync_dir(self.directory)
                self._unsynced = self._unsynced_dir = False
            elif self._fsync:
                self._unsynced = True
                self._unsynced_dir = self._unsynced_dir or new
            self._zeroed_end = max(zeroed, end)
        except OSError as exc:
            self._undo(segment, fd, new=new, cause=exc)
            if exc.errno in _DISK_FULL:
                raise errors.Unavailable(
                    f"frame log {self.directory} is out of disk space; {sum(map(len, buffers))} bytes were not "
                    "written",
                    hint="free space on that volume or give it more; the frames were not taken and the "
                    "sender keeps them",
                    code="disk-full",
                ) from exc
            raise self._broken_by("writing", exc, broken=f"{exc.strerror or exc}") from exc
        return fd

    def sync(self) -> None:
        """Make every record appended so far durable (after appends that were not `durable`)."""
        with self._append_lock:
            if self._fd is not None:
                self._sync_locked()

    @property
    def unsynced(self) -> bool:
        """Whether records were appended that a power loss could still take away."""
        return self._unsynced or self._unsynced_dir

    def _sync_locked(self) -> None:
        if not (self._fsync and (self._unsynced or self._unsynced_dir)):
            return
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
            if self._unsynced_dir:
                fsync_dir(self.directory)
        except OSError as exc:
            raise self._broken_by("syncing", exc, broken=f"syncing: {exc.strerror or exc}") from exc
        self._unsynced = self._unsynced_dir = False

    def _broken_by(self, doing: str, exc: OSError, *, broken: str) -> errors.Unavailable:
        """Take no more frames (`broken` says why) and the error for the caller to raise."""
        self._broken = broken
        return errors.Unavailable(
            f"frame log {self.directory}: {doing} failed: {exc.strerror or exc}",
            hint="check the disk, then restart the daemon",
            code="disk-error",
        )

    def _undo(self, segment: _Segment, fd: int, *, new: bool, cause: OSError) -> None:
        try:
            if new:
                os.close(fd)
                self._unlink_path(segment.path)
            else:
                # Back to the file as it was: the records, then the zeros ahead of them if any.
                zeroed = max(self._zeroed_end, segment.size)
                os.ftruncate(fd, zeroed)
                _write_zeros(fd, segment.size, zeroed - segment.size)
                os.lseek(fd, segment.size, os.SEEK_SET)
                if self._fsync:
                    os.fsync(fd)
                self._zeroed_end = zeroed
        except OSError as exc:
            self._broken = f"undoing a failed write: {exc.strerror or exc}"
            log.error("frame log: cannot undo a failed write", directory=str(self.directory), error=str(exc))
            raise errors.Unavailable(
                f"frame log {self.directory}: a write failed ({cause.strerror}) and could not be undone",
                hint="check the disk, then restart the daemon; opening the log truncates the partial record",
                code="disk-error",
            ) from exc

    # -- reading -----------------------------------------------------------
    def read_from(self, seq: int) -> Iterator[rpb.Frame]:
        """Unreleased frames with seq >= `seq`, in order, read from disk.

        The iterator also yields frames appended while it runs and ends when it
        has caught up with the log; frames released meanwhile may be skipped.
        """
        for path, offset, record in self._records_from(seq):
            yield self._parse(path, offset, record)

    def read_serialized_from(self, seq: int) -> Iterator[tuple[int, bytes | memoryview]]:
        """`read_from` without parsing: (seq, the serialized `Frame`) of each record.

        The record's hash is checked (and a sealed one opened) as in `read_from`;
        what the bytes hold is not: the process server forwards them as they are,
        and the master target parses and checks each frame's checksum.
        """
        for path, offset, record in self._records_from(seq):
            yield self._open_record(path, offset, record)

    def _records_from(self, seq: int) -> Iterator[tuple[Path, int, bytes]]:
        """(segment path, offset, the whole record) of each unreleased record with seq >= `seq`.

        A record is read by its extent in the index, header and body in one read
        (records smaller than the read-ahead window share one).
        """
        want = max(seq, 1)
        while True:
            with self._lock:
                want = max(want, self._released + 1)
                found = self._locate_locked(want)
                if found is None:
                    return
                segment, index = found
            try:
                fd = os.open(segment.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # released and deleted meanwhile: look again
            try:
                window = _Window(fd)
                while True:
                    with self._lock:
                        if index >= len(segment.seqs):
                            break
                        offset, end, limit = segment.offsets[index], segment.end_of(index), segment.size
                        record_seq = segment.seqs[index]
                    record = window.read(offset, end - offset, limit)
                    index += 1
                    want = record_seq + 1
                    yield segment.path, offset, record
            finally:
                os.close(fd)

    def _locate_locked(self, seq: int) -> tuple[_Segment, int] | None:
        """The segment and index of the first record with seq >= `seq`."""
        firsts = [s.first_seq for s in self._segments]
        i = max(bisect_right(firsts, seq) - 1, 0)
        for segment in self._segments[i:]:
            index = bisect_left(segment.seqs, seq)
            if index < len(segment.seqs):
                return segment, index
        return None

    def wait_for(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until a frame with seq > `seq` has been appended; False on timeout or close."""
        with self._appended:
            return self._appended.wait_for(lambda: self._last_seq > seq or self._closed, timeout) and (
                self._last_seq > seq
            )

    # -- releasing ---------------------------------------------------------
    def release_through(self, seq: int) -> None:
        """Frames <= `seq` are no longer needed. Idempotent; clamped to `last_seq`.

        Persists the mark (atomically), then deletes the segments it covers
        whole (but never the one being written: the writer drops it when it rolls).
        """
        with self._release_lock:
            with self._lock:
                mark = min(seq, self._last_seq)
                if mark <= self._released:
                    return
                last = self._last_seq
            self._write_mark(mark, last)
            with self._lock:
                self._released = mark
                self._mark_last_seq = last
                self._drop_released_locked()

    def _drop_released_locked(self) -> None:
        for segment in list(self._segments[:-1]):
            if segment.last_seq > self._released:
                break
            self._unlink(segment)

    def _write_mark(self, released: int, last: int) -> None:
        path = self.directory / MARK_FILE
        tmp = path.with_name(f".{MARK_FILE}.tmp")
        data = json.dumps({"released_seq": released, "last_seq": last}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self._fsync:
            fsync_dir(self.directory)

    # -- closing -----------------------------------------------------------
    def close(self) -> None:
        with self._append_lock, self._appended:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._appended.notify_all()

    def __enter__(self) -> FrameLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrameLog({str(self.directory)!r}, last_seq={self._last_seq}, released={self._released})"


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZEROS = bytes(PREALLOCATE_BYTES)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    view = memoryview(_ZEROS)
    while length > 0:
        n = os.pwrite(fd, view[: min(length, len(view))], offset)
        offset += n
        length -= n


def _drop_zeros_ahead(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:  # harmless: opening takes them as the end
        log.warning("frame log: cannot drop the zeros ahead of a segment", error=str(exc))


def _zeros_to_end(fd: int, offset: int, file_size: int) -> bool:
    """Whether the segment holds nothing but zeros from `offset` on (the zeros written ahead)."""
    if offset >= file_size:
        return False
    while offset < file_size:
        chunk = os.pread(fd, min(_READ_WINDOW, file_size - offset), offset)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


def _write_all(fd: int, buffers: list[bytes], total: int) -> None:
    """Write every buffer (`total` bytes in all), in order, at the file's position.

    One writev almost always takes them all; only when it writes fewer bytes (or there are
    more than IOV_MAX buffers) is the rest cut into views and written piece by piece: making
    the views up front cost the process server 4 % of its GIL time (py-spy, continuous).
    """
    written = 0
    if len(buffers) <= _IOV_MAX:
        written = os.writev(fd, buffers)
        if written == total:
            return
    pending = [memoryview(b) for b in buffers if len(b)]
    first = _skip_written(pending, 0, written)
    while first < len(pending):
        first = _skip_written(pending, first, os.writev(fd, pending[first : first + _IOV_MAX]))


def _skip_written(pending: list[memoryview], first: int, written: int) -> int:
    """Take `written` bytes off the front of pending[first:]; returns the first buffer left."""
    while first < len(pending) and written >= len(pending[first]):
        written -= len(pending[first])
        first += 1
    if written:
        pending[first] = pending[first][written:]
    return first
