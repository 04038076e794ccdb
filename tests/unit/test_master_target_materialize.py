"""Materialising an older point: how fast 256 MiB of undo journal is put back onto a copy,
and that replication goes on while it is."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

from siterecovery.agents.master_target import blockio
from siterecovery.agents.master_target import materialize as materializing
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import frames
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import MiB, sha256

DISK = 64 * MiB
BLOCK = 1 * MiB
PASSES = 4  # every pass overwrites the whole disk: PASSES * DISK bytes of undo


def _block(rng: random.Random) -> bytes:
    # Cheap distinct non-zero data (random bytes would cost more than the test measures).
    return rng.randbytes(64) * (BLOCK // 64)


def test_materialising_256_mib_of_journal(tmp_path: Path):
    datastore = tmp_path / "datastore"
    target = PairTarget(
        pair_id="perf", target_path=datastore / "perf.img", journal_dir=tmp_path / "retention" / "perf",
        disk_size=DISK, options=TargetOptions(reserve_bytes=0),
    )
    target.open()
    rng = random.Random(1)
    seq = 0

    def next_seq() -> int:
        nonlocal seq
        seq += 1
        return seq

    def apply_blocks(blocks: list[tuple[int, bytes]]) -> None:
        for start in range(0, len(blocks), 16):
            batch = [frames.write_frame("perf", next_seq(), off, data) for off, data in blocks[start : start + 16]]
            target.apply([(f, f.write.data) for f in batch])

    target.apply([(frames.sync_frame("perf", next_seq(), rpb.SYNC_PHASE_INITIAL_STARTED, DISK), b"")])
    apply_blocks([(off, _block(rng)) for off in range(0, DISK, BLOCK)])
    target.apply([(frames.sync_frame("perf", next_seq(), rpb.SYNC_PHASE_INITIAL_DONE, DISK), b"")])
    base = sha256(target.target_path)
    target.apply([(frames.tag_frame("perf", next_seq(), "base", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT), b"")])
    applying = time.monotonic()
    for _ in range(PASSES):
        offsets = list(range(0, DISK, BLOCK))
        rng.shuffle(offsets)
        apply_blocks([(off, _block(rng)) for off in offsets])
    apply_rate = PASSES * DISK / MiB / (time.monotonic() - applying)
    print(f"[apply] {PASSES * DISK // MiB} MiB of overwrites in 16 MiB batches with undo: {apply_rate:.0f} MiB/s")
    (point,) = target.status().points
    assert point.journal_bytes_back == PASSES * DISK
    # Measure from disk, not from the page cache: drop the (flushed) journal and target pages.
    for path in [target.target_path, *target.journal_dir.glob("*.seg")]:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    # Replication goes on while the copy is undone (the apply lock is held for the copy only).
    keep_applying = threading.Event()
    applied_during = [0]

    def writer() -> None:
        while not keep_applying.is_set():
            apply_blocks([(rng.randrange(0, DISK // BLOCK) * BLOCK, _block(rng))])
            applied_during[0] += 1

    out = datastore / "base.img"
    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    try:
        reply = materializing.materialize(target, "base", str(out), [datastore])
    finally:
        keep_applying.set()
        thread.join()
    elapsed = time.monotonic() - started
    assert reply.copied and reply.bytes_undone >= PASSES * DISK  # plus what the writer applied before the cut
    assert sha256(out) == base
    rate = reply.bytes_undone / MiB / elapsed
    print(f"[materialize] {reply.bytes_undone // MiB} MiB of undo journal onto a {DISK // MiB} MiB copy in "
          f"{elapsed:.2f} s: {rate:.0f} MiB/s (journal, cold cache), {applied_during[0]} MiB applied meanwhile")
    assert applied_during[0] > 0
    target.close()


def test_sparse_copy_keeps_holes(tmp_path: Path):
    target = PairTarget(
        pair_id="s", target_path=tmp_path / "ds" / "s.img", journal_dir=tmp_path / "ret" / "s",
        disk_size=DISK, options=TargetOptions(reserve_bytes=0),
    )
    target.open()
    target.apply([
        (frames.sync_frame("s", 1, rpb.SYNC_PHASE_INITIAL_DONE, DISK), b""),
        (frames.write_frame("s", 2, 5 * MiB, b"\x01" * BLOCK), b"\x01" * BLOCK),
        (frames.tag_frame("s", 3, "t", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT), b""),
        (frames.zero_frame("s", 4, 5 * MiB, BLOCK), b""),
        (frames.write_frame("s", 5, 9 * MiB, b"\x02" * BLOCK), b"\x02" * BLOCK),
    ])
    out = tmp_path / "ds" / "t.img"
    materializing.materialize(target, "t", str(out), [tmp_path / "ds"])
    expected = bytearray(DISK)
    expected[5 * MiB : 6 * MiB] = b"\x01" * BLOCK
    assert sha256(out) == hashlib.sha256(expected).hexdigest()
    assert out.stat().st_blocks * 512 <= 2 * MiB, "the copy stays sparse"
    assert target.target_path.stat().st_blocks * 512 <= 2 * MiB, "zeroing punched a hole"
    target.close()


def test_latest_with_an_output_path_is_a_copy_of_the_target_as_it_is(tmp_path: Path):
    target = PairTarget(
        pair_id="l", target_path=tmp_path / "ds" / "l.img", journal_dir=tmp_path / "ret" / "l",
        disk_size=DISK, options=TargetOptions(reserve_bytes=0),
    )
    target.open()
    target.apply([
        (frames.sync_frame("l", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK), b""),
        (frames.sync_frame("l", 2, rpb.SYNC_PHASE_INITIAL_DONE, DISK), b""),
        (frames.write_frame("l", 3, 3 * MiB, b"\x07" * BLOCK), b"\x07" * BLOCK),
    ])
    in_place = materializing.materialize(target, "latest", "", [tmp_path / "ds"])
    assert (in_place.path, in_place.copied, in_place.seq) == (str(target.target_path), False, 3)
    out = tmp_path / "ds" / "vm" / "disk0.img"
    copy = materializing.materialize(target, "latest", str(out), [tmp_path / "ds"])
    assert (copy.path, copy.copied, copy.seq, copy.bytes_undone) == (str(out), True, 3, 0)
    assert sha256(out) == sha256(target.target_path)
    # The copy is the VM's own: later writes to the replica do not reach it.
    target.apply([(frames.write_frame("l", 4, 0, b"\x09" * BLOCK), b"\x09" * BLOCK)])
    assert sha256(out) != sha256(target.target_path)
    target.close()


def test_read_ahead_asks_for_the_whole_range_in_pieces_the_kernel_does_not_cut(tmp_path: Path, monkeypatch):
    # Linux drops whatever one WILLNEED asks for beyond the device's readahead size, so the
    # hint must tile the range in pieces no larger than READ_AHEAD_CHUNK (the real call runs).
    path = tmp_path / "segment"
    data = random.Random(2).randbytes(5 * blockio.READ_AHEAD_CHUNK + 123)
    path.write_bytes(data)
    asked: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        asked.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(blockio.os, "posix_fadvise", spy)
    fd = os.open(path, os.O_RDONLY)
    try:
        blockio.read_ahead(fd, 1000, len(data) - 1000)
        blockio.read_ahead(fd, 0, 0)
        assert blockio.pread_all(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert all(0 < length <= blockio.READ_AHEAD_CHUNK for _, length in asked)
    covered = [(offset, offset + length) for offset, length in asked]
    assert covered[0][0] == 1000 and covered[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
