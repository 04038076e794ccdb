"""ProcessServer.BlockHashes for an Azure pair, against a real Azurite: the process server ends
the pair, so it reads the page blob itself (through its own storage credential) and hashes
it exactly as a master target hashes its file.

In process: the real ProcessServerPairs behind the real servicer, served over mutual TLS on
port 0 with a throwaway CA; the test plays the source agent. Every digest is checked against
`blockhash.block_digests` of a reference image of the disk.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from azure.storage.blob import ContainerClient

from siterecovery.agents.process_server import blob_hashes
from siterecovery.agents.process_server.azure_storage import StorageCredentialFile
from siterecovery.agents.process_server.blob_forwarder import BlobPolicy
from siterecovery.agents.process_server.daemon import ProcessServerServicer
from siterecovery.agents.process_server.pairs import ProcessServerPairs
from siterecovery.agents.process_server.spool import Spool
from siterecovery.common import blockhash, errors, frames, pki
from siterecovery.common.azure import vhd
from siterecovery.common.azure.pageblob import PageBlobDisk
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.grpcserver import Service, start_server
from siterecovery.common.pb import dataplane_pb2, dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb
from tests.tcp_proxy import TcpProxy

from .blob_support import FAST_RETRY, MiB, assignment, connection_string, write_credential
from .conftest import wait_for

B = blockhash.BLOCK_BYTES
# Not a whole number of blocks (the last one is short) nor of MiB (the blob pads it).
DISK = 3 * MiB + 5 * 512
BLOB = "web1-abcdef12/disk0.vhd"
SOURCE_ID, PS_ID = "src-1", "ps-1"
SEED = 20261129


@pytest.fixture
def container(azurite) -> Iterator[ContainerClient]:
    client = ContainerClient.from_connection_string(connection_string(azurite.port), f"h{uuid.uuid4().hex[:16]}")
    client.create_container()
    yield client
    client.delete_container()


class Harness:
    """The process server's pairs and servicer on port 0, and a client for any identity."""

    def __init__(self, root: Path, port: int, *, storage: bool = True) -> None:
        self.ca = pki.CertificateAuthority.load_or_create(root / "pki")
        self.credential = write_credential(root / "azure.conn", port)
        self.spool = Spool(root / "spool", limit_bytes=1 << 30)
        me = self.credentials(PS_ID, pki.PROCESS_SERVER)
        self.pairs = ProcessServerPairs(
            self.spool, credentials=lambda: me, state_dir=root / "state",
            storage=StorageCredentialFile(self.credential) if storage else None,
            blob_policy=BlobPolicy(retry=FAST_RETRY, initial_backoff=0.05, max_backoff=0.2, prune_interval=1e9),
        )
        self.server = start_server(
            host="127.0.0.1", port=0, credentials=me.server_credentials(),
            services=[Service(
                dataplane_pb2.DESCRIPTOR.services_by_name["ProcessServer"].full_name,
                ProcessServerServicer(SimpleNamespace(credentials=me), self.pairs.receiver, self.pairs),  # type: ignore[arg-type]
                dataplane_pb2_grpc.add_ProcessServerServicer_to_server,
            )],
        )

    def credentials(self, agent_id: str, role: str) -> AgentCredentials:
        sans = [pki.agent_dns_name(agent_id)] if role in pki.ENROLLABLE_ROLES else []
        key, cert = self.ca.issue_keypair(pki.Identity(id=agent_id, role=role), sans=sans)
        return AgentCredentials(pki.Identity(agent_id, role), key, cert, self.ca.cert_pem, "")

    def assign(self, *assignments: rpb.PairAssignment) -> None:
        self.pairs.apply_assignments(list(assignments), [])

    def ask(self, pair_id: str, offset: int, count: int, *, who: str = SOURCE_ID,
            applied_through_seq: int = 0) -> rpb.BlockHashesReply:
        channel = secure_channel(
            f"127.0.0.1:{self.server.port}", self.credentials(who, pki.SOURCE).channel_credentials(),
            target_name=pki.agent_dns_name(PS_ID),
        )
        with channel:
            return dataplane_pb2_grpc.ProcessServerStub(channel).BlockHashes(
                rpb.BlockHashesRequest(pair_id=pair_id, offset=offset, block_count=count,
                                       applied_through_seq=applied_through_seq), timeout=60
            )

    def close(self) -> None:
        self.pairs.close()
        self.server.stop(grace=0)
        self.spool.close()


@pytest.fixture
def ps(tmp_path, azurite) -> Iterator[Harness]:
    harness = Harness(tmp_path, azurite.port)
    yield harness
    harness.close()


def _pair(container: ContainerClient, pair_id: str = "pair-1", *, blob: str = BLOB, size: int = DISK,
          paused: bool = True) -> rpb.PairAssignment:
    """An Azure delta pair this process server ends (paused: its forwarder leaves the blob alone)."""
    return assignment(
        pair_id, size, container.container_name, blob, sync_kind=rpb.SYNC_KIND_DELTA,
        desired_state=rpb.PAIR_DESIRED_STATE_PAUSED if paused else rpb.PAIR_DESIRED_STATE_REPLICATING,
    )


def _refused(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    metadata = dict(caught.value.trailing_metadata() or ())
    return caught.value.code(), metadata.get("sr-error-code", ""), caught.value.details() or ""


def _older_disk(container: ContainerClient) -> bytearray:
    """An earlier protection's blob: random data here and there, a cleared stretch, an unaligned
    write, and junk in the padding after the disk (which is never the disk's); the disk as bytes."""
    rng = random.Random(SEED)
    disk = PageBlobDisk.open_or_create(container, BLOB, DISK)
    image = bytearray(DISK)
    for offset, length in [(0, 200 * 1024), (MiB, 64 * 1024), (MiB + 100_000, 7_000), (2 * MiB, DISK - 2 * MiB)]:
        data = rng.randbytes(length)
        disk.write(offset, data)
        image[offset:offset + length] = data
    disk.zero(2 * MiB + 3 * B, 2 * B + 512)
    image[2 * MiB + 3 * B:2 * MiB + 5 * B + 512] = bytes(2 * B + 512)
    padding = vhd.virtual_size(DISK) - DISK
    assert padding > 0
    container.get_blob_client(BLOB).upload_page(b"\xee" * padding, offset=DISK, length=padding)
    return image


def test_the_process_server_hashes_its_own_blob_as_a_master_target_hashes_a_file(ps, container, monkeypatch):
    image = _older_disk(container)
    ps.assign(_pair(container))
    blocks = blockhash.blocks_of(DISK)
    expected = blockhash.block_digests(image)
    # Small reads, so one call reads several runs; the result is the same.
    monkeypatch.setattr(blob_hashes, "RANGE_BYTES", 2 * B)
    reads: list[int] = []
    read = PageBlobDisk.read
    monkeypatch.setattr(PageBlobDisk, "read", lambda self, o, n: reads.append(n) or read(self, o, n))
    whole = ps.ask("pair-1", 0, blocks)
    assert whole.digests == expected
    # Only the blocks a written page touches were downloaded (here: those not all zeros).
    holding = [min(B, DISK - b * B) for b in range(blocks) if any(image[b * B:(b + 1) * B])]
    assert sum(reads) == sum(holding) < DISK and max(reads) <= 2 * B
    assert (whole.offset, whole.block_bytes, whole.present_blocks) == (0, B, blocks)
    # The disk's size, not the blob's (which has padding and a footer).
    assert whole.target_exists and whole.target_size_bytes == DISK
    # Any batch of blocks, the short last one included.
    for offset_block, count in [(0, 1), (3, 5), (16, 17), (blocks - 1, 1), (blocks - 20, 20)]:
        reply = ps.ask("pair-1", offset_block * B, count)
        assert reply.digests == expected[offset_block * 16:(offset_block + count) * 16], (offset_block, count)
        assert reply.present_blocks == count and reply.offset == offset_block * B
    # Never-written and cleared blocks are the digest of zeros, though not downloaded.
    assert expected[(2 * MiB // B + 3) * 16:(2 * MiB // B + 4) * 16] == blockhash.zero_digest()


def test_a_missing_blob_is_absent_and_a_blob_of_another_size_is_refused(ps, container):
    ps.assign(_pair(container), _pair(container, "pair-2", blob="web1-abcdef12/other.vhd"))
    reply = ps.ask("pair-1", 0, 4)
    assert reply.digests == blockhash.ABSENT * 4
    assert (reply.present_blocks, reply.target_exists, reply.target_size_bytes) == (0, False, 0)
    # Not even the container: the same (the forwarder creates both). Asked directly: a
    # forwarder's session would create the container first.
    gone = assignment("pair-3", DISK, f"gone{uuid.uuid4().hex[:12]}", BLOB, sync_kind=rpb.SYNC_KIND_DELTA)
    reply = blob_hashes.blob_block_hashes(
        gone, rpb.BlockHashesRequest(pair_id="pair-3", offset=0, block_count=2), StorageCredentialFile(ps.credential),
        policy=FAST_RETRY,
    )
    assert (reply.digests, reply.present_blocks, reply.target_exists) == (blockhash.ABSENT * 2, 0, False)

    PageBlobDisk.open_or_create(container, BLOB, DISK - 64 * 1024)
    code, reason, details = _refused(lambda: ps.ask("pair-1", 0, 1))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "target-size-mismatch")
    assert str(DISK) in details


def test_digests_wait_until_the_blob_holds_the_stream_through_the_asked_seq(ps, container):
    # `applied_seq` is what the pair's forwarder has written into the blob through; a delta
    # resync's digests must come after every frame up to its INITIAL_STARTED marker.
    image = _older_disk(container)
    storage = StorageCredentialFile(ps.credential)
    request = rpb.BlockHashesRequest(pair_id="pair-1", offset=0, block_count=2, applied_through_seq=7)
    with pytest.raises(errors.Unavailable) as behind:
        blob_hashes.blob_block_hashes(_pair(container), request, storage, applied_seq=6, policy=FAST_RETRY)
    assert behind.value.code == "target-catching-up"
    assert "through seq 6" in behind.value.message and "needs 7" in behind.value.message
    for applied in (7, 8, None):  # caught up, or no gate
        reply = blob_hashes.blob_block_hashes(_pair(container), request, storage, applied_seq=applied,
                                              policy=FAST_RETRY)
        assert reply.digests == blockhash.block_digests(image[:2 * B]), applied


def test_digests_asked_right_behind_the_sync_start_wait_for_the_forwarder_to_write_it(tmp_path, container, azurite):
    # A delta sync asks for digests right behind its INITIAL_STARTED; the forwarder writes
    # it a moment later. The answer waits for it (as a master target's does) instead of
    # refusing with target-catching-up, which sends the source into its retry backoff.
    image = _older_disk(container)
    proxy = TcpProxy()
    proxy.target = None  # the forwarder cannot reach Azure yet: the frames stay in the spool
    harness = Harness(tmp_path / "h", proxy.port)
    try:
        new_block = random.Random(SEED + 1).randbytes(B)
        harness.spool.log("pair-1").append([
            frames.sync_frame("pair-1", 1, rpb.SYNC_PHASE_INITIAL_STARTED, DISK),
            frames.write_frame("pair-1", 2, 0, new_block),
        ])
        harness.assign(_pair(container, paused=False))
        forwarder = harness.pairs._forwarders["pair-1"]
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(harness.ask, "pair-1", 0, 2, applied_through_seq=2)
            wait_for(lambda: forwarder.waiting or asked.done(), timeout=30, what="the answer held at the gate")
            assert not asked.done(), asked.exception()
            proxy.target = ("127.0.0.1", azurite.port)  # Azure back: the forwarder writes seq 1 and 2
            reply = asked.result(timeout=60)
        image[:B] = new_block
        assert reply.digests == blockhash.block_digests(image[:2 * B])
    finally:
        harness.close()
        proxy.close()


def test_the_caller_and_the_range_are_checked_before_azure_is_asked(ps, container):
    _older_disk(container)
    ps.assign(_pair(container))
    assert _refused(lambda: ps.ask("pair-1", 0, 1, who="src-other"))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED, "pair-not-yours")
    assert _refused(lambda: ps.ask("nope", 0, 1))[:2] == (grpc.StatusCode.NOT_FOUND, "pair-not-assigned")
    for offset, count in [(0, 0), (0, 16385), (100, 1), (DISK - DISK % B + B, 1), (0, blockhash.blocks_of(DISK) + 1)]:
        assert _refused(lambda o=offset, c=count: ps.ask("pair-1", o, c))[:2] == (
            grpc.StatusCode.INVALID_ARGUMENT, "hash-range-invalid"), (offset, count)


def test_an_unreachable_azure_is_unavailable_and_no_credential_is_a_precondition(tmp_path, container, azurite):
    proxy = TcpProxy()
    harness = Harness(tmp_path / "cut", proxy.port)
    bare = Harness(tmp_path / "bare", azurite.port, storage=False)
    try:
        proxy.target = None  # Azure unreachable: connections are refused
        harness.assign(_pair(container))
        code, reason, details = _refused(lambda: harness.ask("pair-1", 0, 1))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "azure-unavailable")
        assert "AccountKey" not in details and "sig=" not in details
        proxy.target = ("127.0.0.1", azurite.port)
        assert harness.ask("pair-1", 0, 1).present_blocks == 0
        bare.assign(_pair(container))
        assert _refused(lambda: bare.ask("pair-1", 0, 1))[:2] == (
            grpc.StatusCode.FAILED_PRECONDITION, "azure-storage-not-configured")
    finally:
        harness.close()
        bare.close()
        proxy.close()


def test_a_blob_still_written_by_another_pair_is_not_hashed_until_that_pair_has_stopped(ps, container):
    image = _older_disk(container)
    old, new = _pair(container, "pair-old", paused=False), _pair(container, "pair-new", paused=False)
    # Both name the blob (the old pair was disabled and the new one enabled between two heartbeats):
    # the one already writing keeps it, the other waits and its digests are refused meanwhile.
    ps.assign(old)
    ps.assign(old, new)
    code, reason, details = _refused(lambda: ps.ask("pair-new", 0, 1))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "azure-blob-busy") and "pair-old" in details
    assert [s.pair_id for s in ps.pairs.pair_statuses()] == ["pair-old"]
    ps.assign(new)  # the old pair is gone: its forwarder stops, the new one starts
    assert [s.pair_id for s in ps.pairs.pair_statuses()] == ["pair-new"]
    assert ps.ask("pair-new", 0, 2).digests == blockhash.block_digests(image[:2 * B])
