"""The master target's BlockHashes and delta pairs, over in-process mutual TLS: the digests are
the target file's, only the pair's process server gets them, bad ranges are refused, and a delta
pair's existing disk is used as it is (never recreated; refused when its size is wrong)."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import grpc
import pytest

from siterecovery.agents.master_target import pairs as mt_pairs
from siterecovery.agents.master_target.target import TargetOptions
from siterecovery.common import blockhash, frames, pki
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import Harness, KiB, MiB, rpc_error, send, sha256
from .source_support import wait_for

BLOCK = blockhash.BLOCK_BYTES
DISK = 4 * MiB + 1000  # the last block is short


@pytest.fixture
def mt(tmp_path: Path):
    harness = Harness(tmp_path, options=TargetOptions(reserve_bytes=0))
    try:
        yield harness
    finally:
        harness.close()


def _old_disk(mt: Harness, name: str, size: int, seed: int = 1) -> Path:
    """An existing disk file on the datastore: random data in some blocks, holes elsewhere."""
    rng = random.Random(seed)
    path = mt.datastore / "vm" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for block in rng.sample(range(size // BLOCK), size // BLOCK // 2):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
        f.seek(size - 10)
        f.write(b"tail bytes")
    return path


def _hashes(mt: Harness, pair_id: str, offset: int, count: int, **stub) -> rpb.BlockHashesReply:
    return mt.stub(**stub).BlockHashes(rpb.BlockHashesRequest(pair_id=pair_id, offset=offset, block_count=count),
                                       timeout=30)


def test_digests_are_those_of_the_existing_disk_which_is_used_as_it_is(mt: Harness):
    path = _old_disk(mt, "disk0-flat.img", DISK)
    before, inode = sha256(path), path.stat().st_ino
    mt.assign("d1", DISK, target_path=str(path), sync_kind=rpb.SYNC_KIND_DELTA)
    data = path.read_bytes()
    blocks = blockhash.blocks_of(DISK)
    whole = _hashes(mt, "d1", 0, blocks)
    assert (whole.offset, whole.block_bytes, whole.present_blocks) == (0, BLOCK, blocks)
    assert whole.target_exists and whole.target_size_bytes == DISK
    assert whole.digests == blockhash.block_digests(data)
    assert whole.digests[-16:] == blockhash.block_digest(data[(blocks - 1) * BLOCK:])  # 1000 bytes, hashed as such
    part = _hashes(mt, "d1", 5 * BLOCK, 3)
    assert part.digests == whole.digests[5 * 16:8 * 16] and part.present_blocks == 3
    assert sha256(path) == before and path.stat().st_ino == inode, "the existing disk was not recreated"

    # A delta sync's frames land on it; the first sync journals no undo (the journal is this pair's, and empty).
    new = b"\x5a" * (2 * BLOCK)
    stream = [
        frames.sync_frame("d1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
        frames.write_frame("d1", 2, 7 * BLOCK, new),
        frames.zero_frame("d1", 3, 20 * BLOCK, BLOCK),
        frames.sync_frame("d1", 4, rpb.SYNC_PHASE_INITIAL_DONE, DISK),
    ]
    assert send(mt.stub(), "d1", DISK, stream).last_ack == 4
    expected = bytearray(data)
    expected[7 * BLOCK:9 * BLOCK] = new
    expected[20 * BLOCK:21 * BLOCK] = bytes(BLOCK)
    assert path.read_bytes() == bytes(expected)
    target = mt.pairs.target("d1")
    assert target.state["undo_records"] == 0 and target.state["ever_synced"]
    assert mt.status("d1").state == rpb.PAIR_STATE_REPLICATING
    after = _hashes(mt, "d1", 0, blocks)
    assert after.digests == blockhash.block_digests(bytes(expected))


def test_digests_wait_until_the_target_has_applied_the_stream_through_the_asked_seq(mt: Harness, monkeypatch):
    monkeypatch.setattr(mt_pairs, "APPLIED_WAIT_SECONDS", 0.2)
    # A delta resync of a pair that replicated before: its new INITIAL_STARTED is seq 4, and the
    # process server still holds frames 2-3 from before it. Digests read before they are applied
    # could judge a block equal that frame 3 then changes.
    mt.assign("d1", DISK)
    blocks = blockhash.blocks_of(DISK)
    before = [
        frames.sync_frame("d1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
        frames.sync_frame("d1", 2, rpb.SYNC_PHASE_INITIAL_DONE, DISK),
    ]
    assert send(mt.stub(), "d1", DISK, before).last_ack == 2

    def ask(through: int) -> rpb.BlockHashesReply:
        return mt.stub().BlockHashes(
            rpb.BlockHashesRequest(pair_id="d1", offset=0, block_count=blocks, applied_through_seq=through), timeout=30
        )

    code, reason, details = rpc_error(lambda: ask(4))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "target-catching-up")
    assert "through seq 2" in details and "needs 4" in details
    assert ask(2).digests == ask(0).digests == blockhash.zero_digests(0, DISK), "no condition, or one that holds"

    new = b"\xa5" * BLOCK
    stream = [*before, frames.write_frame("d1", 3, 3 * BLOCK, new)]
    assert send(mt.stub(), "d1", DISK, stream).last_ack == 3
    code, reason, details = rpc_error(lambda: ask(4))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "target-catching-up") and "through seq 3" in details

    stream.append(frames.sync_frame("d1", 4, rpb.SYNC_PHASE_INITIAL_STARTED, DISK))
    assert send(mt.stub(), "d1", DISK, stream).last_ack == 4
    reply = ask(4)
    assert reply.digests[3 * 16:4 * 16] == blockhash.block_digest(new), "frame 3 is in the digests"
    assert reply.digests == ask(3).digests

    # Asked while the frame is on its way: the answer waits for it instead of refusing.
    monkeypatch.setattr(mt_pairs, "APPLIED_WAIT_SECONDS", 60.0)
    answers: list[rpb.BlockHashesReply] = []
    asking = threading.Thread(target=lambda: answers.append(ask(5)))
    asking.start()
    target = mt.pairs.target("d1")
    wait_for(lambda: target._published._waiters, what="the request to wait for seq 5")  # CPython's Condition
    newer = b"\x5a" * BLOCK
    stream.append(frames.write_frame("d1", 5, 2 * BLOCK, newer))
    assert send(mt.stub(), "d1", DISK, stream).last_ack == 5
    asking.join(30)
    assert answers and answers[0].digests[2 * 16:3 * 16] == blockhash.block_digest(newer)


def test_only_the_pairs_process_server_may_ask_and_only_for_ranges_inside_the_disk(mt: Harness):
    mt.assign("d1", DISK)
    blocks = blockhash.blocks_of(DISK)
    code, reason, _ = rpc_error(lambda: _hashes(mt, "d1", 0, 1, agent_id="ps-other"))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong-process-server")
    code, reason, _ = rpc_error(lambda: _hashes(mt, "nope", 0, 1))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "pair-not-assigned")
    for role in (pki.SOURCE, pki.ADMIN, pki.MASTER_TARGET):
        code, _reason, _ = rpc_error(lambda role=role: _hashes(mt, "d1", 0, 1, agent_id="x", role=role))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    for offset, count in [
        (0, 0), (0, blockhash.MAX_BLOCKS_PER_CALL + 1), (1, 1), (BLOCK - 1, 1), (blocks * BLOCK, 1),
        ((blocks - 1) * BLOCK, 2), (0, blocks + 1), (2**64 - BLOCK, 1), (2**63, 16384),
    ]:
        code, reason, details = rpc_error(lambda o=offset, c=count: _hashes(mt, "d1", o, c))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "hash-range-invalid"), (offset, count, details)
    assert _hashes(mt, "d1", (blocks - 1) * BLOCK, 1).present_blocks == 1


def test_a_delta_pair_onto_a_disk_of_another_size_is_refused_and_the_disk_left_alone(mt: Harness):
    path = _old_disk(mt, "small.img", DISK - BLOCK)
    before = sha256(path)
    mt.assign("d1", DISK, target_path=str(path), sync_kind=rpb.SYNC_KIND_DELTA)
    code, reason, details = rpc_error(lambda: _hashes(mt, "d1", 0, 1))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "target-size-mismatch")
    status = mt.status("d1")
    assert status.state == rpb.PAIR_STATE_ERROR and status.reason_code == "target-size-mismatch"
    assert "delta sync" in status.reason and "resize" in status.reason
    assert sha256(path) == before and path.stat().st_size == DISK - BLOCK


def test_blocks_the_file_lacks_are_reported_absent(mt: Harness):
    assignment = mt.assign("d1", DISK, sync_kind=rpb.SYNC_KIND_DELTA)
    path = Path(assignment.target_path)
    assert path.stat().st_size == DISK  # a missing delta target is created empty (sparse)
    blocks = blockhash.blocks_of(DISK)
    empty = _hashes(mt, "d1", 0, blocks)
    assert empty.digests == blockhash.zero_digests(0, DISK) and empty.present_blocks == blocks
    os.truncate(path, 10 * BLOCK + 100)  # someone cut the file under us
    cut = _hashes(mt, "d1", 8 * BLOCK, 4)
    assert cut.present_blocks == 2 and cut.target_size_bytes == 10 * BLOCK + 100
    assert cut.digests[32:] == bytes(32)
    os.unlink(path)
    gone = _hashes(mt, "d1", 0, 4)
    assert not gone.target_exists and gone.present_blocks == 0 and gone.digests == bytes(64)


def test_hashing_a_large_sparse_disk_reads_only_its_data(mt: Harness):
    size = 1024 * MiB
    mt.assign("big", size, sync_kind=rpb.SYNC_KIND_DELTA)
    path = Path(mt.assignments["big"].target_path)
    with open(path, "r+b") as f:
        f.seek(300 * MiB)
        f.write(b"\x01" * (64 * KiB))
    reply = _hashes(mt, "big", 0, blockhash.MAX_BLOCKS_PER_CALL)
    assert len(reply.digests) == 256 * KiB and reply.ByteSize() < 300 * KiB
    digests = reply.digests
    nonzero = [i for i in range(len(digests) // 16) if digests[i * 16:(i + 1) * 16] != blockhash.zero_digest()]
    assert nonzero == [300 * MiB // BLOCK]
