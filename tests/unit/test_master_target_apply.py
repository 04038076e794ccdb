"""The master target's Apply and Materialize over in-process mutual TLS: the target equals
the reference disk, every point materialises exactly, bad input changes nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from siterecovery.agents.master_target.target import TargetOptions
from siterecovery.common import frames, pki
from siterecovery.common.pb import replication_pb2 as rpb

from ..page_residency import PAGE, resident_pages
from .mt_support import (
    PS_ID,
    Harness,
    KiB,
    MiB,
    make_stream,
    reference_hash,
    rpc_error,
    send,
    sha256,
    tag_hashes,
)

DISK = 4 * MiB


@pytest.fixture
def mt(tmp_path: Path):
    # Small batches and segments: many group commits, overlaps inside batches, several segments.
    harness = Harness(tmp_path, options=TargetOptions(batch_frames=16, segment_bytes=512 * KiB, reserve_bytes=0))
    try:
        yield harness
    finally:
        harness.close()


def _materialize(mt: Harness, pair_id: str, point: str, output: Path | str = "") -> rpb.MaterializeReply:
    return mt.admin().Materialize(
        rpb.MaterializeRequest(pair_id=pair_id, point=point, output_path=str(output)), timeout=60
    )


def test_stream_matches_the_reference_and_every_point_materialises_exactly(mt: Harness):
    stream = make_stream("p1", seed=11, disk_size=DISK, count=420, done_at=40)
    assignment = mt.assign("p1", DISK)
    result = send(mt.stub(), "p1", DISK, stream)
    assert result.durable_seq == 0 and result.last_ack == stream[-1].seq
    target = Path(assignment.target_path)
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq)

    status = mt.status("p1")
    expected = tag_hashes(stream, DISK)
    assert status.state == rpb.PAIR_STATE_REPLICATING and status.last_seq == stream[-1].seq
    assert [p.tag_id for p in status.points] == list(expected), "only tags after INITIAL_DONE, oldest first"
    assert status.applied_bytes_total == sum(f.write.length for f in stream if f.HasField("write"))
    backs = [p.journal_bytes_back for p in status.points]
    assert backs == sorted(backs, reverse=True) and backs[0] > 0
    assert status.journal_bytes >= backs[0]
    assert len(list(Path(assignment.journal_dir).glob("*.seg"))) > 1, "the journal rotated segments"

    latest = _materialize(mt, "p1", "latest")
    assert latest.path == str(target) and not latest.copied and latest.seq == stream[-1].seq

    for tag_id, (seq, at_tag) in expected.items():
        out = mt.datastore / "copies" / f"{tag_id}.img"
        reply = _materialize(mt, "p1", tag_id, out)
        assert reply.copied and reply.path == str(out) and reply.seq == seq and reply.tag_id == tag_id
        assert sha256(out) == at_tag, f"point {tag_id} is not the disk as it was at seq {seq}"
        os.unlink(out)
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq), "materialising left the target alone"


def test_resending_applied_frames_changes_nothing(mt: Harness):
    stream = make_stream("p1", seed=5, disk_size=DISK, count=120)
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream[:80])
    before = mt.status("p1")
    # The process server did not get the acks: it resends everything, and then the rest.
    again = send(mt.stub(), "p1", DISK, stream, resume=False)
    assert again.durable_seq == stream[79].seq and again.acks and again.acks[-1] == stream[-1].seq
    after = mt.status("p1")
    assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, stream[-1].seq)
    assert after.applied_bytes_total == sum(f.write.length for f in stream if f.HasField("write"))
    assert [p.tag_id for p in after.points][: len(before.points)] == [p.tag_id for p in before.points]

    # Only frames already applied: acknowledged, nothing written.
    digest = sha256(Path(assignment.target_path))
    journal = after.journal_bytes
    dup = send(mt.stub(), "p1", DISK, stream[10:30], resume=False)
    assert dup.acks == [stream[-1].seq] * len(dup.acks) and dup.acks
    assert sha256(Path(assignment.target_path)) == digest and mt.status("p1").journal_bytes == journal


def test_a_bad_checksum_is_refused_and_nothing_of_it_is_written(mt: Harness):
    stream = make_stream("p1", seed=7, disk_size=DISK, count=90)
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream[:50])
    target = Path(assignment.target_path)
    digest = sha256(target)
    i = next(i for i in range(51, len(stream)) if stream[i].WhichOneof("body") == "write")
    good = frames.decompress(stream[i])

    bad = rpb.Frame()
    bad.CopyFrom(good)
    bad.write.data = bytes([good.write.data[0] ^ 1]) + good.write.data[1:]
    status, code, details = rpc_error(lambda: send(mt.stub(), "p1", DISK, [bad]))
    assert status == grpc.StatusCode.DATA_LOSS and code == "frame-checksum" and "not written" in details
    assert sha256(target) == digest and mt.status("p1").last_seq == stream[49].seq

    # Damaged compressed data is refused the same way.
    packed = frames.compress(frames.write_frame("p1", good.seq, 8192, bytes(range(256)) * 256))
    broken = rpb.Frame()
    broken.CopyFrom(packed)
    broken.write.data = packed.write.data[:-3] + b"xyz"
    status, _code, _details = rpc_error(lambda: send(mt.stub(), "p1", DISK, [broken]))
    assert status == grpc.StatusCode.DATA_LOSS and sha256(target) == digest

    # The frames before a bad one in the same stream are applied and acknowledged.
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, [*stream[50:i], bad]))
    assert status == grpc.StatusCode.DATA_LOSS and mt.status("p1").last_seq == stream[i - 1].seq
    assert sha256(target) == reference_hash(stream, DISK, stream[i - 1].seq)

    # The sender resends from durable_seq + 1, the good frame first.
    result = send(mt.stub(), "p1", DISK, stream)
    assert result.durable_seq == stream[i - 1].seq and result.last_ack == stream[-1].seq
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq)


def test_batches_are_applied_like_single_frames_with_cumulative_acks(mt: Harness):
    stream = make_stream("p1", seed=13, disk_size=DISK, count=300, done_at=30)
    assignment = mt.assign("p1", DISK)
    first = send(mt.stub(), "p1", DISK, stream[:100], batch=7)
    assert first.accepts_batches and first.last_ack == stream[99].seq
    assert first.acks == sorted(first.acks)
    rest = send(mt.stub(), "p1", DISK, stream, batch=40)  # resumes after durable_seq
    assert rest.durable_seq == stream[99].seq and rest.last_ack == stream[-1].seq
    assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, stream[-1].seq)
    assert [p.tag_id for p in mt.status("p1").points] == list(tag_hashes(stream, DISK))


def test_large_writes_leave_the_page_cache_once_durable_and_small_ones_stay(mt: Harness):
    # Small writes after a sync would land in the large folios it cached (common/pagecache.py).
    big, small = os.urandom(MiB), os.urandom(16 * KiB)
    stream = [
        frames.sync_frame("p1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
        frames.write_frame("p1", 2, 0, big),
        frames.write_frame("p1", 3, 2 * MiB, small),
        frames.sync_frame("p1", 4, rpb.SYNC_PHASE_INITIAL_DONE, DISK),
    ]
    assignment = mt.assign("p1", DISK)
    assert send(mt.stub(), "p1", DISK, stream).last_ack == 4
    target = Path(assignment.target_path)
    assert resident_pages(target, 0, MiB) == 0
    assert resident_pages(target, 2 * MiB, 16 * KiB) == 16 * KiB // PAGE
    with open(target, "rb") as f:
        assert f.read(MiB) == big and f.read(MiB) == bytes(MiB) and f.read(16 * KiB) == small


def test_a_batch_with_one_bad_frame_is_refused_whole_and_nothing_of_it_is_written(mt: Harness):
    stream = make_stream("p1", seed=17, disk_size=DISK, count=90)
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream[:40])
    target = Path(assignment.target_path)
    i = next(i for i in range(55, len(stream)) if stream[i].WhichOneof("body") == "write")
    good = frames.decompress(stream[i])
    bad = rpb.Frame()
    bad.CopyFrom(good)
    bad.write.data = bytes([good.write.data[0] ^ 1]) + good.write.data[1:]
    # One batch of good frames, then a batch whose one bad frame sits among good ones.
    damaged = [*stream[40:50], *stream[50:i], bad, *stream[i + 1 : i + 5]]
    status, code, details = rpc_error(lambda: send(mt.stub(), "p1", DISK, damaged, batch=10))
    assert status == grpc.StatusCode.DATA_LOSS and code == "frame-checksum"
    assert f"frame {bad.seq} failed its checksum" in details
    # The whole batches before the bad one's are applied; nothing of the bad one's batch is.
    at = damaged.index(bad) // 10 * 10
    applied = damaged[at - 1].seq if at else stream[39].seq
    assert mt.status("p1").last_seq == applied
    assert sha256(target) == reference_hash(stream, DISK, applied)

    beyond = frames.write_frame("p1", stream[-1].seq + 1, DISK - 512, os.urandom(4096))
    status, code, details = rpc_error(lambda: send(mt.stub(), "p1", DISK, [*stream, beyond], batch=500))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "frame-out-of-range" and "past the end" in details
    assert mt.status("p1").last_seq == applied and sha256(target) == reference_hash(stream, DISK, applied)

    result = send(mt.stub(), "p1", DISK, stream, batch=16)
    assert result.last_ack == stream[-1].seq
    assert sha256(target) == reference_hash(stream, DISK, stream[-1].seq)


def test_a_frame_past_the_end_of_the_disk_is_refused(mt: Harness):
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, make_stream("p1", seed=3, disk_size=DISK, count=10))
    target = Path(assignment.target_path)
    digest = sha256(target)
    beyond = frames.write_frame("p1", 100, DISK - 512, os.urandom(4096))
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, [beyond]))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "frame-out-of-range"
    zero_beyond = frames.zero_frame("p1", 100, DISK, 1)
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, [zero_beyond]))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "frame-out-of-range"
    assert sha256(target) == digest and mt.status("p1").last_seq < 100


def test_only_the_pairs_process_server_may_stream_and_only_assigned_pairs(mt: Harness):
    assignment = mt.assign("p1", DISK)
    mt.assign("elsewhere", DISK, master_target_id="mt-2")
    stream = make_stream("p1", seed=1, disk_size=DISK, count=20)
    status, code, details = rpc_error(lambda: send(mt.stub("ps-2"), "p1", DISK, stream))
    assert status == grpc.StatusCode.PERMISSION_DENIED and code == "wrong-process-server" and PS_ID in details
    status, code, _ = rpc_error(lambda: send(mt.stub(), "nope", DISK, stream))
    assert status == grpc.StatusCode.NOT_FOUND and code == "pair-not-assigned"
    status, code, _ = rpc_error(lambda: send(mt.stub(), "elsewhere", DISK, stream))
    assert status == grpc.StatusCode.NOT_FOUND
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK * 2, stream))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and code == "disk-size-mismatch"
    # The authorisation table: a source may not call Apply at all.
    status, _code, _ = rpc_error(lambda: send(mt.stub("src-1", pki.SOURCE), "p1", DISK, stream))
    assert status == grpc.StatusCode.PERMISSION_DENIED
    target = Path(assignment.target_path)
    assert target.stat().st_blocks == 0 and mt.status("p1").last_seq == 0, "nothing was written"


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("target_path", "{root}/datastore/../outside/disk.img"),
        ("target_path", "{root}/outside/disk.img"),
        ("target_path", "relative/disk.img"),
        ("target_path", "{root}/datastore"),
        ("journal_dir", "{root}/retention/../outside/journal"),
        ("journal_dir", "{root}/datastore/journal"),
    ],
)
def test_paths_outside_the_configured_directories_are_refused(mt: Harness, field: str, path: str):
    bad = path.format(root=mt.root)
    mt.assign("p1", DISK, **{field: bad})
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, make_stream("p1", seed=1, disk_size=DISK, count=5)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code in ("path-outside", "path-traversal", "path-invalid")
    assert not (mt.root / "outside").exists()
    assert mt.status("p1").state == rpb.PAIR_STATE_ERROR


def test_a_symlink_out_of_the_datastore_is_refused(mt: Harness, tmp_path: Path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    mt.datastore.mkdir(parents=True, exist_ok=True)
    (mt.datastore / "link").symlink_to(outside)
    mt.assign("p1", DISK, target_path=str(mt.datastore / "link" / "disk.img"))
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, []))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "path-outside"
    assert not any(outside.iterdir())


def test_materialize_refuses_bad_output_paths_and_unknown_points(mt: Harness):
    stream = make_stream("p1", seed=9, disk_size=DISK, count=80)
    mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream)
    tag = next(iter(tag_hashes(stream, DISK)))
    call = lambda out, point=tag: _materialize(mt, "p1", point, out)  # noqa: E731
    status, code, _ = rpc_error(lambda: call(mt.root / "outside.img"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "path-outside"
    status, code, _ = rpc_error(lambda: call(f"{mt.datastore}/../x.img"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and code == "path-traversal"
    existing = mt.datastore / "existing.img"
    existing.write_bytes(b"keep me")
    status, code, _ = rpc_error(lambda: call(existing))
    assert status == grpc.StatusCode.ABORTED and code == "output-exists" and existing.read_bytes() == b"keep me"
    status, code, details = rpc_error(lambda: call(mt.datastore / "x.img", "no-such-tag"))
    assert status == grpc.StatusCode.NOT_FOUND and code == "point-not-found" and tag in details
    assert not (mt.datastore / "x.img").exists() and not (mt.root / "outside.img").exists()
    # Materialize is the configuration server's (admin certificate), not a process server's.
    status, _code, _ = rpc_error(
        lambda: mt.stub().Materialize(rpb.MaterializeRequest(pair_id="p1", point="latest"), timeout=10)
    )
    assert status == grpc.StatusCode.PERMISSION_DENIED


def test_before_initial_done_there_are_no_points_and_latest_is_refused(mt: Harness):
    stream = make_stream("p1", seed=4, disk_size=DISK, count=60, done_at=None)
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream)
    status = mt.status("p1")
    assert status.state == rpb.PAIR_STATE_INITIAL_SYNC and not status.points
    assert status.journal_bytes < 64 * KiB, "the first initial sync journals no undo"
    assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, stream[-1].seq)
    code, err, _ = rpc_error(lambda: _materialize(mt, "p1", "latest"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err == "not-synced"


def test_a_paused_pair_refuses_streams(mt: Harness):
    mt.assign("p1", DISK, desired_state=rpb.PAIR_DESIRED_STATE_PAUSED)
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, make_stream("p1", seed=1, disk_size=DISK, count=5)))
    assert status == grpc.StatusCode.UNAVAILABLE and code == "pair-paused"


def test_a_newer_stream_replaces_an_older_one(mt: Harness):
    stream = make_stream("p1", seed=2, disk_size=DISK, count=40)
    assignment = mt.assign("p1", DISK)
    import threading

    held = threading.Event()
    release = threading.Event()
    outcome: list[object] = []

    def stalled():
        # Opens, sends a few frames, then stalls without closing (a half-dead connection).
        def requests():
            yield rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id="p1", disk_size_bytes=DISK))
            for frame in stream[:10]:
                yield rpb.ReplicationMessage(frame=frame)
            held.set()
            release.wait(30)

        try:
            for _reply in mt.stub().Apply(requests(), timeout=30):
                pass
            outcome.append("ended")
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    thread = threading.Thread(target=stalled)
    thread.start()
    assert held.wait(10)
    # The older stream is open at the master target (it applied its frames)
    # before the newer one starts: "newer" is the order the server sees.
    deadline = time.monotonic() + 30
    while mt.status("p1").last_seq < stream[9].seq:
        assert time.monotonic() < deadline, "the older stream's frames were never applied"
        time.sleep(0.01)
    result = send(mt.stub(), "p1", DISK, stream)
    release.set()
    thread.join(30)
    assert result.last_ack == stream[-1].seq
    assert outcome and outcome[0] == grpc.StatusCode.CANCELLED
    assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, stream[-1].seq)


def test_a_paused_pair_is_put_back_to_a_point_in_place_once_and_then_takes_no_frames(mt: Harness):
    stream = make_stream("p1", seed=23, disk_size=DISK, count=300, done_at=30)
    assignment = mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream)
    target = Path(assignment.target_path)
    latest = sha256(target)
    tags = tag_hashes(stream, DISK)
    tag_id, (seq, at_tag) = list(tags.items())[len(tags) // 2]

    def revert(point: str) -> rpb.MaterializeReply:
        return mt.admin().Materialize(rpb.MaterializeRequest(pair_id="p1", point=point, in_place=True), timeout=60)

    # Not while the pair replicates: refused, the disk untouched.
    status, code, _ = rpc_error(lambda: revert(tag_id))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "pair-not-paused")
    assert sha256(target) == latest

    mt.assign("p1", DISK, desired_state=rpb.PAIR_DESIRED_STATE_PAUSED)
    reply = revert(tag_id)
    assert (reply.path, reply.tag_id, reply.seq, reply.copied) == (str(target), tag_id, seq, False)
    assert reply.bytes_undone > 0 and sha256(target) == at_tag
    # Asked again (a step that runs twice): the same answer, nothing written again.
    assert revert(tag_id).bytes_undone == reply.bytes_undone and sha256(target) == at_tag
    other = next(t for t in tags if t != tag_id)
    assert rpc_error(lambda: revert(other))[1] == "pair-reverted"
    assert sha256(target) == at_tag

    # Resumed by mistake, the pair refuses frames rather than mix them into the older disk.
    mt.assign("p1", DISK, desired_state=rpb.PAIR_DESIRED_STATE_REPLICATING)
    more = make_stream("p1", seed=24, disk_size=DISK, count=20, start_seq=stream[-1].seq + 1, sync=False)
    status, code, _ = rpc_error(lambda: send(mt.stub(), "p1", DISK, more))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "pair-reverted")
    assert sha256(target) == at_tag
