"""The durable frame log: append, read, release, reopen, torn tails, crashes, a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from siterecovery.common import errors, frames
from siterecovery.common.framelog import MAGIC, MARK_FILE, FrameLog
from siterecovery.common.pb import replication_pb2 as rpb

PAIR = "pair-1"


def frame(seq: int, size: int = 1000) -> rpb.Frame:
    data = random.Random(seq).randbytes(size)
    return frames.write_frame(PAIR, seq, (seq % 64) * 4096, data, captured_at=1_700_000_000 + seq)


def digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.SerializeToString())
    return h.hexdigest()


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_append_read_release_reopen(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, fsync=False)
    assert (log.last_seq, log.first_pending_seq, log.pending_frames, log.pending_bytes) == (0, None, 0, 0)
    assert log.oldest_pending_captured_at is None
    written = [frame(s) for s in (1, 2, 3, 5, 8, 13)]
    log.append(written[:3])
    log.append(written[3:])
    assert log.last_seq == 13
    assert log.pending_frames == 6
    assert digest(log.read_from(0)) == digest(written)
    assert digest(log.read_from(4)) == digest(written[3:])
    assert list(log.read_from(14)) == []
    assert log.oldest_pending_captured_at.seconds == 1_700_000_001

    log.release_through(3)
    log.release_through(2)  # idempotent, never goes back
    assert log.first_pending_seq == 5
    assert log.pending_frames == 3
    assert digest(log.read_from(0)) == digest(written[3:])
    assert log.oldest_pending_captured_at.seconds == 1_700_000_005
    pending = log.pending_bytes
    log.close()

    again = FrameLog(tmp_path, fsync=False)
    assert (again.last_seq, again.first_pending_seq, again.pending_frames) == (13, 5, 3)
    assert again.pending_bytes == pending
    assert digest(again.read_from(1)) == digest(written[3:])
    again.append([frame(21)])
    assert [f.seq for f in again.read_from(0)] == [5, 8, 13, 21]
    again.close()


def test_seqs_must_increase(tmp_path: Path) -> None:
    with FrameLog(tmp_path, fsync=False) as log:
        log.append([frame(5)])
        for bad in ([frame(5)], [frame(4)], [frame(7), frame(6)]):
            with pytest.raises(errors.InvalidInput):
                log.append(bad)
        assert [f.seq for f in log.read_from(0)] == [5]


def test_segments_roll_and_released_ones_are_deleted(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, segment_bytes=4096, fsync=False)
    written = [frame(s) for s in range(1, 41)]
    for f in written:
        log.append([f])
    assert len(segments(tmp_path)) >= 8
    assert log.pending_bytes == sum(p.stat().st_size - len(MAGIC) for p in segments(tmp_path))
    log.release_through(20)
    assert all(int(p.stem) > 15 for p in segments(tmp_path)), "wholly released segments remain"
    assert digest(log.read_from(0)) == digest(written[20:])
    log.release_through(40)
    # The active segment stays until the writer rolls past it.
    assert len(segments(tmp_path)) == 1
    assert (log.pending_frames, log.pending_bytes, log.first_pending_seq) == (0, 0, None)
    log.append([frame(41)])
    assert [p.stem for p in segments(tmp_path)] == [f"{41:020d}"]
    log.close()


def test_last_seq_survives_releasing_everything(tmp_path: Path) -> None:
    with FrameLog(tmp_path, segment_bytes=4096, fsync=False) as log:
        log.append([frame(s) for s in range(1, 10)])
        log.append([frame(s) for s in range(10, 20)])
        log.release_through(1_000)  # clamped to what the log holds
        assert log.released_seq == 19
    with FrameLog(tmp_path, fsync=False) as log:
        assert log.segment_bytes  # reopened
        assert log.last_seq == 19
        assert log.pending_frames == 0
        assert list(log.read_from(0)) == []
        with pytest.raises(errors.InvalidInput):
            log.append([frame(19)])
        log.append([frame(20)])
    assert [p.stem for p in segments(tmp_path)] == [f"{20:020d}"]


@pytest.mark.parametrize("tail", [b"\x07\x00", b"garbage" * 50, "partial", "flipped"])
def test_torn_tail_is_truncated(tmp_path: Path, tail) -> None:
    written = [frame(s) for s in range(1, 6)]
    with FrameLog(tmp_path, fsync=False) as log:
        log.append(written)
    seg = segments(tmp_path)[-1]
    good_size = seg.stat().st_size
    with open(seg, "r+b") as handle:
        if tail == "partial":  # half of a further record
            handle.seek(0, os.SEEK_END)
            FrameLog(tmp_path / "other", fsync=False).append([frame(6)])
            whole = segments(tmp_path / "other")[0].read_bytes()[len(MAGIC) :]
            handle.write(whole[: len(whole) // 2])
        elif tail == "flipped":  # the last record's body damaged in place
            handle.seek(good_size - 10)
            byte = handle.read(1)
            handle.seek(good_size - 10)
            handle.write(bytes([byte[0] ^ 0xFF]))
            written = written[:-1]
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(tail)
    with FrameLog(tmp_path, fsync=False) as log:
        assert digest(log.read_from(0)) == digest(written)
        assert log.last_seq == written[-1].seq
        log.append([frame(7)])
        assert [f.seq for f in log.read_from(0)] == [*(f.seq for f in written), 7]


def test_torn_new_segment_is_removed(tmp_path: Path) -> None:
    with FrameLog(tmp_path, fsync=False) as log:
        log.append([frame(1)])
    (tmp_path / f"{2:020d}.seg").write_bytes(MAGIC[:3])
    with FrameLog(tmp_path, fsync=False) as log:
        assert log.last_seq == 1
    assert len(segments(tmp_path)) == 1


def test_damage_in_an_earlier_segment_is_refused(tmp_path: Path) -> None:
    with FrameLog(tmp_path, segment_bytes=4096, fsync=False) as log:
        for s in range(1, 20):
            log.append([frame(s)])
    first = segments(tmp_path)[0]
    with open(first, "r+b") as handle:
        handle.seek(len(MAGIC))
        handle.write(b"\xff\xff\xff\xff")  # the first record's length
    with pytest.raises(errors.Integrity) as caught:
        FrameLog(tmp_path, fsync=False)
    assert str(first) in caught.value.message


def test_damaged_body_in_an_earlier_segment_is_caught_when_read(tmp_path: Path) -> None:
    with FrameLog(tmp_path, segment_bytes=4096, fsync=False) as log:
        for s in range(1, 20):
            log.append([frame(s)])
    first = segments(tmp_path)[0]
    with open(first, "r+b") as handle:
        handle.seek(len(MAGIC) + 100)
        handle.write(b"\x00\x01\x02")
    with FrameLog(tmp_path, fsync=False) as log, pytest.raises(errors.Integrity) as caught:
        list(log.read_from(0))
    assert str(first) in caught.value.message


def test_unreadable_release_mark_is_refused(tmp_path: Path) -> None:
    with FrameLog(tmp_path, fsync=False) as log:
        log.append([frame(1)])
        log.release_through(1)
    (tmp_path / MARK_FILE).write_text("{not json")
    with pytest.raises(errors.Integrity):
        FrameLog(tmp_path, fsync=False)


def test_a_batch_of_more_records_than_one_writev_takes_is_written_whole_and_in_order(tmp_path: Path) -> None:
    many = [frame(s, size=100) for s in range(1, 3001)]  # 6,000 buffers; IOV_MAX is 1,024 on Linux
    with FrameLog(tmp_path, fsync=False) as log:
        log.append(many)
    with FrameLog(tmp_path, fsync=False) as again:
        assert digest(again.read_from(0)) == digest(many)


def test_a_writev_that_writes_part_of_a_batch_is_continued_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    real = os.writev
    calls = []

    def short_writev(fd, buffers):  # at most 1,000 bytes a call: a cut inside a header, a body, a buffer
        joined = b"".join(bytes(b) for b in buffers)
        calls.append(len(joined))
        return real(fd, [joined[:1000]])

    written = [frame(s, size=700) for s in range(1, 21)]
    with FrameLog(tmp_path, fsync=False) as log:
        monkeypatch.setattr(os, "writev", short_writev)
        log.append(written)
        monkeypatch.undo()
    assert len(calls) > 10
    with FrameLog(tmp_path, fsync=False) as again:
        assert digest(again.read_from(0)) == digest(written)


def _fail_writes(monkeypatch: pytest.MonkeyPatch, code: int, after_bytes: int = 0) -> None:
    real = os.write
    budget = [after_bytes]

    def write(fd, data):
        if budget[0] <= 0:
            raise OSError(code, os.strerror(code))
        n = real(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    def writev(fd, buffers):  # a short write, as a filling disk gives, then the error
        return write(fd, b"".join(bytes(b) for b in buffers))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)


@pytest.mark.parametrize("new_segment", [False, True])
def test_disk_full_leaves_the_log_as_it_was(tmp_path: Path, monkeypatch, new_segment: bool) -> None:
    log = FrameLog(tmp_path, segment_bytes=4096, fsync=True)
    written = [frame(s) for s in range(1, 6 if new_segment else 2)]
    log.append(written)
    assert (log.disk_bytes >= 4096) == new_segment  # the next append rolls to a new segment
    before = {p.name: p.read_bytes() for p in segments(tmp_path)}
    _fail_writes(monkeypatch, errno.ENOSPC, after_bytes=700)  # dies inside the record
    with pytest.raises(errors.Unavailable) as caught:
        log.append([frame(10), frame(11)])
    monkeypatch.undo()
    assert caught.value.code == "disk-full"
    assert str(tmp_path) in caught.value.message
    assert {p.name: p.read_bytes() for p in segments(tmp_path)} == before
    assert log.last_seq == written[-1].seq
    assert len(segments(tmp_path)) == 1
    # Space is back: the same frames go in, and everything reads back after a reopen.
    log.append([frame(10), frame(11)])
    log.close()
    with FrameLog(tmp_path) as again:
        assert digest(again.read_from(0)) == digest([*written, frame(10), frame(11)])


def test_other_write_errors_stop_the_log(tmp_path: Path, monkeypatch) -> None:
    log = FrameLog(tmp_path, fsync=False)
    log.append([frame(1)])
    _fail_writes(monkeypatch, errno.EIO)
    with pytest.raises(errors.Unavailable) as caught:
        log.append([frame(2)])
    monkeypatch.undo()
    assert caught.value.code == "disk-error"
    with pytest.raises(errors.Unavailable):
        log.append([frame(2)])
    log.close()
    with FrameLog(tmp_path, fsync=False) as again:
        assert [f.seq for f in again.read_from(0)] == [1]


def test_reader_in_another_thread_sees_appends(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, segment_bytes=8192, fsync=False)
    written = [frame(s, size=300) for s in range(1, 401)]
    seen: list[rpb.Frame] = []
    failed: list[BaseException] = []

    def reader() -> None:
        try:
            nxt = 1
            while nxt <= 400:
                for f in log.read_from(nxt):
                    seen.append(f)
                    nxt = f.seq + 1
                    if f.seq % 50 == 0:
                        log.release_through(f.seq - 10)
                if nxt <= 400:
                    assert log.wait_for(nxt - 1, timeout=10)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(0, 400, 7):
        log.append(written[i : i + 7])
    thread.join(timeout=20)
    assert not thread.is_alive() and not failed, failed
    assert digest(seen) == digest(written)
    log.close()


_CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from siterecovery.common import frames
    from siterecovery.common.framelog import FrameLog

    log = FrameLog(Path(sys.argv[1]), segment_bytes=64 * 1024)
    seq = log.last_seq
    rng = random.Random(1)
    while True:
        batch = []
        for _ in range(rng.randint(1, 8)):
            seq += 1
            data = random.Random(seq).randbytes(rng.randint(1, 6000))
            batch.append(frames.write_frame("pair-1", seq, 0, data, captured_at=seq))
        log.append(batch)
        sys.stdout.write(f"{seq}\\n")
        sys.stdout.flush()
    """
)


def test_sigkill_mid_append_loses_no_returned_frame(tmp_path: Path) -> None:
    """A child appends in a loop and prints each seq after append returned; kill -9 it at random."""
    directory = tmp_path / "log"
    released = last = 0
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory)], stdout=subprocess.PIPE, text=True
        )
        target = last + random.randint(20, 400)
        acknowledged = last
        assert child.stdout is not None
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= target:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
        with FrameLog(directory, segment_bytes=64 * 1024) as log:
            got = list(log.read_from(0))
            last = log.last_seq
            assert last >= acknowledged
            assert [f.seq for f in got] == list(range(released + 1, last + 1))
            for f in got:
                frames.verify("pair-1", f)
                assert f.write.data == random.Random(f.seq).randbytes(len(f.write.data))
            if round_ % 2 == 0:
                released = last // 2
                log.release_through(released)


# -- encryption at rest ------------------------------------------------------------------------


def test_sealed_records_read_back_and_hide_their_data_on_disk(tmp_path: Path) -> None:
    from siterecovery.common.sealing import RecordCipher

    cipher = RecordCipher.load_or_create(tmp_path / "spool.key")
    assert oct((tmp_path / "spool.key").stat().st_mode & 0o777) == "0o600"
    directory = tmp_path / "pair-a"
    plain = FrameLog(directory)
    plain.append([frame(1)])  # written before encryption was turned on
    plain.close()
    written = [frame(seq) for seq in range(2, 40)]
    log = FrameLog(directory, cipher=cipher, segment_bytes=8192)
    log.append(written[:20])
    log.append(written[20:])
    assert digest(log.read_from(1)) == digest([frame(1), *written])
    log.close()
    on_disk = b"".join(p.read_bytes() for p in segments(directory))
    assert written[5].write.data[:64] not in on_disk and frame(1).write.data[:64] in on_disk

    # Reopened with the key (even with sealing now off): everything reads back.
    again = FrameLog(directory, cipher=RecordCipher.load_or_create(tmp_path / "spool.key"), seal=False)
    assert digest(again.read_from(1)) == digest([frame(1), *written])
    again.close()

    # Without the key, or with another one: refused with the reason, nothing guessed.
    with pytest.raises(errors.Integrity) as no_key:
        FrameLog(directory)
    assert no_key.value.code == "record-sealed-no-key"
    with pytest.raises(errors.Integrity) as wrong:
        FrameLog(directory, cipher=RecordCipher(os.urandom(32)))
    assert wrong.value.code == "record-sealed-badly"


def test_a_sealed_record_moved_to_another_log_does_not_open(tmp_path: Path) -> None:
    from siterecovery.common.sealing import RecordCipher

    cipher = RecordCipher(os.urandom(32))
    for name in ("pair-a", "pair-b"):
        log = FrameLog(tmp_path / name, cipher=cipher)
        log.append([frame(1)])
        log.close()
    (a,) = segments(tmp_path / "pair-a")
    (b,) = segments(tmp_path / "pair-b")
    b.write_bytes(a.read_bytes())  # the record hash still matches; the sealing does not
    with pytest.raises(errors.Integrity) as moved:
        FrameLog(tmp_path / "pair-b", cipher=cipher)
    assert moved.value.code == "record-sealed-badly"


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_serialized_frames_go_in_and_come_out_as_bytes(tmp_path: Path, sealed: bool) -> None:
    from siterecovery.common.sealing import RecordCipher

    cipher = RecordCipher(os.urandom(32)) if sealed else None
    directory = tmp_path / PAIR
    log = FrameLog(directory, fsync=False, cipher=cipher, segment_bytes=8192)
    # Records larger than the read-ahead window and smaller ones, across segments.
    written = [frame(s, size=(1024 * 1024 + 333) if s % 3 == 0 else 3000) for s in range(1, 10)]
    log.append_serialized([(f.seq, f.SerializeToString()) for f in written[:4]])
    log.append(written[4:])
    got = list(log.read_serialized_from(2))
    assert [seq for seq, _ in got] == [f.seq for f in written[1:]]
    assert [bytes(body) for _, body in got] == [f.SerializeToString() for f in written[1:]]
    assert digest(log.read_from(0)) == digest(written)
    log.close()
    again = FrameLog(directory, fsync=False, cipher=cipher)
    assert [bytes(body) for _, body in again.read_serialized_from(9)] == [written[-1].SerializeToString()]
    again.close()


def test_serialized_read_refuses_a_damaged_record(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, fsync=False)
    log.append([frame(1, size=5000), frame(2, size=5000)])
    (seg,) = segments(tmp_path)
    with open(seg, "r+b") as f:
        f.seek(len(MAGIC) + 200)
        byte = f.read(1)
        f.seek(len(MAGIC) + 200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(errors.Integrity):
        list(log.read_serialized_from(1))
    log.close()


def test_appending_serialized_frames_keeps_the_seq_order(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, fsync=False)
    log.append_serialized([(3, frame(3).SerializeToString())])
    with pytest.raises(errors.InvalidInput) as raised:
        log.append_serialized([(3, frame(3).SerializeToString())])
    assert raised.value.code == "seq-order"
    log.close()


def test_small_appends_overwrite_zeros_written_ahead_and_reopen_cleanly(tmp_path: Path) -> None:
    from siterecovery.common.framelog import PREALLOCATE_BYTES

    log = FrameLog(tmp_path, segment_bytes=24 * 1024)
    written = [frame(s) for s in range(1, 40)]
    for f in written[:20]:
        log.append([f])
    (segment,) = segments(tmp_path)
    used = log.disk_bytes
    assert used < segment.stat().st_size <= used + PREALLOCATE_BYTES
    assert segment.read_bytes()[used:].count(0) == segment.stat().st_size - used  # zeros after the records
    log.close()
    with FrameLog(tmp_path, segment_bytes=24 * 1024) as again:  # the zeros are the end, not damage
        assert again.last_seq == 20 and again.disk_bytes == used
        for f in written[20:]:
            again.append([f])  # rolls past 24 KiB: the old segment's zeros are dropped
        assert digest(again.read_from(0)) == digest(written)
    *older, _last = segments(tmp_path)
    assert older and all(p.read_bytes()[-1000:].count(0) < 1000 for p in older)
    with FrameLog(tmp_path) as again:
        assert digest(again.read_from(0)) == digest(written)


def test_written_back_appends_write_no_zeros_ahead_and_a_durable_one_does(tmp_path: Path) -> None:
    from siterecovery.common.framelog import PREALLOCATE_BYTES

    log = FrameLog(tmp_path)
    for seq in range(1, 11):
        log.append([frame(seq)], durable=False)  # no sync follows: zeros would only double the writes
    (segment,) = segments(tmp_path)
    assert segment.stat().st_size == log.disk_bytes
    log.append([frame(11)])  # a durable one: its sync and the next ones' skip the new size
    assert segment.stat().st_size == log.disk_bytes + PREALLOCATE_BYTES
    log.append([frame(12)], durable=False)  # inside the zeros: overwrites them
    assert segment.stat().st_size == log.disk_bytes + PREALLOCATE_BYTES - len(frame(12).SerializeToString()) - 20
    log.close()
    with FrameLog(tmp_path) as again:
        assert [f.seq for f in again.read_from(0)] == list(range(1, 13))


def test_zeros_ahead_left_in_an_older_segment_by_a_crash_are_its_end(tmp_path: Path) -> None:
    log = FrameLog(tmp_path, segment_bytes=8 * 1024)
    written = [frame(s) for s in range(1, 30)]
    for f in written:
        log.append([f])
    log.close()
    first, *_rest = segments(tmp_path)
    size = first.stat().st_size
    os.truncate(first, size + 3 * 4096)  # as if the roll's truncation never reached the disk
    with FrameLog(tmp_path) as again:
        assert digest(again.read_from(0)) == digest(written)
    with open(first, "r+b") as handle:  # not zeros: damage, as before
        handle.seek(size + 4096)
        handle.write(b"x")
    with pytest.raises(errors.Integrity):
        FrameLog(tmp_path)


def test_a_torn_record_in_the_zeros_ahead_is_truncated(tmp_path: Path) -> None:
    log = FrameLog(tmp_path)
    written = [frame(s) for s in range(1, 5)]
    for f in written:
        log.append([f])
    used = log.disk_bytes
    log.close()
    (segment,) = segments(tmp_path)
    with open(segment, "r+b") as handle:  # half a record, zeros after it
        handle.seek(used)
        handle.write(b"\x10\x04\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00garbage")
    with FrameLog(tmp_path) as again:
        assert again.last_seq == 4 and digest(again.read_from(0)) == digest(written)
        again.append([frame(5)])
        assert digest(again.read_from(0)) == digest([*written, frame(5)])
