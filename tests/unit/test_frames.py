"""Frame checksums bind pair, position and content; validation refuses what does not fit the disk."""

from __future__ import annotations

import os

import pytest

from siterecovery.common import errors, frames
from siterecovery.common.pb import replication_pb2 as rpb

DISK = 1 << 20


def test_a_sealed_frame_verifies_compressed_or_not():
    data = os.urandom(1024) + bytes(3072)
    frame = frames.write_frame("pair-a", 7, 4096, data)
    frames.validate(frame, DISK)
    frames.verify("pair-a", frame)
    packed = frames.compress(frame)
    assert packed.compression == rpb.COMPRESSION_ZSTD and len(packed.write.data) < len(data)
    frames.validate(packed, DISK)
    frames.verify("pair-a", packed)
    assert frames.payload(packed) == data
    assert frames.decompress(packed) == frame


def test_a_write_frame_is_the_frame_its_fields_describe():
    """write_frame sets its fields in place (cheap for 1 MiB blocks); the frame is the same
    message, byte for byte, as one built from a DataBlock."""
    data = os.urandom(65536)
    frame = frames.write_frame("pair-a", 9, 1 << 16, data, captured_at=1700000000.25)
    built = rpb.Frame(seq=9, write=rpb.DataBlock(offset=1 << 16, length=len(data), data=data),
                      captured_at=frames._stamp(1700000000.25))
    built.checksum = frames.compute_checksum("pair-a", built, data)
    assert frame.SerializeToString(deterministic=True) == built.SerializeToString(deterministic=True)
    assert frame.WhichOneof("body") == "write" and frames.payload(frame) == data
    frames.verify("pair-a", frame)


def test_threads_compressing_at_once_each_get_intact_frames():
    """The process server compresses on one thread per pair; a compressor shared
    between threads once produced damaged frames as soon as two pairs ran."""
    import random
    import threading

    failures: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for seq in range(1, 60):
            data = (rng.randbytes(512) + bytes(512)) * 256
            frame = frames.compress(frames.write_frame(f"pair-{seed}", seq, 0, data))
            try:
                frames.verify(f"pair-{seed}", frame)
                assert frames.payload(frame) == data
            except (errors.SiteRecoveryError, AssertionError) as e:
                failures.append(f"thread {seed} frame {seq}: {e}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_incompressible_data_stays_as_it_is():
    frame = frames.write_frame("p", 1, 0, os.urandom(4096))
    assert frames.compress(frame) is frame


def test_a_write_that_barely_compresses_is_kept_as_it_is():
    # 1 % of zeros: zstd saves ~1 %, less than the 3 % a decompression at the target must buy.
    data = os.urandom(16_220) + bytes(164)
    frame = frames.write_frame("p", 1, 0, data)
    assert frames.compress(frame) is frame
    half = frames.write_frame("p", 2, 0, os.urandom(8192) + bytes(8192))
    packed = frames.compress(half)
    assert packed.compression == rpb.COMPRESSION_ZSTD and frames.payload(packed) == half.write.data


def test_the_gate_skips_small_writes_while_they_do_not_compress_and_retries():
    gate = frames.CompressionGate()
    tried = []
    for _ in range(200):
        attempt = gate.try_small()
        if attempt:
            gate.note_small(False)  # what compress() notes for a write that does not shrink
        tried.append(attempt)
    # Tried, then 1, 2, 4, ... 64 skipped after each failed try, then every 65th.
    assert [i for i, t in enumerate(tried) if t] == [0, 2, 5, 10, 19, 36, 69, 134, 199]

    gate = frames.CompressionGate()
    random_write = frames.write_frame("p", 1, 0, os.urandom(16_384))
    zeros = frames.write_frame("p", 2, 0, bytes(16_384))
    assert frames.compress(random_write, gate=gate) is random_write  # tried: did not shrink
    assert frames.compress(zeros, gate=gate) is zeros  # skipped, compressible or not
    assert frames.compress(zeros, gate=gate).compression == rpb.COMPRESSION_ZSTD  # tried again
    assert frames.compress(zeros, gate=gate).compression == rpb.COMPRESSION_ZSTD  # and nothing skipped
    # A large block is probed on its own, whatever the gate says.
    assert frames.compress(random_write, gate=gate) is random_write
    large = frames.write_frame("p", 3, 0, bytes(frames.PROBE_MIN_BYTES))
    assert frames.compress(large, gate=gate).compression == rpb.COMPRESSION_ZSTD


@pytest.mark.parametrize(
    "tamper",
    [
        lambda f: setattr(f.write, "offset", f.write.offset + 512),
        lambda f: setattr(f, "seq", f.seq + 1),
        lambda f: setattr(f.write, "data", b"\x01" + f.write.data[1:]),
        lambda f: f.captured_at.FromSeconds(1),
    ],
    ids=["offset", "seq", "data", "capture-time"],
)
def test_any_change_fails_the_checksum(tamper):
    frame = frames.write_frame("p", 3, 0, bytes(4096))
    tamper(frame)
    with pytest.raises(errors.Integrity) as caught:
        frames.verify("p", frame)
    assert caught.value.code == "frame-checksum"


def test_a_frame_replayed_into_another_pair_fails():
    frame = frames.tag_frame("pair-a", 9, "t1", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)
    frames.verify("pair-a", frame)
    with pytest.raises(errors.Integrity):
        frames.verify("pair-b", frame)


def test_damaged_compressed_data_is_an_integrity_error():
    frame = frames.compress(frames.write_frame("p", 1, 0, bytes(65536)))
    frame.write.data = frame.write.data[:-4] + b"\xff\xff\xff\xff"
    with pytest.raises(errors.Integrity):
        frames.payload(frame)
    bomb = frames.compress(frames.write_frame("p", 2, 0, bytes(65536)))
    bomb.write.length = 512  # says less than it inflates to
    with pytest.raises(errors.Integrity):
        frames.payload(bomb)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frames.write_frame("p", 1, DISK - 100, bytes(512)), "frame-out-of-range"),
        (frames.zero_frame("p", 1, DISK, 1), "frame-out-of-range"),
        (frames.zero_frame("p", 1, 0, 0), "frame-invalid"),
        (rpb.Frame(seq=1, checksum=bytes(16)), "frame-invalid"),
        (rpb.Frame(seq=0, zero=rpb.ZeroRange(offset=0, length=1), checksum=bytes(16)), "frame-invalid"),
        (rpb.Frame(seq=1, write=rpb.DataBlock(offset=0, length=8, data=b"1234"), checksum=bytes(16)), "frame-invalid"),
        (rpb.Frame(seq=1, zero=rpb.ZeroRange(offset=0, length=1), checksum=b"short"), "frame-invalid"),
        (frames.tag_frame("p", 1, "", rpb.RECOVERY_POINT_KIND_APP_CONSISTENT), "frame-invalid"),
        (frames.tag_frame("p", 1, "t", 99), "frame-invalid"),
        (frames.sync_frame("p", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK * 2), "frame-invalid"),
    ],
)
def test_validation_refuses_malformed_and_out_of_range_frames(frame, code):
    with pytest.raises(errors.InvalidInput) as caught:
        frames.validate(frame, DISK)
    assert caught.value.code == code


def test_a_large_block_compresses_only_when_its_samples_do():
    compressible = (b"siterecovery " * 90_000)[: 1024 * 1024]
    packed = frames.compress(frames.write_frame("p", 1, 0, compressible))
    assert packed.compression == rpb.COMPRESSION_ZSTD and len(packed.write.data) < len(compressible) // 10
    assert frames.payload(packed) == compressible

    random_block = frames.write_frame("p", 2, 0, os.urandom(1024 * 1024))
    assert frames.compress(random_block) is random_block
    # Compressible only outside the samples: sent as it is (compression is never needed).
    mixed = bytearray(os.urandom(1024 * 1024))
    for i in range(frames.PROBE_SAMPLES):
        at = i * len(mixed) // frames.PROBE_SAMPLES + frames.PROBE_SAMPLE_BYTES
        mixed[at : at + 200_000] = bytes(200_000)
    mixed_frame = frames.write_frame("p", 3, 0, bytes(mixed))
    assert frames.compress(mixed_frame) is mixed_frame


@pytest.mark.parametrize("size", [0, 100, 127, 128, 16_383, 16_384, 1024 * 1024, 1024 * 1024 + 77])
def test_frame_message_is_the_serialized_replication_message(size):
    frame = frames.write_frame("p", 7, 4096, os.urandom(size)) if size else frames.zero_frame("p", 7, 0, 4096)
    body = frame.SerializeToString()
    expected = rpb.ReplicationMessage(frame=frame).SerializeToString()
    assert frames.frame_message(body) == expected
    assert frames.frame_message(memoryview(b"xx" + body)[2:]) == expected
    assert rpb.ReplicationMessage.FromString(frames.frame_message(body)).frame == frame


@pytest.mark.parametrize("size", [1, 127, 128, 16_384, 1024 * 1024 + 5])
def test_the_data_length_of_a_serialized_frame_is_read_from_its_fields(size):
    plain = frames.write_frame("p", 9, 1 << 40, os.urandom(size), captured_at=1_700_000_000.5)
    packed = frames.compress(frames.write_frame("p", 10, 0, bytes(size)))
    for frame in (plain, packed):
        body = frame.SerializeToString()
        assert frames.serialized_data_length(body) == len(frame.write.data)
        assert frames.serialized_data_length(memoryview(b"x" + body)[1:]) == len(frame.write.data)


def test_frames_without_data_and_garbage_have_no_data_length():
    for frame in (
        frames.zero_frame("p", 1, 0, 4096),
        frames.tag_frame("p", 2, "t1", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT),
        frames.sync_frame("p", 3, rpb.SYNC_PHASE_INITIAL_DONE, 1 << 30),
    ):
        assert frames.serialized_data_length(frame.SerializeToString()) == 0
    assert frames.serialized_data_length(b"\x12\xff\xff\xff") == 0
    assert frames.serialized_data_length(b"\x0f") == 0


def _serialized(count: int, size: int) -> list[bytes]:
    return [frames.write_frame("p", seq, 0, os.urandom(size)).SerializeToString() for seq in range(1, count + 1)]


def test_a_batch_message_is_the_serialized_frame_batch_and_a_lone_frame_a_frame_message():
    bodies = _serialized(5, 3000)
    message = rpb.ReplicationMessage.FromString(frames.batch_message(bodies))
    assert message.WhichOneof("kind") == "batch"
    assert [f.SerializeToString() for f in frames.message_frames(message)] == bodies
    assert frames.batch_message(bodies[:1]) == frames.frame_message(bodies[0])
    lone = rpb.ReplicationMessage.FromString(frames.batch_message(bodies[:1]))
    assert [f.SerializeToString() for f in frames.message_frames(lone)] == bodies[:1]


def test_an_empty_batch_is_refused_and_other_kinds_carry_no_frames():
    with pytest.raises(errors.InvalidInput) as caught:
        frames.message_frames(rpb.ReplicationMessage(batch=rpb.FrameBatch()))
    assert caught.value.code == "frame-invalid"
    assert frames.message_frames(rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id="p"))) is None
    assert frames.message_frames(rpb.ReplicationMessage()) is None


def test_a_batch_builder_cuts_by_bytes_and_frames_and_sends_singles_without_batches():
    big = frames.BatchBuilder(True)
    for body in _serialized(3, 400 * 1024):
        if big and not big.fits(len(body)):
            break
        big.add(body)
    assert len(frames.message_frames(rpb.ReplicationMessage.FromString(big.take()))) == 2  # 1 MiB at most
    small = frames.BatchBuilder(True)
    for body in _serialized(frames.MAX_BATCH_FRAMES, 16):
        assert small.fits(len(body))
        small.add(body)
    assert not small.fits(16)
    assert len(frames.message_frames(rpb.ReplicationMessage.FromString(small.take()))) == frames.MAX_BATCH_FRAMES
    assert not small and small.fits(10**9)  # empty: anything fits, even one frame alone past the limits
    single = frames.BatchBuilder(False)
    single.add(b"x")
    assert not single.fits(1)


@pytest.mark.parametrize("size", [1, 4096, 64 * 1024 + 3, 1024 * 1024])
@pytest.mark.parametrize("captured_at", [None, 1764400000.123456789, 0.0])
def test_a_write_frame_serialized_by_hand_is_the_frame_protobuf_serializes(size, captured_at):
    data = os.urandom(size)
    meta, body = frames.serialized_write_frame("pair-x", 4711, 7 * 4096, memoryview(data), captured_at=captured_at)
    frame = rpb.Frame.FromString(body)
    assert frame.write.data == data and meta.checksum == frame.checksum and not meta.write.data
    frames.verify("pair-x", frame)
    again = frames.write_frame("pair-x", 4711, 7 * 4096, data, captured_at=frame.captured_at.ToNanoseconds() / 1e9)
    again.captured_at.CopyFrom(frame.captured_at)  # the float's rounding aside
    again.checksum = frames.compute_checksum("pair-x", again, data)
    assert again.SerializeToString() == body


def _parsed(raw: bytes) -> list[tuple[rpb.Frame, bytes]]:
    """What protobuf makes of a message: (the frame without its data, the data) per frame."""
    out = []
    for frame in frames.message_frames(rpb.ReplicationMessage.FromString(raw)):
        data = frames.raw_data(frame)
        if frame.HasField("write"):
            frame.write.data = b""
        out.append((frame, data))
    return out


def _received(raw: bytes) -> list[tuple[rpb.Frame, bytes]]:
    out = []
    for received in frames.received_frames(raw):
        frame = rpb.Frame()
        frame.CopyFrom(received.frame)  # may hold the data too (then it is the same)
        if frame.HasField("write"):
            frame.write.data = b""
        out.append((frame, bytes(received.raw())))
    return out


@pytest.mark.parametrize("size", [16 * 1024, 64 * 1024, 1024 * 1024])
def test_received_frames_are_what_protobuf_parses_and_large_data_is_not_copied(size):
    frame = frames.write_frame("p", 9, 4096, os.urandom(size))
    raw = frames.frame_message(frame.SerializeToString())
    assert _received(raw) == _parsed(raw)
    got = frames.received_frames(raw)[0]
    frames.verify("p", got.frame, got.raw())
    if size >= frames.SPLIT_MIN_BYTES:
        assert isinstance(got.data, memoryview) and got.data.obj is raw
        assert bytes(got.body) == frame.SerializeToString()
    batch = frames.batch_message([frame.SerializeToString(), frames.tag_frame("p", 10, "t", 1).SerializeToString()])
    assert _received(batch) == _parsed(batch)


def test_received_frames_that_are_not_laid_out_plainly_mean_what_protobuf_says():
    first = frames.write_frame("p", 9, 4096, os.urandom(128 * 1024)).SerializeToString()
    second = frames.write_frame("p", 9, 8192, os.urandom(64 * 1024)).SerializeToString()
    merged = frames.frame_message(first + second)  # two write fields: protobuf merges them
    assert _received(merged) == _parsed(merged)
    with pytest.raises(errors.InvalidInput) as caught:
        frames.received_frames(b"\x12\xff\xff\x03" + b"\x07" * 70000)  # a frame field running past the end
    assert caught.value.code == "frame-invalid"
    with pytest.raises(errors.InvalidInput):
        frames.received_frames(b"\x1a\x00")  # an empty batch
    opening = rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id="p")).SerializeToString()
    assert frames.received_frames(opening) is None


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 64 * 1024 + 3])
@pytest.mark.parametrize("captured_at", [None, 1764400000.123456789, 0.0, 1764400000.0])
@pytest.mark.parametrize("offset", [0, 7 * 4096])
def test_a_write_serialized_without_protobuf_is_the_frame_protobuf_serializes(size, captured_at, offset):
    data = os.urandom(size)
    body = frames.serialized_write("pair-é", 4711, offset, memoryview(data), captured_at=captured_at)
    frame = rpb.Frame.FromString(body)
    assert frame.seq == 4711 and frame.write.offset == offset and frame.write.length == size
    assert frame.write.data == data
    frames.verify("pair-é", frame)
    again = frames.write_frame("pair-é", 4711, offset, data)
    again.captured_at.CopyFrom(frame.captured_at)
    again.checksum = frames.compute_checksum("pair-é", again, data)
    assert again.SerializeToString() == body
    if captured_at is not None:
        assert frame.captured_at.ToNanoseconds() == int(captured_at * 1e9)
