"""The master target's digest map (digestmap.py): trusted only when provably current, and every
digest it knows equals `blockhash` of the target file's block, through whole, partial and zero
writes, a reopen, a crash and a change of the file behind the master target's back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from siterecovery.agents.master_target import digestmap, hashes
from siterecovery.agents.master_target.digestmap import DigestMap
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import blockhash, errors, frames
from siterecovery.common.pb import replication_pb2 as rpb

B = blockhash.BLOCK_BYTES
D = blockhash.DIGEST_BYTES
DISK = 2 * 1024 * 1024 + 1000  # 33 blocks, the last one 1000 bytes


def _file(path: Path, size: int = DISK, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _open(tmp_path: Path, fd: int, target: Path, size: int = DISK) -> DigestMap:
    return DigestMap.open(tmp_path / "maps" / "t.map", target_path=target, target_fd=fd, disk_size=size)


def _write(m: DigestMap, fd: int, offset: int, data: bytes | None, length: int = 0) -> None:
    """Write as the master target does: forget, write, learn."""
    length = len(data) if data is not None else length
    with m.writing():
        m.forget(offset, length)
        os.pwrite(fd, data if data is not None else bytes(length), offset)
        m.learn(fd, [(offset, length, data)])


def _known(m: DigestMap) -> dict[int, bytes]:
    packed, _epoch = m.lookup(0, m.blocks)
    return {i: packed[i * D:(i + 1) * D] for i in range(m.blocks) if packed[i * D:(i + 1) * D] != blockhash.ABSENT}


def _check_known(m: DigestMap, path: Path) -> dict[int, bytes]:
    """Every digest the map knows is that of the file's block now."""
    data = path.read_bytes()
    known = _known(m)
    for block, digest in known.items():
        assert digest == blockhash.block_digest(data[block * B:(block + 1) * B]), block
    return known


@pytest.fixture
def target(tmp_path: Path):
    path = tmp_path / "ds" / "disk.img"
    _file(path)
    fd = os.open(path, os.O_RDWR)
    yield path, fd
    os.close(fd)


def test_writes_give_their_blocks_the_digests_of_the_file(tmp_path: Path, target, monkeypatch):
    monkeypatch.setattr(digestmap, "PARTIAL_BLOCKS", "read")  # partly written blocks read back
    path, fd = target
    m = _open(tmp_path, fd, path)
    assert m.opened_as == "missing" and _known(m) == {}
    rng = random.Random(7)
    _write(m, fd, 0, rng.randbytes(4 * B))  # whole blocks
    _write(m, fd, 5 * B + 100, rng.randbytes(3000))  # inside one block
    _write(m, fd, 8 * B - 10, rng.randbytes(2 * B + 20))  # two partial edges, two whole
    _write(m, fd, 12 * B, None, 2 * B)  # zeros
    _write(m, fd, 14 * B + 7, None, 100)  # a few zeros inside a block
    _write(m, fd, 32 * B, rng.randbytes(1000))  # the short last block, whole
    known = _check_known(m, path)
    assert set(known) == {0, 1, 2, 3, 5, 7, 8, 9, 10, 12, 13, 14, 32}
    # A batch of overlapping writes: each block ends with the digest of its final contents.
    with m.writing():
        batch = [(20 * B, 2 * B, rng.randbytes(2 * B)), (20 * B + 50, 10, rng.randbytes(10)),
                 (21 * B, B, rng.randbytes(B)), (24 * B + 1, 5, None)]
        for offset, length, data in batch:
            m.forget(offset, length)
            os.pwrite(fd, data if data is not None else bytes(length), offset)
        m.learn(fd, batch)
    assert {20, 21, 24} <= set(_check_known(m, path))
    m.close(fd)


def test_partial_blocks_are_left_unknown_by_default(tmp_path: Path, target):
    assert digestmap.PARTIAL_BLOCKS == "forget"
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 3 * B - 10, random.randbytes(B + 20))
    assert set(_check_known(m, path)) == {3}
    m.close(fd)


def test_a_clean_map_of_an_unchanged_file_is_trusted_after_a_reopen(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(6 * B))
    m.close(fd)
    again = _open(tmp_path, fd, path)
    assert again.opened_as == "trusted"
    assert set(_check_known(again, path)) == set(range(6))
    again.close(fd)


def test_a_map_whose_stamp_does_not_match_the_file_is_not_trusted(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(6 * B))
    m.close(fd)
    with open(path, "r+b") as f:  # a VM writes the disk after failover
        f.seek(2 * B)
        f.write(b"written behind the master target's back")
    again = _open(tmp_path, fd, path)
    assert again.opened_as.startswith("the target file changed") and _known(again) == {}
    again.close(fd)


def test_the_clean_stamp_is_taken_a_clock_tick_after_the_last_write(tmp_path: Path, target):
    # File timestamps come from a coarse clock: a write in the same tick as our last one could
    # leave them unchanged (kernels before 6.13), so close waits until that tick is over.
    import time

    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(2 * B))
    m.close(fd)
    st = os.stat(path)
    assert time.time_ns() >= max(st.st_mtime_ns, st.st_ctime_ns) + digestmap.TICK_NS


def test_a_file_touched_back_to_its_old_mtime_is_still_caught(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(2 * B))
    m.close(fd)
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b"changed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before; ctime moves anyway
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    assert _open(tmp_path, fd, path).opened_as.startswith("the target file changed")


def test_a_map_dirty_at_open_is_not_trusted(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(2 * B))
    m.close(fd)
    m = _open(tmp_path, fd, path)
    _write(m, fd, 4 * B, random.randbytes(B))
    # kill -9: no close. The header says dirty on disk already (before the file was written).
    raw = (tmp_path / "maps" / "t.map").read_bytes()
    assert digestmap.HEADER.unpack_from(raw)[2] == digestmap.DIRTY
    again = _open(tmp_path, fd, path)
    assert again.opened_as.startswith("dirty") and _known(again) == {}
    again.close(fd)
    m.close(-1)


def test_remembered_digests_make_the_map_dirty_until_closed(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    m.close(fd)
    m = _open(tmp_path, fd, path)
    assert m.opened_as == "trusted"
    _packed, epoch = m.lookup(0, 4)
    assert m.remember(epoch, 0, blockhash.range_digests(fd, 0, 4 * B))
    assert digestmap.HEADER.unpack_from((tmp_path / "maps" / "t.map").read_bytes())[2] == digestmap.DIRTY
    m.close(fd)
    again = _open(tmp_path, fd, path)
    assert set(_check_known(again, path)) == {0, 1, 2, 3}
    again.close(fd)


def test_digests_read_across_a_write_are_not_remembered(tmp_path: Path, target):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _packed, epoch = m.lookup(0, 4)
    stale = blockhash.range_digests(fd, 0, 4 * B)
    _write(m, fd, 0, random.randbytes(B))  # a batch lands between the read and the store
    assert not m.remember(epoch, 0, stale)
    with m.writing():  # and while one is under way
        _packed, epoch = m.lookup(0, 4)
        assert not m.remember(epoch, 0, stale)
    _check_known(m, path)
    m.close(fd)


@pytest.mark.parametrize("damage", ["header", "digests", "length", "other-path", "other-size"])
def test_a_corrupt_or_foreign_map_is_discarded(tmp_path: Path, target, damage: str):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(4 * B))
    m.close(fd)
    map_file = tmp_path / "maps" / "t.map"
    size = DISK
    if damage == "header":
        with open(map_file, "r+b") as f:
            f.seek(20)
            f.write(b"\xff")
    elif damage == "digests":
        with open(map_file, "r+b") as f:
            f.seek(digestmap.HEADER_BYTES + 2 * D + 3)
            f.write(b"\x01")
    elif damage == "length":
        with open(map_file, "r+b") as f:
            f.truncate(digestmap.HEADER_BYTES + 10 * D)
    elif damage == "other-path":
        path = path.with_name("other.img")
    else:
        size = DISK - B
    again = DigestMap.open(map_file, target_path=path, target_fd=fd, disk_size=size)
    assert again.opened_as != "trusted" and _known(again) == {}
    again.close(fd)


# -- through PairTarget: every write path keeps the map right ----------------------------------


def _pair(tmp_path: Path, pair_id: str, **kw) -> PairTarget:
    t = PairTarget(pair_id=pair_id, target_path=tmp_path / "ds" / "disk.img", journal_dir=tmp_path / "ret" / pair_id,
                   disk_size=DISK, options=TargetOptions(reserve_bytes=0),
                   digest_map=tmp_path / "ret" / digestmap.DIR_NAME / "disk.map", **kw)
    t.open()
    return t


def _reply(t: PairTarget) -> bytes:
    return hashes.target_hashes(t.target_path, 0, blockhash.blocks_of(DISK), DISK, t.digests).digests


def test_a_pair_target_keeps_the_map_through_applies_rollback_and_a_new_pair(tmp_path: Path):
    rng = random.Random(3)
    first = _pair(tmp_path, "p1")
    stream = [frames.sync_frame("p1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
              frames.write_frame("p1", 2, 0, rng.randbytes(DISK)),
              frames.sync_frame("p1", 3, rpb.SYNC_PHASE_INITIAL_DONE, DISK)]
    first.apply([(f, frames.payload(f)) for f in stream])
    assert len(_check_map(first)) == blockhash.blocks_of(DISK)  # a full sync learns every block
    # Continuous 16 KiB writes (journaled with undo now), a zero range, then a batch that fails
    # after writing: rolled back, its blocks unknown until read again.
    more = [frames.write_frame("p1", 4, 3 * B + 16384, rng.randbytes(16384)),
            frames.zero_frame("p1", 5, 10 * B, B + 4096)]
    first.apply([(f, frames.payload(f)) for f in more])
    _check_map(first)

    def fail(step: str) -> None:
        if step == "target-synced":
            raise OSError(5, "injected")
    first.crash_hook = fail
    bad = frames.write_frame("p1", 6, 20 * B, rng.randbytes(B))
    with pytest.raises(errors.Unavailable):
        first.apply([(bad, frames.payload(bad))])
    first.crash_hook = None
    assert 20 not in _check_map(first)
    assert _reply(first) == blockhash.block_digests((tmp_path / "ds" / "disk.img").read_bytes())
    first.close()

    # A new pair onto the same file finds the map trusted and answers from it.
    second = _pair(tmp_path, "p2", delta=True)
    assert second.digests.opened_as == "trusted"
    assert len(_check_map(second)) == blockhash.blocks_of(DISK)
    assert _reply(second) == blockhash.block_digests((tmp_path / "ds" / "disk.img").read_bytes())
    second.close()


def _check_map(t: PairTarget) -> dict[int, bytes]:
    data = t.target_path.read_bytes()
    packed, _ = t.digests.lookup(0, blockhash.blocks_of(DISK))
    known = {}
    for i in range(blockhash.blocks_of(DISK)):
        digest = packed[i * D:(i + 1) * D]
        if digest != blockhash.ABSENT:
            assert digest == blockhash.block_digest(data[i * B:(i + 1) * B]), i
            known[i] = digest
    return known


def test_block_hashes_answer_from_the_map_without_reading_known_blocks(tmp_path: Path, monkeypatch):
    t = _pair(tmp_path, "p1")
    data = random.randbytes(DISK)
    f = frames.write_frame("p1", 1, 0, data)
    t.apply([(f, frames.payload(f))])
    read: list[tuple[int, int]] = []
    real = blockhash.range_digests
    monkeypatch.setattr(blockhash, "range_digests", lambda fd, s, e: read.append((s, e)) or real(fd, s, e))
    t.digests.forget(4 * B, 2 * B)  # as if never learnt
    assert _reply(t) == blockhash.block_digests(data)
    assert read == [(4 * B, 6 * B)]
    read.clear()
    assert _reply(t) == blockhash.block_digests(data)
    assert read == [], "what was read once is remembered"
    t.close()


def test_a_map_file_that_fails_makes_the_map_give_up_not_the_writes(tmp_path: Path, target, monkeypatch):
    path, fd = target
    m = _open(tmp_path, fd, path)
    _write(m, fd, 0, random.randbytes(2 * B))
    assert set(_known(m)) == {0, 1}

    def full(*_args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(digestmap.blockio, "pwrite_all", full)
    _write(m, fd, 0, random.randbytes(B))  # the target write goes on; the map cannot follow it
    monkeypatch.undo()
    assert _known(m) == {}, "a map that could not forget block 0 knows nothing any more"
    m.close(fd)
    assert _open(tmp_path, fd, path).opened_as.startswith("dirty")


# -- through MasterTargetPairs: the map outlives a pair, and goes with its deleted target ---------


def test_a_map_is_kept_for_the_next_pair_onto_the_file_and_removed_with_the_file(tmp_path: Path):
    from .mt_support import Harness, send

    mt = Harness(tmp_path, options=TargetOptions(reserve_bytes=0))
    try:
        path = mt.datastore / "host" / "disk.img"
        mt.assign("p1", DISK, target_path=str(path))
        data = random.randbytes(DISK)
        stream = [frames.sync_frame("p1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
                  frames.write_frame("p1", 2, 0, data[:1024 * 1024]),
                  frames.write_frame("p1", 3, 1024 * 1024, data[1024 * 1024:]),
                  frames.sync_frame("p1", 4, rpb.SYNC_PHASE_INITIAL_DONE, DISK)]
        assert send(mt.stub(), "p1", DISK, stream).last_ack == 4
        map_file = digestmap.map_path(mt.retention / digestmap.DIR_NAME, path.resolve())
        del mt.assignments["p1"]
        mt.pairs.apply_assignments([], [])
        # The next pair (new id, same file) waits for the old one's close and trusts what it saved.
        mt.assign("p2", DISK, target_path=str(path), sync_kind=rpb.SYNC_KIND_DELTA)
        second = mt.pairs.target("p2")
        assert second.digests.opened_as == "trusted"
        assert len(_check_map(second)) == blockhash.blocks_of(DISK)
        del mt.assignments["p2"]
        path.unlink()  # the pair's target is deleted with it
        mt.pairs.apply_assignments([], [])
        for thread in list(mt.pairs._closing.values()):
            thread.join(30)
        assert not map_file.exists()
    finally:
        mt.close()
