"""The undo journal and the pair target without the network: exact points inside one batch,
torn tails, damaged records, a target that vanished, a journal of another pair."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from siterecovery.agents.master_target import journal
from siterecovery.agents.master_target import materialize as materializing
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import errors, frames
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import KiB, MiB, Reference, sha256

DISK = 1 * MiB
CRASH = rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT


def _target(root: Path, pair_id: str = "j", **options) -> PairTarget:
    target = PairTarget(
        pair_id=pair_id, target_path=root / "ds" / f"{pair_id}.img", journal_dir=root / "ret" / pair_id,
        disk_size=DISK, options=TargetOptions(reserve_bytes=0, **options),
    )
    target.open()
    return target


def _apply(target: PairTarget, batch: list[rpb.Frame]) -> None:
    target.apply([(f, frames.payload(f)) for f in batch])


def _synced(target: PairTarget) -> None:
    _apply(target, [frames.sync_frame(target.pair_id, 1, rpb.SYNC_PHASE_INITIAL_DONE, DISK)])


def test_points_inside_one_batch_are_exact(tmp_path: Path):
    target = _target(tmp_path)
    _synced(target)
    p = target.pair_id
    batch = [
        frames.write_frame(p, 2, 0, b"\x01" * (64 * KiB)),
        frames.tag_frame(p, 3, "t1", CRASH),
        frames.write_frame(p, 4, 32 * KiB, b"\x02" * (64 * KiB)),  # overlaps the first write
        frames.zero_frame(p, 5, 16 * KiB, 32 * KiB),  # overlaps both
        frames.tag_frame(p, 6, "t2", CRASH),
        frames.write_frame(p, 7, 40 * KiB, b"\x03" * (8 * KiB)),
        frames.tag_frame(p, 8, "t3", CRASH),
        frames.write_frame(p, 9, 0, b"\x04" * (128 * KiB)),
    ]
    _apply(target, batch)  # one group commit
    ref = Reference(DISK)
    expected = {}
    for frame in batch:
        ref.apply(frame)
        if frame.WhichOneof("body") == "tag":
            expected[frame.tag.tag_id] = ref.digest()
    assert sha256(target.target_path) == ref.digest()
    backs = [p.journal_bytes_back for p in target.status().points]
    assert backs == sorted(backs, reverse=True) and backs[-1] > 0
    for tag_id, digest in expected.items():
        out = tmp_path / "ds" / f"{tag_id}.img"
        materializing.materialize(target, tag_id, str(out), [tmp_path / "ds"])
        assert sha256(out) == digest, tag_id


def test_a_torn_tail_is_dropped_at_open(tmp_path: Path):
    target = _target(tmp_path)
    _synced(target)
    _apply(target, [frames.write_frame("j", 2, 0, os.urandom(8192)), frames.tag_frame("j", 3, "t", CRASH)])
    digest = sha256(target.target_path)
    target.close()
    (segment,) = sorted((tmp_path / "ret" / "j").glob("*.seg"))
    size = segment.stat().st_size
    with open(segment, "ab") as f:
        # Half an undo record, as a crash in the middle of an append leaves it.
        f.write(journal.MAGIC + bytes([journal.KIND_UNDO]) + b"\0\0\0" + (9000).to_bytes(4, "little") + b"x" * 100)
    reopened = _target(tmp_path)
    assert reopened.applied_seq == 3 and [p.tag_id for p in reopened.status().points] == ["t"]
    assert segment.stat().st_size == size and sha256(reopened.target_path) == digest


def test_a_damaged_record_fails_materialise_with_data_loss_and_leaves_no_file(tmp_path: Path):
    target = _target(tmp_path)
    _synced(target)
    _apply(target, [frames.write_frame("j", 2, 0, b"\x05" * 8192), frames.tag_frame("j", 3, "old", CRASH)])
    _apply(target, [frames.write_frame("j", 4, 0, b"\x06" * 8192)])
    (segment,) = sorted((tmp_path / "ret" / "j").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    at = data.rfind(b"\x05" * 64)  # the old contents journaled before seq 4
    data[at] ^= 0xFF
    segment.write_bytes(bytes(data))
    out = tmp_path / "ds" / "old.img"
    with pytest.raises(errors.Integrity) as caught:
        materializing.materialize(target, "old", str(out), [tmp_path / "ds"])
    assert caught.value.code == "journal-corrupt" and not out.exists()


def test_a_vanished_target_disk_is_not_silently_recreated(tmp_path: Path):
    target = _target(tmp_path)
    _synced(target)
    _apply(target, [frames.write_frame("j", 2, 0, os.urandom(4096))])
    target.close()
    target.target_path.unlink()
    with pytest.raises(errors.PreconditionFailed) as caught:
        _target(tmp_path)
    assert caught.value.code == "target-missing" and not target.target_path.exists()


def test_a_target_of_another_size_is_refused(tmp_path: Path):
    path = tmp_path / "ds" / "j.img"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07" * 4096)
    with pytest.raises(errors.PreconditionFailed) as caught:
        _target(tmp_path)
    assert caught.value.code == "target-size-mismatch" and path.read_bytes() == b"\x07" * 4096


def test_a_journal_directory_of_another_pair_is_refused(tmp_path: Path):
    _target(tmp_path, "a").close()
    other = PairTarget(
        pair_id="b", target_path=tmp_path / "ds" / "b.img", journal_dir=tmp_path / "ret" / "a", disk_size=DISK,
        options=TargetOptions(reserve_bytes=0),
    )
    with pytest.raises(errors.Conflict):
        other.open()
    assert other.status().state == rpb.PAIR_STATE_ERROR


def test_zero_frames_read_back_as_zeros_and_journal_zeros_as_flags(tmp_path: Path):
    target = _target(tmp_path)
    _synced(target)
    _apply(target, [frames.write_frame("j", 2, 4096, b"\x09" * (256 * KiB))])
    before = target.state["undo_bytes"]
    _apply(target, [frames.zero_frame("j", 3, 0, DISK)])
    assert sha256(target.target_path) == hashlib.sha256(bytes(DISK)).hexdigest()
    # Only the non-zero old contents were stored (4 MiB undo chunks; zeros cost a flag).
    assert target.state["undo_bytes"] - before == DISK
    _apply(target, [frames.zero_frame("j", 4, 0, DISK)])
    assert target.state["undo_bytes"] - before == DISK, "zeroing zeros stores nothing"


def test_an_empty_target_file_is_a_new_disk_unless_the_journal_says_it_was_written(tmp_path: Path):
    path = tmp_path / "ds" / "j.img"
    path.parent.mkdir(parents=True)
    path.touch()  # what a hypervisor leaves for a new VM's disk
    target = _target(tmp_path)
    assert path.stat().st_size == target.disk_size
    _synced(target)
    _apply(target, [frames.write_frame("j", 2, 0, b"\x05" * 4096)])
    target.close()
    # Emptied behind our back after frames were applied: refused, and the file is left empty, not removed.
    os.truncate(path, 0)
    with pytest.raises(errors.PreconditionFailed) as caught:
        _target(tmp_path)
    assert caught.value.code == "target-missing" and path.exists() and path.stat().st_size == 0
