"""ProcessServer.BlockHashes in process: the real process server asks the real master target
(mt_support.Harness), over mutual TLS with one throwaway CA, for the pair's source only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from siterecovery.common import blockhash, frames, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import PS_ID, Harness, MiB
from .test_process_server import ProcessServer, wait_until

DISK = 8 * MiB
SOURCE_ID = "src-1"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Harness, ProcessServer]]:
    mt = Harness(tmp_path / "mt")
    ps = ProcessServer(tmp_path / "spool", mt.credentials(PS_ID, pki.PROCESS_SERVER))
    try:
        yield mt, ps
    finally:
        ps.close()
        mt.close()


def _assign(mt: Harness, ps: ProcessServer, pair_id: str = "p1", **changes) -> rpb.PairAssignment:
    assignment = mt.assign(pair_id, DISK, sync_kind=rpb.SYNC_KIND_DELTA, **changes)
    forwarded = rpb.PairAssignment()
    forwarded.CopyFrom(assignment)
    forwarded.master_target_endpoint = f"127.0.0.1:{mt.server.port}"
    ps.pairs.apply_assignments([forwarded], [])
    return forwarded


def _channel(mt: Harness, ps: ProcessServer, who: str = SOURCE_ID, role: str = pki.SOURCE) -> grpc.Channel:
    return secure_channel(
        f"127.0.0.1:{ps.server.port}", mt.credentials(who, role).channel_credentials(),
        target_name=pki.agent_dns_name(PS_ID),
    )


def _ask(mt: Harness, ps: ProcessServer, pair_id: str, offset: int, count: int, *, who: str = SOURCE_ID,
         role: str = pki.SOURCE, applied_through_seq: int = 0) -> rpb.BlockHashesReply:
    with _channel(mt, ps, who, role) as channel:
        return dataplane_pb2_grpc.ProcessServerStub(channel).BlockHashes(
            rpb.BlockHashesRequest(pair_id=pair_id, offset=offset, block_count=count,
                                   applied_through_seq=applied_through_seq),
            timeout=30,
        )


def _replicate(mt: Harness, ps: ProcessServer, pair_id: str, stream: list[rpb.Frame]) -> None:
    """Play the source: send `stream` to the process server, which spools it and forwards it."""

    def requests():
        yield rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id=pair_id, disk_size_bytes=DISK))
        for frame in stream:
            yield rpb.ReplicationMessage(frame=frame)

    with _channel(mt, ps) as channel:
        replies = list(dataplane_pb2_grpc.ProcessServerStub(channel).Replicate(requests(), timeout=30))
    assert max(r.ack.seq for r in replies if r.WhichOneof("kind") == "ack") == stream[-1].seq


def _refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), dict(caught.value.trailing_metadata() or ()).get("sr-error-code", "")


def test_the_source_gets_its_target_digests_through_the_process_server(chain):
    mt, ps = chain
    assignment = _assign(mt, ps)
    path = Path(assignment.target_path)
    with open(path, "r+b") as f:
        f.seek(3 * blockhash.BLOCK_BYTES)
        f.write(b"older copy" * 1000)
    blocks = DISK // blockhash.BLOCK_BYTES
    reply = _ask(mt, ps, "p1", 0, blocks)
    assert reply.present_blocks == blocks and reply.target_exists
    assert reply.digests == blockhash.block_digests(path.read_bytes())


def test_applied_through_seq_reaches_the_master_target(chain):
    mt, ps = chain
    _assign(mt, ps)
    blocks = DISK // blockhash.BLOCK_BYTES
    # Nothing applied yet: the master target is behind seq 1 and says so, through the process server.
    assert _refused(lambda: _ask(mt, ps, "p1", 0, blocks, applied_through_seq=1)) == (
        grpc.StatusCode.UNAVAILABLE, "target-catching-up")
    assert _ask(mt, ps, "p1", 0, blocks).present_blocks == blocks, "0: no condition"

    new = b"\x3c" * blockhash.BLOCK_BYTES
    _replicate(mt, ps, "p1", [
        frames.sync_frame("p1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
        frames.write_frame("p1", 2, 5 * blockhash.BLOCK_BYTES, new),
    ])
    wait_until(lambda: mt.pairs.target("p1").applied_seq >= 2, "the master target to apply seq 2")
    assert _refused(lambda: _ask(mt, ps, "p1", 0, blocks, applied_through_seq=3)) == (
        grpc.StatusCode.UNAVAILABLE, "target-catching-up")
    reply = _ask(mt, ps, "p1", 0, blocks, applied_through_seq=2)
    assert reply.digests[5 * 16:6 * 16] == blockhash.block_digest(new)


def test_the_process_server_checks_who_asks_and_what_before_asking_the_master_target(chain):
    mt, ps = chain
    _assign(mt, ps)
    assert _refused(lambda: _ask(mt, ps, "p1", 0, 1, who="src-other")) == (
        grpc.StatusCode.PERMISSION_DENIED, "pair-not-yours")
    assert _refused(lambda: _ask(mt, ps, "nope", 0, 1)) == (grpc.StatusCode.NOT_FOUND, "pair-not-assigned")
    for role in (pki.PROCESS_SERVER, pki.MASTER_TARGET, pki.ADMIN):
        code, _ = _refused(lambda role=role: _ask(mt, ps, "p1", 0, 1, who=SOURCE_ID, role=role))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    for offset, count in [(0, 0), (0, 16385), (100, 1), (DISK, 1), (DISK - 65536, 2), (2**64 - 65536, 1)]:
        assert _refused(lambda o=offset, c=count: _ask(mt, ps, "p1", o, c)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "hash-range-invalid"), (offset, count)


def test_the_master_targets_refusal_comes_back_unchanged(chain):
    mt, ps = chain
    wrong = mt.datastore / "wrong-size.img"
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(b"x" * 4096)
    _assign(mt, ps, target_path=str(wrong))
    assert _refused(lambda: _ask(mt, ps, "p1", 0, 1)) == (grpc.StatusCode.FAILED_PRECONDITION, "target-size-mismatch")
    # The master target is gone: UNAVAILABLE, which the source retries.
    mt.server.stop(grace=0)
    code, reason = _refused(lambda: _ask(mt, ps, "p1", 0, 1))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "unreachable")
