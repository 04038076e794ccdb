"""Replication frames: building, sealing, checking, compressing.

A frame (proto `Frame`) is one unit of a pair's stream: a write, a zeroed range,
a recovery-point tag or a sync marker, numbered by a strictly increasing `seq`.

The checksum is xxh3-128 over the frame's *canonical form*: a fixed binary
header (format version, pair id, seq, body kind and its fields, capture time)
followed by the uncompressed payload. Binding the pair id and seq means a frame
replayed into another pair or at another position fails the check, not only a
frame whose bytes were damaged. The source seals each frame; the process server
checks it on receipt (before it spools and compresses); the master target checks
it again after decompression, right before it writes, so the check is end to end.

Validation (`validate`) is separate from the checksum: a well-sealed frame can
still be out of range for the disk, and a receiver refuses it the same way.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash
import zstandard
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.common import errors
from siterecovery.common.pb import replication_pb2 as rpb

CHECKSUM_SIZE = 16
# Largest payload one frame may carry: the initial sync uses 1 MiB chunks and
# an NBD client may write up to this much in one request.
MAX_BLOCK_BYTES = 32 * 1024 * 1024
# Longest tag id / group id / note accepted.
MAX_TAG_FIELD = 256
MAX_NOTE = 1024
_FORMAT = 1

_BODY_CODES = {"write": 1, "zero": 2, "tag": 3, "sync": 4}

# A ZstdCompressor must not be used by two threads at once (python-zstandard's
# docs say so, and sharing one corrupts the output): one per thread.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=1)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    # One per thread, like the compressor: a new ZstdDecompressor per frame (its context
    # allocated each time) cost 20 us of a 16 KiB frame's decompression against 9 us
    # reused (bench/RESULTS.md, "Small writes").
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _hasher(pair_id: str, frame: rpb.Frame) -> xxhash.xxh3_128:
    body = frame.WhichOneof("body")
    pid = pair_id.encode()
    h = xxhash.xxh3_128()
    h.update(struct.pack("<BH", _FORMAT, len(pid)))
    h.update(pid)
    h.update(
        struct.pack(
            "<QBqi",
            frame.seq,
            _BODY_CODES.get(body or "", 0),
            frame.captured_at.seconds,
            frame.captured_at.nanos,
        )
    )
    if body == "write":
        h.update(struct.pack("<QI", frame.write.offset, frame.write.length))
    elif body == "zero":
        h.update(struct.pack("<QQ", frame.zero.offset, frame.zero.length))
    elif body == "tag":
        t = frame.tag
        for text in (t.tag_id, t.group_id, t.note):
            raw = text.encode()
            h.update(struct.pack("<I", len(raw)))
            h.update(raw)
        h.update(struct.pack("<iB", t.kind, 1 if t.on_demand else 0))
    elif body == "sync":
        h.update(struct.pack("<iQ", frame.sync.phase, frame.sync.disk_size_bytes))
    return h


def compute_checksum(pair_id: str, frame: rpb.Frame, payload: bytes | memoryview = b"") -> bytes:
    """The checksum of `frame` with `payload` as its uncompressed write data."""
    h = _hasher(pair_id, frame)
    if payload:
        h.update(payload)
    return h.digest()


def _stamp(captured_at: float | None) -> Timestamp:
    ts = Timestamp()
    if captured_at is None:
        ts.GetCurrentTime()
    else:
        ts.FromNanoseconds(int(captured_at * 1e9))
    return ts


def write_frame(
    pair_id: str, seq: int, offset: int, data: bytes, *, captured_at: float | None = None
) -> rpb.Frame:
    # Fields set in place: rpb.Frame(write=rpb.DataBlock(data=...)) merges a block built
    # apart, which with protobuf's upb backend took 0.86 ms of CPU per 1 MiB block on a
    # thread (4.4 ms on the main thread, faulting its temporary memory in again each time)
    # against 0.15 ms for this (bench/RESULTS.md).
    frame = rpb.Frame(seq=seq, captured_at=_stamp(captured_at))
    frame.write.offset = offset
    frame.write.length = len(data)
    frame.write.data = data
    frame.checksum = compute_checksum(pair_id, frame, data)
    return frame


def serialized_write_frame(
    pair_id: str, seq: int, offset: int, data: bytes | memoryview, *, captured_at: float | None = None
) -> tuple[rpb.Frame, bytes]:
    """`write_frame`, serialized by hand: (the frame without its data, the whole frame's bytes).

    The same bytes as `write_frame(...).SerializeToString()`, for one copy of the data
    (the join) instead of three: setting a upb bytes field copies it, and
    SerializeToString encodes into an arena and copies out of it (about 0.7 ms per
    1 MiB chunk on the source agent, bench/RESULTS.md). The first element is what
    the sender needs to know of the frame (seq, lengths, checksum) without the data.
    """
    ns = time.time_ns() if captured_at is None else int(captured_at * 1e9)
    frame = rpb.Frame(seq=seq)
    frame.captured_at.seconds, frame.captured_at.nanos = divmod(ns, 1_000_000_000)
    frame.write.offset = offset
    frame.write.length = len(data)
    frame.checksum = compute_checksum(pair_id, frame, data)
    seconds, nanos = frame.captured_at.seconds, frame.captured_at.nanos
    block = _int_field(1, offset) + _int_field(2, len(data))
    data_head = b"\x1a" + _varint(len(data)) if data else b""
    stamp = _int_field(1, seconds) + _int_field(2, nanos)
    body = b"".join((
        _int_field(1, seq),
        b"\x12", _varint(len(block) + len(data_head) + len(data)), block, data_head, data,
        b"\x3a", _varint(len(frame.checksum)), frame.checksum,
        b"\x42", _varint(len(stamp)), stamp,
    ))
    return frame, body


# The canonical header `_hasher` builds for a write frame, in one pack (see `serialized_write`).
_WRITE_HEADER = struct.Struct("<QBqiQI")


def serialized_write(
    pair_id: str, seq: int, offset: int, data: bytes | memoryview, *, captured_at: float | None = None
) -> bytes:
    """`serialized_write_frame`'s bytes alone, made without any protobuf object.

    For the source's NBD writes (16 KiB at a time in the continuous benchmark):
    building a `Frame` and a `Timestamp` to checksum and serialize it was 15 % of
    the source agent's GIL time there (bench/RESULTS.md, continuous). The checksum
    is `compute_checksum`'s, its header packed at once.
    """
    ns = time.time_ns() if captured_at is None else int(captured_at * 1e9)
    seconds, nanos = divmod(ns, 1_000_000_000)
    pid = pair_id.encode()
    h = xxhash.xxh3_128(struct.pack("<BH", _FORMAT, len(pid)))
    h.update(pid)
    h.update(_WRITE_HEADER.pack(seq, _BODY_CODES["write"], seconds, nanos, offset, len(data)))
    if data:
        h.update(data)
    checksum = h.digest()
    block = _int_field(1, offset) + _int_field(2, len(data))
    data_head = b"\x1a" + _varint(len(data)) if data else b""
    stamp = _int_field(1, seconds) + _int_field(2, nanos)
    return b"".join((
        _int_field(1, seq),
        b"\x12", _varint(len(block) + len(data_head) + len(data)), block, data_head, data,
        b"\x3a", _varint(len(checksum)), checksum,
        b"\x42", _varint(len(stamp)), stamp,
    ))


def _int_field(number: int, value: int) -> bytes:
    """A varint field as protobuf writes it: nothing for 0 (proto3), never negative here."""
    if value < 0:
        raise ValueError(f"field {number}: {value} is negative")
    return _varint(number << 3) + _varint(value) if value else b""


def zero_frame(
    pair_id: str, seq: int, offset: int, length: int, *, captured_at: float | None = None
) -> rpb.Frame:
    frame = rpb.Frame(
        seq=seq, zero=rpb.ZeroRange(offset=offset, length=length), captured_at=_stamp(captured_at)
    )
    frame.checksum = compute_checksum(pair_id, frame)
    return frame


def tag_frame(
    pair_id: str,
    seq: int,
    tag_id: str,
    kind: int,
    *,
    group_id: str = "",
    note: str = "",
    on_demand: bool = False,
    captured_at: float | None = None,
) -> rpb.Frame:
    frame = rpb.Frame(
        seq=seq,
        tag=rpb.Tag(tag_id=tag_id, kind=kind, group_id=group_id, note=note, on_demand=on_demand),
        captured_at=_stamp(captured_at),
    )
    frame.checksum = compute_checksum(pair_id, frame)
    return frame


def sync_frame(
    pair_id: str, seq: int, phase: int, disk_size_bytes: int, *, captured_at: float | None = None
) -> rpb.Frame:
    frame = rpb.Frame(
        seq=seq,
        sync=rpb.SyncMarker(phase=phase, disk_size_bytes=disk_size_bytes),
        captured_at=_stamp(captured_at),
    )
    frame.checksum = compute_checksum(pair_id, frame)
    return frame


# -- sending serialized frames ------------------------------------------------

# `ReplicationMessage.frame` is field 2, length-delimited: its key byte.
_FRAME_KEY = bytes([2 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_message(body: bytes | memoryview) -> bytes:
    """The serialized `ReplicationMessage(frame=...)` whose frame serializes as `body`.

    The source agent and the process server send frames they hold serialized
    this way, through `pass_through` as the gRPC request serializer: building a
    `ReplicationMessage` around a 1 MiB frame and serializing it copies the data
    several times over (bench/RESULTS.md, full_sync).
    """
    return b"".join((_FRAME_KEY, _varint(len(body)), body))


# `ReplicationMessage.batch` is field 3 and `FrameBatch.frames` field 1, both length-delimited.
_BATCH_KEY = bytes([3 << 3 | 2])
_BATCH_FRAME_KEY = bytes([1 << 3 | 2])

# How a sender cuts batches (issue 7: per-message overhead dominated 16 KiB writes).
# A batch is what is ready to send at that moment, never waited for, up to these:
# about 1 MiB (a 1 MiB initial-sync chunk travels alone, as a `frame`) and 256
# frames (an NBD client's 4 KiB writes).
MAX_BATCH_BYTES = 1024 * 1024
MAX_BATCH_FRAMES = 256


def batch_message(bodies: Sequence[bytes | memoryview]) -> bytes:
    """The serialized `ReplicationMessage(batch=FrameBatch(frames=...))` of serialized frames.

    One frame alone goes as `frame_message`: the same bytes a receiver that
    does not take batches gets, and no batch header to parse.
    """
    if len(bodies) == 1:
        return frame_message(bodies[0])
    parts: list[bytes | memoryview] = []
    for body in bodies:
        parts += (_BATCH_FRAME_KEY, _varint(len(body)), body)
    inner = sum(len(part) for part in parts)
    return b"".join((_BATCH_KEY, _varint(inner), *parts))


class BatchBuilder:
    """Serialized frames gathered into messages: `add` them, `take` the message when `full`.

    `batches` False (a receiver that did not say `accepts_batches`) makes
    every frame a message of its own.
    """

    def __init__(self, batches: bool) -> None:
        self.batches = batches
        self._bodies: list[bytes | memoryview] = []
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._bodies)

    def fits(self, size: int) -> bool:
        """Whether a frame of `size` serialized bytes may join the batch being built."""
        if not self._bodies:
            return True
        return (
            self.batches
            and len(self._bodies) < MAX_BATCH_FRAMES
            and self._bytes + size <= MAX_BATCH_BYTES
        )

    def add(self, body: bytes | memoryview) -> None:
        self._bodies.append(body)
        self._bytes += len(body)

    def take(self) -> bytes:
        """The message of the frames added since the last `take` (at least one)."""
        message = batch_message(self._bodies)
        self._bodies, self._bytes = [], 0
        return message


def message_frames(message: rpb.ReplicationMessage) -> Sequence[rpb.Frame] | None:
    """The frames a `frame` or `batch` message carries, in order; None for other kinds.

    An empty batch is refused like a frame without a body: it is a sender's bug."""
    kind = message.WhichOneof("kind")
    if kind == "frame":
        return (message.frame,)
    if kind != "batch":
        return None
    carried = message.batch.frames
    if not carried:
        raise errors.InvalidInput(
            "a frame batch holds no frames",
            hint="this is a sender bug or a hostile peer; the batch was refused and nothing was written",
            code="frame-invalid",
        )
    return list(carried)


# -- receiving serialized frames ------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A frame as it came off the wire.

    `frame` holds the frame's fields, its write data maybe left out: `raw()` is
    the write data as carried (for a large frame a view into the received
    message: no copy), b"" for other bodies;
    `body`, when known, is the serialized frame as received (a view), which the
    process server spools as it is unless it compresses the data.
    """

    frame: rpb.Frame
    # None: the data is in `frame` (taken by `raw()` only when needed: taking it copies it,
    # and a queue of received frames would hold every payload twice).
    data: bytes | memoryview | None = None
    body: memoryview | None = None

    def raw(self) -> bytes | memoryview:
        """The write data as carried (compressed or not); b"" for other bodies."""
        return raw_data(self.frame) if self.data is None else self.data


def received_frames(raw: bytes) -> list[Received] | None:
    """The frames of a serialized `frame` or `batch` ReplicationMessage, in order; None
    for another kind (`open`). For the receivers' pass-through request deserializer.

    Parsing a message with a 1 MiB frame and then taking `frame.write.data` copied
    the payload twice, and the process server serialized the frame once more to
    spool it: 3.6-6.6 ms per 1 MiB frame in process against 0.1-0.2 ms when the
    data is located by its field headers and only the rest of the frame is parsed
    by protobuf (and the received bytes spooled as they are). That is done for a
    lone frame from SPLIT_MIN_BYTES on; below it, and for batches, protobuf's own
    parse of the whole message costs less Python (a batch of 60 frames of 16 KiB:
    1.0 ms against 2.8 ms). A frame whose fields are not laid out plainly (a field
    repeated, which protobuf would merge) is parsed whole, so the meaning is
    always protobuf's. Raises InvalidInput for bytes that do not decode and for
    an empty batch.
    """
    view = memoryview(raw)
    if len(view) >= SPLIT_MIN_BYTES:
        try:
            fields = list(_field_spans(view, 0, len(view)))
            if len(fields) == 1 and fields[0][:2] == (2, 2):
                _n, _w, _key, at, end = fields[0]
                body = view[at:end]
                split = _split_data(body)
                if split is not None:
                    return [Received(rpb.Frame.FromString(split[0]), split[1], body)]
        except (IndexError, ValueError, DecodeError):
            pass  # not plain: protobuf decides below
    try:
        message = rpb.ReplicationMessage.FromString(raw)
    except DecodeError as exc:
        raise _undecodable(exc) from exc
    carried = message_frames(message)
    if carried is None:
        return None
    return [Received(frame) for frame in carried]


def incoming(message: bytes | rpb.ReplicationMessage) -> list[Received] | None:
    """`received_frames` of a request as a servicer gets it: bytes through the pass-through
    deserializer (grpcserver.raw_requests), or a message parsed already (other callers)."""
    if isinstance(message, bytes | memoryview):
        return received_frames(bytes(message) if isinstance(message, memoryview) else message)
    carried = message_frames(message)
    return None if carried is None else [Received(frame) for frame in carried]


def parse_open(message: bytes | rpb.ReplicationMessage | None) -> rpb.ReplicationMessage | None:
    """The first request of a stream as a message (None stays None); InvalidInput when it does not decode."""
    if message is None or isinstance(message, rpb.ReplicationMessage):
        return message
    try:
        return rpb.ReplicationMessage.FromString(message)
    except DecodeError as exc:
        raise _undecodable(exc) from exc


# From this size on a lone frame's data is located by its field headers (see received_frames).
SPLIT_MIN_BYTES = 64 * 1024


def _split_data(body: memoryview) -> tuple[bytes, memoryview] | None:
    """(the frame's bytes without its write data, the data) when the frame has exactly one
    `write` field holding exactly one `data` field; None otherwise."""
    writes = [f for f in _field_spans(body, 0, len(body)) if f[0] == 2]
    if len(writes) != 1 or writes[0][1] != 2:
        return None
    _n, _w, key, at, end = writes[0]
    datas = [f for f in _field_spans(body, at, end) if f[0] == 3]
    if len(datas) != 1 or datas[0][1] != 2:
        return None
    _n, _w, data_key, data_at, data_end = datas[0]
    inner = b"".join((body[at:data_key], body[data_end:end]))
    rest = b"".join((body[:key], _FRAME_WRITE_KEY, _varint(len(inner)), inner, body[end:]))
    return rest, body[data_at:data_end]


def _field_spans(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, where its key starts, where its value starts, where it ends)."""
    at = start
    while at < end:
        key_at = at
        key, at = _read_varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _value, value_end = _read_varint(buf, at)
        elif wire == 2:
            length, at = _read_varint(buf, at)
            value_end = at + length
        elif wire in (1, 5):
            value_end = at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if value_end > end:
            raise ValueError("a field runs past its message")
        yield number, wire, key_at, at, value_end
        at = value_end


_FRAME_WRITE_KEY = bytes([2 << 3 | 2])


def _undecodable(exc: Exception) -> errors.InvalidInput:
    return errors.InvalidInput(
        f"a replication message does not decode ({exc})",
        hint="this is a sender bug or a hostile peer; it was refused and nothing of it was written",
        code="frame-invalid",
    )


def pass_through(message: bytes) -> bytes:
    """A gRPC request serializer for messages serialized already."""
    return message


def _read_varint(buf: bytes | memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or length, where a length-delimited value starts)."""
    at = start
    while at < end:
        key, at = _read_varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(buf, at)
            yield number, wire, value, at
        elif wire == 2:
            length, at = _read_varint(buf, at)
            yield number, wire, length, at
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def serialized_data_length(body: bytes | memoryview) -> int:
    """Bytes of write data (as carried: compressed or not) in a serialized `Frame`; 0 for
    other bodies. Reads the field headers only (the forwarder does not parse frames)."""
    try:
        for number, wire, length, at in _fields(body, 0, len(body)):
            if number == 2 and wire == 2:  # Frame.write: a DataBlock
                for inner, inner_wire, inner_length, _ in _fields(body, at, at + length):
                    if inner == 3 and inner_wire == 2:  # DataBlock.data
                        return inner_length
                return 0
    except (IndexError, ValueError):
        pass
    return 0


# -- compression -------------------------------------------------------------


# Compressibility probe: SAMPLES slices of SAMPLE_BYTES spread over a block
# are compressed first; when they do not shrink below PROBE_RATIO, the block is
# not compressed at all. Random (or encrypted, or already compressed) disk data
# so costs ~15 us per 1 MiB block instead of ~0.35 ms for a full zstd attempt
# that saves nothing. A block that compresses only outside the samples is sent
# uncompressed: compression saves bytes on the wire and in the spool, it is
# never needed for correctness.
PROBE_MIN_BYTES = 256 * 1024
PROBE_SAMPLES = 4
PROBE_SAMPLE_BYTES = 8 * 1024
PROBE_RATIO = 0.97


def _worth_compressing(data: bytes) -> bool:
    view = memoryview(data)
    step = len(data) // PROBE_SAMPLES
    sample = b"".join(view[i * step : i * step + PROBE_SAMPLE_BYTES] for i in range(PROBE_SAMPLES))
    return len(_compressor().compress(sample)) < PROBE_RATIO * len(sample)


class CompressionGate:
    """Whether to try compressing the next small write of one stream.

    Blocks of PROBE_MIN_BYTES and more are probed (above); a small write (a
    16 KiB block of a random-write load) is cheaper to try whole than to probe,
    but a stream of incompressible ones still paid a zstd attempt each, and kept
    a 0.3 % saving at the price of a copy here and a decompression at the master
    target. So after a small write that does not shrink below PROBE_RATIO the
    next `skip` small writes are sent as they are, `skip` doubling up to
    MAX_SKIP while they keep failing and back to none at the first success.
    """

    MAX_SKIP = 64

    def __init__(self) -> None:
        self._skip = 0  # small writes to pass without trying
        self._next_skip = 1

    def try_small(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    def note_small(self, shrank: bool) -> None:
        if shrank:
            self._next_skip = 1
        else:
            self._skip = self._next_skip
            self._next_skip = min(self._next_skip * 2, self.MAX_SKIP)


def compress(frame: rpb.Frame, data: bytes | None = None, gate: CompressionGate | None = None) -> rpb.Frame:
    """A copy of `frame` whose write data is zstd-compressed, when that saves at least
    1 - PROBE_RATIO of its bytes (less is not worth the master target's decompression).

    `data` is the frame's write data when the caller has it already (every
    access to a bytes field of a upb message copies it). `gate`, one per stream,
    skips attempts on small writes while they keep not compressing. The checksum
    is untouched: it covers the uncompressed data.
    """
    if frame.WhichOneof("body") != "write" or frame.compression != rpb.COMPRESSION_NONE:
        return frame
    if data is None:
        data = frame.write.data
    small = len(data) < PROBE_MIN_BYTES
    if small and gate is not None and not gate.try_small():
        return frame
    if not small and not _worth_compressing(data):
        return frame
    packed = _compressor().compress(data)
    shrank = len(packed) < PROBE_RATIO * len(data)
    if small and gate is not None:
        gate.note_small(shrank)
    if not shrank:
        return frame
    out = rpb.Frame()
    out.CopyFrom(frame)
    out.write.data = packed
    out.compression = rpb.COMPRESSION_ZSTD
    return out


def raw_data(frame: rpb.Frame) -> bytes:
    """The write data of `frame` as it travels (compressed or not; b"" for other bodies).

    Each access to a bytes field of a upb message copies it: a caller that needs the
    data more than once takes it once here and hands it to `validate`, `payload`,
    `compress`.
    """
    return frame.write.data if frame.WhichOneof("body") == "write" else b""


def payload(frame: rpb.Frame, raw: bytes | None = None) -> bytes:
    """The uncompressed write data of `frame` (b"" for other bodies).

    `raw` is `raw_data(frame)` when the caller has it already. Refuses data
    that does not decompress to exactly `write.length` bytes, so a hostile
    frame cannot make a receiver allocate more than the length it states.
    """
    if frame.WhichOneof("body") != "write":
        return b""
    block = frame.write
    if raw is None:
        raw = block.data
    if frame.compression == rpb.COMPRESSION_NONE:
        data = raw
    elif frame.compression == rpb.COMPRESSION_ZSTD:
        if block.length > MAX_BLOCK_BYTES:
            raise _bad(frame, f"states {block.length} bytes, more than the {MAX_BLOCK_BYTES} allowed")
        try:
            data = _decompressor().decompress(raw, max_output_size=block.length)
        except zstandard.ZstdError as exc:
            raise errors.Integrity(
                f"frame {frame.seq}: compressed data is damaged ({exc})",
                hint="the sender will send it again",
                code="frame-corrupt",
            ) from exc
    else:
        raise _bad(frame, f"uses unknown compression {frame.compression}")
    if len(data) != block.length:
        raise errors.Integrity(
            f"frame {frame.seq}: holds {len(data)} bytes of data but states {block.length}",
            hint="the sender will send it again",
            code="frame-corrupt",
        )
    return data


def decompress(frame: rpb.Frame) -> rpb.Frame:
    if frame.compression == rpb.COMPRESSION_NONE:
        return frame
    data = payload(frame)
    out = rpb.Frame()
    out.CopyFrom(frame)
    out.write.data = data
    out.compression = rpb.COMPRESSION_NONE
    return out


# -- checking ----------------------------------------------------------------


def _bad(frame: rpb.Frame, what: str) -> errors.InvalidInput:
    return errors.InvalidInput(
        f"frame {frame.seq} {what}",
        hint="this is a sender bug or a hostile peer; the frame was refused and nothing was written",
        code="frame-invalid",
    )


def validate(frame: rpb.Frame, disk_size_bytes: int, raw: bytes | None = None) -> None:
    """Refuse a frame that is malformed or reaches past the end of the disk.

    `raw` is `raw_data(frame)` when the caller has it already."""
    if frame.seq <= 0:
        raise _bad(frame, "has no sequence number")
    if len(frame.checksum) != CHECKSUM_SIZE:
        raise _bad(frame, f"carries a {len(frame.checksum)}-byte checksum, not {CHECKSUM_SIZE}")
    body = frame.WhichOneof("body")
    if body is None:
        raise _bad(frame, "has no body")
    if frame.compression not in (rpb.COMPRESSION_NONE, rpb.COMPRESSION_ZSTD):
        raise _bad(frame, f"uses unknown compression {frame.compression}")
    if body == "write":
        offset, length = frame.write.offset, frame.write.length
        if length == 0 or length > MAX_BLOCK_BYTES:
            raise _bad(frame, f"writes {length} bytes; allowed is 1 to {MAX_BLOCK_BYTES}")
        carried = len(frame.write.data if raw is None else raw)
        if frame.compression == rpb.COMPRESSION_NONE and carried != length:
            raise _bad(frame, f"states {length} bytes but carries {carried}")
        _check_range(frame, offset, length, disk_size_bytes)
    elif body == "zero":
        if frame.zero.length == 0:
            raise _bad(frame, "zeroes an empty range")
        _check_range(frame, frame.zero.offset, frame.zero.length, disk_size_bytes)
    elif body == "tag":
        t = frame.tag
        if not t.tag_id or len(t.tag_id) > MAX_TAG_FIELD or len(t.group_id) > MAX_TAG_FIELD:
            raise _bad(frame, "has a tag id that is empty or too long")
        if len(t.note) > MAX_NOTE:
            raise _bad(frame, "has a tag note that is too long")
        if t.kind not in rpb.RecoveryPointKind.values() or t.kind == rpb.RECOVERY_POINT_KIND_UNSPECIFIED:
            raise _bad(frame, f"has unknown recovery point kind {t.kind}")
    elif body == "sync":
        if frame.sync.phase not in (rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE):
            raise _bad(frame, f"has unknown sync phase {frame.sync.phase}")
        if frame.sync.disk_size_bytes != disk_size_bytes:
            raise _bad(
                frame,
                f"announces a {frame.sync.disk_size_bytes}-byte disk; the pair's disk has {disk_size_bytes}",
            )


def _check_range(frame: rpb.Frame, offset: int, length: int, disk_size_bytes: int) -> None:
    if offset + length > disk_size_bytes:
        raise errors.InvalidInput(
            f"frame {frame.seq} reaches byte {offset + length}, past the end of the "
            f"{disk_size_bytes}-byte disk",
            hint="the source disk may have grown; resize the target, then resume the pair",
            code="frame-out-of-range",
        )


def verify(pair_id: str, frame: rpb.Frame, data: bytes | None = None) -> None:
    """Raise errors.Integrity unless `frame`'s checksum matches.

    `data` is the uncompressed payload when the caller has it already; otherwise
    it is taken from the frame (decompressing when needed).
    """
    if data is None:
        data = payload(frame)
    if compute_checksum(pair_id, frame, data) != frame.checksum:
        raise errors.Integrity(
            f"pair {pair_id}: frame {frame.seq} failed its checksum; it was refused and not written",
            hint="the sender keeps it and sends it again; if this repeats, check the network path and memory",
            code="frame-checksum",
        )


def payload_length(frame: rpb.Frame) -> int:
    """Bytes of disk this frame changes (for accounting and progress)."""
    body = frame.WhichOneof("body")
    if body == "write":
        return frame.write.length
    if body == "zero":
        return frame.zero.length
    return 0
