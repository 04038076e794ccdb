"""The process server's blob forwarder against a real Azurite: spooled frames become the
page blob, tags become snapshots, and a kill -9 at any moment resumes from the saved
applied seq (not from the start) and still ends at the exact disk.

Equality is by hash: the blob's first disk-size bytes (and each snapshot's) against
an in-memory reference disk that received the same frames.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient

from siterecovery.agents.process_server.azure_storage import StorageCredentialFile
from siterecovery.agents.process_server.blob_forwarder import BlobForwarder, BlobPolicy
from siterecovery.agents.process_server.spool import Spool
from siterecovery.common import frames
from siterecovery.common.azure import points, vhd
from siterecovery.common.pb import replication_pb2 as rpb
from tests.tcp_proxy import TcpProxy
from tests.unit.mt_support import T0, KiB, reference_hash, tag_hashes

from .blob_support import (
    FAST_RETRY,
    MiB,
    assignment,
    connection_string,
    run_until_written,
    sha256,
    spool_stream,
    write_credential,
)

SEED = int(os.environ.get("SR_BLOB_CRASH_SEED", "20261129"))
DISK = 2 * MiB + 3 * 512  # not a whole MiB: the blob pads it, the footer follows
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def container(azurite):
    client = ContainerClient.from_connection_string(connection_string(azurite.port), f"t{uuid.uuid4().hex[:16]}")
    client.create_container()
    yield client
    client.delete_container()


def _spec(tmp_path: Path, container: ContainerClient, azurite, seed: int, **extra) -> dict:
    return {
        "pair_id": f"pair-{seed % 10_000}",
        "seed": seed,
        "disk_size": DISK,
        "count": 140,
        "done_at": 2,
        "t0": T0,
        "max_write": 192 * KiB,
        "spool_dir": str(tmp_path / "spool"),
        "state_dir": str(tmp_path / "state"),
        "credential": str(write_credential(tmp_path / "azure.conn", azurite.port)),
        "container": container.container_name,
        "blob": "web1-abcdef12/disk0.vhd",
        "batch_frames": 7,
        **extra,
    }


def _run_child(spec: dict) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.blob_support", "child", json.dumps(spec)],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert result.returncode in (0, -9), result.stdout + result.stderr
    return result.returncode, result.stdout.split("\n")


def _blob(container: ContainerClient, name: str, size: int, snapshot: str | None = None) -> bytes:
    return container.get_blob_client(name, snapshot=snapshot).download_blob(offset=0, length=size).readall()


def _check_blob_and_points(container: ContainerClient, spec: dict, stream: list[rpb.Frame]) -> list[points.BlobPoint]:
    name, size = spec["blob"], spec["disk_size"]
    assert sha256(_blob(container, name, size)) == reference_hash(stream, size, stream[-1].seq)
    props = container.get_blob_client(name).get_blob_properties()
    assert props.size == vhd.virtual_size(size) + vhd.FOOTER_SIZE
    footer = container.get_blob_client(name).download_blob(offset=vhd.virtual_size(size), length=512).readall()
    assert vhd.parse(footer)["checksum_ok"]
    expected = tag_hashes(stream, size)
    found = points.list_points(container, name)
    assert [p.tag_id for p in found] == list(expected), "one snapshot per tag after the sync, in order, none twice"
    for point in found:
        seq, digest = expected[point.tag_id]
        assert point.extra["sr_pair_id"] == spec["pair_id"] and int(point.extra["sr_seq"]) == seq
        assert sha256(_blob(container, name, size, point.snapshot)) == digest, f"point {point.tag_id}"
    return found


def test_spooled_frames_become_the_blob_and_tags_its_snapshots(tmp_path, container, azurite):
    spec = _spec(tmp_path, container, azurite, SEED)
    stream = spool_stream(Path(spec["spool_dir"]), spec)
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    changes: list[int] = []
    forwarder = BlobForwarder(
        assignment(spec["pair_id"], DISK, spec["container"], spec["blob"]),
        spool, StorageCredentialFile(Path(spec["credential"])), Path(spec["state_dir"]),
        policy=BlobPolicy(batch_frames=7, retry=FAST_RETRY, prune_interval=1e9), on_change=lambda: changes.append(1),
    )
    try:
        status = run_until_written(forwarder, stream[-1].seq)
    finally:
        forwarder.stop()
    found = _check_blob_and_points(container, spec, stream)
    assert status.state == rpb.PAIR_STATE_REPLICATING and status.last_seq == stream[-1].seq
    assert [p.tag_id for p in status.points] == [p.tag_id for p in found] and changes
    assert status.points[0].note and status.points[0].seq > 0
    assert status.applied_bytes_total == sum(f.write.length for f in stream if f.WhichOneof("body") == "write")
    assert status.applied_captured_at.ToNanoseconds() == stream[-1].captured_at.ToNanoseconds()
    # Everything written was released from the spool, and the state file says so.
    log = spool.log(spec["pair_id"])
    assert (log.released_seq, log.pending_frames) == (stream[-1].seq, 0)
    saved = json.loads((Path(spec["state_dir"]) / "azure-pairs" / f"{spec['pair_id']}.json").read_text())
    assert (saved["applied_seq"], saved["sync"], saved["blob_created"]) == (stream[-1].seq, "done", True)
    assert os.stat(Path(spec["state_dir"]) / "azure-pairs" / f"{spec['pair_id']}.json").st_mode & 0o077 == 0
    spool.close()


CASES = [("page", 3), ("page", 25), ("page", 60), ("snapshot", 1), ("snapshot", 3)]


@pytest.mark.parametrize(("kind", "count"), CASES)
def test_kill9_mid_stream_resumes_from_the_saved_seq_and_ends_exact(tmp_path, container, azurite, kind, count):
    rng = random.Random(f"{SEED}-{kind}-{count}")
    spec = _spec(tmp_path, container, azurite, rng.randrange(1 << 30), batch_frames=rng.randint(3, 12))
    stream = spool_stream(Path(spec["spool_dir"]), spec)
    code, lines = _run_child({**spec, "kill": kind, "kill_count": count})
    assert code == -9, f"the child was not killed ({kind} #{count}): {lines}"
    code, lines = _run_child(spec)
    assert code == 0, lines
    resumed_at = int(lines[0].split()[1])
    done = lines[-2].split()
    assert int(done[1]) == stream[-1].seq
    _check_blob_and_points(container, spec, stream)
    if kind == "page" and count > 3 * spec["batch_frames"]:
        # Not from the start: the second run began after what the first one saved.
        assert resumed_at > 0
        total = sum(f.write.length for f in stream if f.WhichOneof("body") == "write")
        assert int(done[2]) < total, "the second run wrote everything again"
    print(f"[blob crash] kill -9 after {kind} #{count}; resumed at seq {resumed_at} of {stream[-1].seq}")


def _wait(forwarder: BlobForwarder, condition, what: str, timeout: float = 60.0) -> rpb.PairStatus:
    deadline = time.monotonic() + timeout
    while not condition(status := forwarder.status()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return status


def test_an_unreachable_azure_keeps_every_frame_in_the_spool_until_it_is_back(tmp_path, container, azurite):
    proxy = TcpProxy()
    proxy.target = ("127.0.0.1", azurite.port)
    spec = _spec(tmp_path, container, azurite, SEED + 1, count=60)
    write_credential(Path(spec["credential"]), proxy.port)
    stream = spool_stream(Path(spec["spool_dir"]) / "unused", spec)
    first, rest = stream[:30], stream[30:]
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    log = spool.log(spec["pair_id"])
    log.append(first)
    forwarder = BlobForwarder(
        assignment(spec["pair_id"], DISK, spec["container"], spec["blob"]),
        spool, StorageCredentialFile(Path(spec["credential"])), Path(spec["state_dir"]),
        policy=BlobPolicy(batch_frames=5, retry=FAST_RETRY, initial_backoff=0.05, max_backoff=0.2, prune_interval=1e9),
    )
    try:
        run_until_written(forwarder, first[-1].seq)
        proxy.target = None  # Azure unreachable: new connections are refused...
        proxy.cut()  # ...and open ones reset
        failed = forwarder.failures
        log.append(rest)
        # It keeps trying; nothing is released while nothing can be written, and that
        # is not an error of the pair (the spool's backlog shows it).
        status = _wait(forwarder, lambda s: forwarder.failures >= failed + 3, "three failed sessions")
        assert status.state != rpb.PAIR_STATE_ERROR, status.reason
        assert (log.released_seq, status.acked_seq) == (first[-1].seq, first[-1].seq)
        assert status.backlog_frames == len(rest) and not forwarder.connected
        proxy.target = ("127.0.0.1", azurite.port)
        # Written first, released from the spool after the state file: wait for both.
        status = _wait(forwarder, lambda s: s.acked_seq >= rest[-1].seq and s.backlog_frames == 0,
                       "the forwarder to catch up and release its spool")
    finally:
        forwarder.stop()
        proxy.close()
        spool.close()
    assert (status.backlog_frames, log.released_seq) == (0, rest[-1].seq)
    _check_blob_and_points(container, spec, stream)


def test_a_frame_that_fails_its_checksum_is_never_written(tmp_path, container, azurite):
    spec = _spec(tmp_path, container, azurite, SEED + 2, count=20)
    good = spool_stream(Path(spec["spool_dir"]) / "unused", spec)
    bad = rpb.Frame()
    bad.CopyFrom(frames.write_frame(spec["pair_id"], good[-1].seq + 1, 0, b"\x42" * 4096))
    bad.write.data = b"\x43" * 4096  # damaged after sealing
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    spool.log(spec["pair_id"]).append([*good, bad])
    forwarder = BlobForwarder(
        assignment(spec["pair_id"], DISK, spec["container"], spec["blob"]),
        spool, StorageCredentialFile(Path(spec["credential"])), Path(spec["state_dir"]),
        policy=BlobPolicy(batch_frames=50, retry=FAST_RETRY, prune_interval=1e9),
    )
    try:
        forwarder.start()
        status = _wait(forwarder, lambda s: s.state == rpb.PAIR_STATE_ERROR, "the refusal")
    finally:
        forwarder.stop()
        spool.close()
    assert status.reason_code == "frame-checksum" and status.acked_seq == good[-1].seq
    assert sha256(_blob(container, spec["blob"], DISK)) == reference_hash(good, DISK, good[-1].seq)


def test_expired_points_are_deleted_but_never_the_newest(tmp_path, container, azurite):
    spec = _spec(tmp_path, container, azurite, SEED + 3, count=100)
    stream = spool_stream(Path(spec["spool_dir"]), spec)
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    window = 30
    forwarder = BlobForwarder(
        assignment(spec["pair_id"], DISK, spec["container"], spec["blob"],
                   policy=rpb.RecoveryPolicy(retention_window_seconds=window)),
        spool, StorageCredentialFile(Path(spec["credential"])), Path(spec["state_dir"]),
        policy=BlobPolicy(retry=FAST_RETRY, prune_interval=1e9),
    )
    try:
        run_until_written(forwarder, stream[-1].seq)
        before = forwarder.points()
        newest = stream[-1].captured_at.ToNanoseconds() / 1e9
        kept = [p.tag_id for p in before if p.captured_at.ToNanoseconds() / 1e9 >= newest - window]
        assert len(kept) < len(before) - 1, "the stream should span more than the window"
        # A clock far ahead expires nothing more: the window ends at the newest capture.
        assert forwarder.prune(time.time() + 10**6) == len(before) - len(kept)
        assert [p.tag_id for p in forwarder.points()] == kept
        assert [p.tag_id for p in points.list_points(container, spec["blob"])] == kept
        forwarder.assignment = assignment(spec["pair_id"], DISK, spec["container"], spec["blob"],
                                          policy=rpb.RecoveryPolicy(retention_window_seconds=1))
        forwarder.prune(time.time() + 10**6)
        left = forwarder.points()
        assert left[-1].tag_id == before[-1].tag_id, "the newest point stays"
        assert all(p.captured_at.ToNanoseconds() / 1e9 >= newest - 1 for p in left[:-1])
    finally:
        forwarder.stop()
        spool.close()


def test_points_an_earlier_pair_left_on_the_blob_expire_with_the_window(tmp_path, container, azurite):
    """A reprotect to Azure after a failback writes the first protection's blob again, as a new pair."""
    first = _spec(tmp_path / "first", container, azurite, SEED + 7, count=60)
    stream = spool_stream(Path(first["spool_dir"]), first)
    spool = Spool(Path(first["spool_dir"]), limit_bytes=1 << 30)
    forwarder = BlobForwarder(
        assignment(first["pair_id"], DISK, first["container"], first["blob"]),
        spool, StorageCredentialFile(Path(first["credential"])), Path(first["state_dir"]),
        policy=BlobPolicy(retry=FAST_RETRY, prune_interval=1e9),
    )
    try:
        run_until_written(forwarder, stream[-1].seq)
        earlier = len(forwarder.points())
    finally:
        forwarder.stop()
        spool.close()
    assert earlier >= 2
    window = 30

    def on_blob() -> list[tuple[str, str]]:
        return [(p.extra.get("sr_pair_id", ""), p.tag_id) for p in points.list_points(container, first["blob"])]

    # The next cycle's pair: an hour later, onto the same blob (a delta sync).
    second = _spec(tmp_path / "second", container, azurite, SEED + 8, count=60, t0=T0 + 3600)
    stream = spool_stream(Path(second["spool_dir"]), second)
    spool = Spool(Path(second["spool_dir"]), limit_bytes=1 << 30)
    forwarder = BlobForwarder(
        assignment(second["pair_id"], DISK, second["container"], second["blob"], sync_kind=rpb.SYNC_KIND_DELTA),
        spool, StorageCredentialFile(Path(second["credential"])), Path(second["state_dir"]),
        policy=BlobPolicy(retry=FAST_RETRY, prune_interval=1e9),
    )
    try:
        run_until_written(forwarder, stream[-1].seq)
        mine = len(forwarder.points())
        assert sorted({pair for pair, _ in on_blob()}) == sorted([first["pair_id"], second["pair_id"]])
        assert len(on_blob()) == earlier + mine
        newest = stream[-1].captured_at.ToNanoseconds() / 1e9
        kept = [p.tag_id for p in forwarder.points() if p.captured_at.ToNanoseconds() / 1e9 >= newest - window]
        forwarder.assignment = assignment(second["pair_id"], DISK, second["container"], second["blob"],
                                          sync_kind=rpb.SYNC_KIND_DELTA,
                                          policy=rpb.RecoveryPolicy(retention_window_seconds=window))
        assert forwarder.prune(time.time() + 10**6) == earlier + mine - len(kept)
        assert on_blob() == [(second["pair_id"], tag) for tag in kept]
    finally:
        forwarder.stop()
        spool.close()


def test_a_refused_key_is_an_error_naming_the_file_and_a_fixed_file_is_read_again(tmp_path, container, azurite):
    spec = _spec(tmp_path, container, azurite, SEED + 4, count=30)
    stream = spool_stream(Path(spec["spool_dir"]), spec)
    credential = Path(spec["credential"])
    wrong_key = "d3Jvbmcta2V5LW5vdC1henVyaXRlcy1rZXktYXQtYWxsLXJlYWxseQ=="
    good = credential.read_text()
    credential.write_text(good.replace(good.split("AccountKey=")[1].split(";")[0], wrong_key))
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    forwarder = BlobForwarder(
        assignment(spec["pair_id"], DISK, spec["container"], spec["blob"]),
        spool, StorageCredentialFile(credential), Path(spec["state_dir"]),
        policy=BlobPolicy(retry=FAST_RETRY, initial_backoff=0.05, max_backoff=0.2, prune_interval=1e9),
    )
    try:
        forwarder.start()
        status = _wait(forwarder, lambda s: s.state == rpb.PAIR_STATE_ERROR, "the refusal")
        # (Azurite answers a bad signature with 403 AuthorizationFailure; Azure with 403 AuthenticationFailed)
        assert status.reason_code in ("azure-unauthenticated", "azure-forbidden") and str(credential) in status.reason
        assert "service principal" not in status.reason
        assert wrong_key not in status.reason and status.acked_seq == 0
        assert spool.log(spec["pair_id"]).pending_frames == len(stream)
        credential.write_text(good)
        status = _wait(forwarder, lambda s: s.acked_seq >= stream[-1].seq, "the forwarder to write after the fix")
        assert status.state == rpb.PAIR_STATE_REPLICATING
    finally:
        forwarder.stop()
        spool.close()
    _check_blob_and_points(container, spec, stream)


# -- a delta pair onto the blob an earlier pair left (reprotect to the cloud) ----------------


def _delta_stream(pair_id: str, base: bytes, rng: random.Random, blocks: int) -> tuple[list[rpb.Frame], bytes]:
    """A delta sync's frames (INITIAL_STARTED, `blocks` differing 64 KiB blocks as writes and one
    as a zero range, INITIAL_DONE, then a tag) and the disk they make of `base`."""
    block = 64 * KiB
    disk = bytearray(base)
    size = len(base)
    chosen = rng.sample(range(-(-size // block)), blocks + 1)
    out = [frames.sync_frame(pair_id, 1, rpb.SYNC_PHASE_INITIAL_STARTED, size, captured_at=T0)]
    for index in chosen[:-1]:
        offset = index * block
        data = rng.randbytes(min(block, size - offset))
        disk[offset:offset + len(data)] = data
        out.append(frames.write_frame(pair_id, len(out) + 1, offset, data, captured_at=T0))
    offset = chosen[-1] * block
    length = min(block, size - offset)
    disk[offset:offset + length] = bytes(length)
    out.append(frames.zero_frame(pair_id, len(out) + 1, offset, length, captured_at=T0))
    out.append(frames.sync_frame(pair_id, len(out) + 1, rpb.SYNC_PHASE_INITIAL_DONE, size, captured_at=T0 + 1))
    out.append(frames.tag_frame(pair_id, len(out) + 1, "after-delta", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT,
                                captured_at=T0 + 2))
    return out, bytes(disk)


def test_a_new_delta_pair_writes_only_its_blocks_into_the_blob_an_earlier_pair_left(tmp_path, container, azurite):
    spec = _spec(tmp_path, container, azurite, SEED + 5)
    stream = spool_stream(Path(spec["spool_dir"]), spec)
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    storage = StorageCredentialFile(Path(spec["credential"]))
    policy = BlobPolicy(batch_frames=5, retry=FAST_RETRY, prune_interval=1e9)
    first = BlobForwarder(assignment(spec["pair_id"], DISK, spec["container"], spec["blob"]), spool, storage,
                          Path(spec["state_dir"]), policy=policy)
    try:
        run_until_written(first, stream[-1].seq)
    finally:
        first.stop()
    blob = container.get_blob_client(spec["blob"])
    before = blob.get_blob_properties()
    old_points = [p.snapshot for p in points.list_points(container, spec["blob"])]
    base = _blob(container, spec["blob"], DISK)
    assert old_points and any(base)

    # A pair id this process server never saw (no state file), enabled with --sync delta.
    pair_id = "pair-delta-new"
    state_file = Path(spec["state_dir"]) / "azure-pairs" / f"{pair_id}.json"
    assert not state_file.exists()
    delta, expected = _delta_stream(pair_id, base, random.Random(SEED + 5), blocks=4)
    spool.log(pair_id).append(delta)
    second = BlobForwarder(
        assignment(pair_id, DISK, spec["container"], spec["blob"], sync_kind=rpb.SYNC_KIND_DELTA),
        spool, storage, Path(spec["state_dir"]), policy=policy,
    )
    try:
        status = run_until_written(second, delta[-1].seq)
    finally:
        second.stop()
        spool.close()
    assert status.state == rpb.PAIR_STATE_REPLICATING
    assert sha256(_blob(container, spec["blob"], DISK)) == sha256(expected) != sha256(base)
    # Written in place: the same blob (never created again, never zeroed), the earlier pair's
    # snapshots still there, and only the differing blocks written.
    after = blob.get_blob_properties()
    assert after.creation_time == before.creation_time and after.size == before.size
    assert set(old_points) <= {p.snapshot for p in points.list_points(container, spec["blob"])}
    assert status.applied_bytes_total == sum(f.write.length for f in delta if f.WhichOneof("body") == "write")
    assert [p.tag_id for p in status.points] == ["after-delta"], "only this pair's points are its points"
    saved = json.loads(state_file.read_text())
    assert (saved["applied_seq"], saved["sync"], saved["blob_created"]) == (delta[-1].seq, "done", True)
    footer = blob.download_blob(offset=vhd.virtual_size(DISK), length=512).readall()
    assert vhd.parse(footer)["checksum_ok"]


def test_a_delta_pair_onto_a_blob_of_another_size_is_an_error_and_leaves_the_blob(tmp_path, container, azurite):
    from siterecovery.common.azure.pageblob import PageBlobDisk

    other = DISK + 64 * KiB
    PageBlobDisk.open_or_create(container, "web1-abcdef12/disk0.vhd", other).write(0, b"\x5a" * 4096)
    blob = container.get_blob_client("web1-abcdef12/disk0.vhd")
    before = blob.get_blob_properties()
    content = _blob(container, "web1-abcdef12/disk0.vhd", other)
    spool = Spool(tmp_path / "spool", limit_bytes=1 << 30)
    delta, _ = _delta_stream("pair-wrong", bytes(DISK), random.Random(SEED + 6), blocks=2)
    spool.log("pair-wrong").append(delta)
    forwarder = BlobForwarder(
        assignment("pair-wrong", DISK, container.container_name, "web1-abcdef12/disk0.vhd",
                   sync_kind=rpb.SYNC_KIND_DELTA),
        spool, StorageCredentialFile(write_credential(tmp_path / "azure.conn", azurite.port)), tmp_path / "state",
        policy=BlobPolicy(retry=FAST_RETRY, initial_backoff=0.05, max_backoff=0.2, prune_interval=1e9),
    )
    try:
        forwarder.start()
        status = _wait(forwarder, lambda s: s.state == rpb.PAIR_STATE_ERROR, "the refusal")
    finally:
        forwarder.stop()
        spool.close()
    assert status.reason_code == "target-size-mismatch" and status.acked_seq == 0
    assert "delta" in status.reason and "full sync onto a new blob" in status.reason and str(DISK) in status.reason
    after = blob.get_blob_properties()
    assert (after.size, after.creation_time) == (before.size, before.creation_time)
    assert _blob(container, "web1-abcdef12/disk0.vhd", other) == content
