"""The retention directory: when it is full the pair pauses with nothing written and
resumes when space returns; the retention window prunes old segments and their points.

A full disk is played three ways: the free-space check reports no room
(monkeypatched `journal.free_bytes`), the write itself fails with ENOSPC halfway
through a record (monkeypatched `journal._pwritev`), and - when the tests run as
root and may mount - a real 1 MiB tmpfs as the retention directory.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from siterecovery.agents.master_target import journal
from siterecovery.agents.master_target.target import TargetOptions
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import (
    T0,
    Harness,
    KiB,
    MiB,
    Reference,
    make_stream,
    reference_hash,
    rpc_error,
    send,
    sha256,
    tag_hashes,
)

DISK = 4 * MiB
OPTIONS = TargetOptions(batch_frames=16, batch_bytes=1 * MiB, segment_bytes=256 * KiB, reserve_bytes=0)


@pytest.fixture
def mt(tmp_path: Path):
    harness = Harness(tmp_path, options=OPTIONS)
    try:
        yield harness
    finally:
        harness.close()


def _journal_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.glob("*.seg"))}


def _no_uncommitted_tail(journal_dir: Path) -> bool:
    """A fresh look at the journal finds no undo after the last commit and no torn bytes."""
    sizes = _journal_files(journal_dir)
    fresh = journal.UndoJournal(journal_dir, segment_bytes=OPTIONS.segment_bytes, reserve_bytes=0)
    try:
        _state, uncommitted = fresh.open({})
    finally:
        fresh.close()
    return not uncommitted and _journal_files(journal_dir) == sizes


def _full_then_resume(mt: Harness, make_full, make_roomy) -> None:
    stream = make_stream("p1", seed=21, disk_size=DISK, count=200)
    assignment = mt.assign("p1", DISK)
    target, journal_dir = Path(assignment.target_path), Path(assignment.journal_dir)
    send(mt.stub(), "p1", DISK, stream[:100])

    make_full()
    status, code, details = rpc_error(lambda: send(mt.stub(), "p1", DISK, stream))
    assert status == grpc.StatusCode.UNAVAILABLE and code == "retention-full"
    assert str(journal_dir) in details
    paused = mt.status("p1")
    assert paused.state == rpb.PAIR_STATE_PAUSED and paused.reason_code == "retention-full"
    assert str(journal_dir) in paused.reason and "retention window" in paused.reason
    assert paused.last_seq < stream[-1].seq
    assert sha256(target) == reference_hash(stream, DISK, paused.last_seq), "nothing of the failed batch was written"
    assert _no_uncommitted_tail(journal_dir), "the partial undo tail was truncated"
    digest = sha256(target)

    # Still full: the next stream is refused at its open, before anything is written.
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, stream))
    assert status == grpc.StatusCode.UNAVAILABLE and code == "retention-full"
    assert sha256(target) == digest and mt.status("p1").last_seq == paused.last_seq

    make_roomy()
    result = send(mt.stub(), "p1", DISK, stream)
    assert result.durable_seq == paused.last_seq and result.last_ack == stream[-1].seq
    assert mt.status("p1").state == rpb.PAIR_STATE_REPLICATING
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq)
    expected = tag_hashes(stream, DISK)
    tag_id = next(iter(expected))
    out = mt.datastore / "old.img"
    mt.pairs.materialize(rpb.MaterializeRequest(pair_id="p1", point=tag_id, output_path=str(out)))
    assert sha256(out) == expected[tag_id][1]


def test_no_free_space_pauses_the_pair_and_space_returning_resumes_it(mt: Harness, monkeypatch):
    real = journal.free_bytes
    _full_then_resume(
        mt,
        lambda: monkeypatch.setattr(journal, "free_bytes", lambda _path: 0),
        lambda: monkeypatch.setattr(journal, "free_bytes", real),
    )


def test_enospc_halfway_through_an_undo_record_truncates_it_and_writes_nothing(mt: Harness, monkeypatch):
    real = os.pwritev
    budget = [0]

    def pwritev(fd, parts, offset):
        # Half of the first record that does not fit lands on disk, then the disk is full.
        size = sum(len(p) for p in parts)
        if size <= budget[0]:
            budget[0] -= size
            return real(fd, parts, offset)
        os.pwrite(fd, b"".join(parts)[: size // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def full():
        budget[0] = 40 * KiB  # a few records fit, then ENOSPC inside a batch
        monkeypatch.setattr(journal, "_pwritev", pwritev)

    _full_then_resume(mt, full, lambda: monkeypatch.setattr(journal, "_pwritev", real))


def _can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


@pytest.mark.skipif(not _can_mount(), reason="mounting a size-limited tmpfs needs root")
def test_a_real_full_retention_filesystem(tmp_path: Path):
    retention = tmp_path / "retention"
    retention.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(retention)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    harness = None
    try:
        harness = Harness(tmp_path, options=OPTIONS)

        def grow():
            subprocess.run(["mount", "-o", "remount,size=64m", str(retention)], check=True)

        _real_full(harness, grow)
    finally:
        if harness is not None:
            harness.close()
        subprocess.run(["umount", "-l", str(retention)], check=False)


def _real_full(mt: Harness, grow) -> None:
    # Overwrite data again and again: the journal outgrows 1 MiB.
    stream = make_stream("p1", seed=8, disk_size=DISK, count=400, max_write=64 * KiB)
    assignment = mt.assign("p1", DISK)
    target = Path(assignment.target_path)
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, stream))
    assert status == grpc.StatusCode.UNAVAILABLE and code == "retention-full"
    paused = mt.status("p1")
    assert paused.state == rpb.PAIR_STATE_PAUSED
    assert sha256(target) == reference_hash(stream, DISK, paused.last_seq), "the target is at applied_seq"
    grow()
    result = send(mt.stub(), "p1", DISK, stream)
    assert result.durable_seq == paused.last_seq and result.last_ack == stream[-1].seq
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq)


def test_the_retention_window_prunes_old_segments_and_their_points(tmp_path: Path):
    now = [T0 + 60]
    mt = Harness(
        tmp_path, options=TargetOptions(batch_frames=16, segment_bytes=128 * KiB, reserve_bytes=0, prune_interval=0),
        clock=lambda: now[0],
    )
    try:
        day = 86400
        old = make_stream("p1", seed=31, disk_size=DISK, count=150)
        assignment = mt.assign("p1", DISK, policy=rpb.RecoveryPolicy(retention_window_seconds=day))
        send(mt.stub(), "p1", DISK, old)
        ref = Reference(DISK)
        old_points = tag_hashes(old, DISK, ref)
        assert [p.tag_id for p in mt.status("p1").points] == list(old_points)
        journal_dir = Path(assignment.journal_dir)
        old_segments = sorted(p.name for p in journal_dir.glob("*.seg"))
        assert len(old_segments) > 2

        # Two days later by our clock alone: nothing expires, since the source's
        # capture times do not agree yet (a clock stepped forward must not prune).
        now[0] += 2 * day
        assert [p.tag_id for p in mt.status("p1").points] == list(old_points)
        assert sorted(p.name for p in journal_dir.glob("*.seg")) == old_segments

        # New frames captured two days later: now both clocks agree, and everything
        # captured before yesterday goes (the point at the last old seq stays whole).
        last_old = old[-1].seq
        new = make_stream("p1", seed=32, disk_size=DISK, count=120, start_seq=last_old + 1, t0=now[0], sync=False)
        send(mt.stub(), "p1", DISK, [*old, *new])
        new_points = tag_hashes(new, DISK, ref, synced=True)
        status = mt.status("p1")
        kept_old = [t for t, (seq, _) in old_points.items() if seq == last_old]
        assert [p.tag_id for p in status.points] == kept_old + list(new_points)
        assert not set(old_segments[:-1]) & {p.name for p in journal_dir.glob("*.seg")}
        gone = next(iter(old_points))
        code, err, _ = rpc_error(lambda: mt.admin().Materialize(
            rpb.MaterializeRequest(pair_id="p1", point=gone, output_path=str(mt.datastore / "gone.img")), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND and err == "point-not-found"
        for tag_id, (_seq, at_tag) in list(new_points.items())[:3]:
            out = mt.datastore / f"{tag_id}.img"
            mt.pairs.materialize(rpb.MaterializeRequest(pair_id="p1", point=tag_id, output_path=str(out)))
            assert sha256(out) == at_tag

        # The same after a restart: the pruned points stay gone, the rest stays exact.
        mt.pairs.close()
        mt.pairs.apply_assignments(list(mt.assignments.values()), [])
        assert [p.tag_id for p in mt.status("p1").points] == [p.tag_id for p in status.points]
    finally:
        mt.close()
