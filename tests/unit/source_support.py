"""A minimal in-process ProcessServer for the source agent's tests, over real mutual TLS.

It depends only on the proto: it answers `open` with the highest seq it holds,
checks every frame (`frames.validate`, `frames.verify`), refuses a seq that does
not increase within a stream, ignores (and acks) one it already holds, applies
writes and zeroed ranges to a sparse target image, and acks each frame. Knobs:
`send_acks` (clear it to hold acks back while still storing frames: an ack
lost), `accepting` (clear it to stop reading the streams, as a process server
with a full spool does: flow control holds the source back, and acks resume
once it is set again), `break_after` (end the stream with UNAVAILABLE after that many frames),
`reset()` (a rebuilt process server that holds nothing).

BlockHashes answers from that same target image (as the master target would:
common/blockhash.py, blocks past the file's end absent); `preload()` puts an
older copy of a disk there first (a delta sync's target), `hash_failures`
makes the next calls fail with UNAVAILABLE. It honours `applied_through_seq`
as a master target does: UNAVAILABLE `target-catching-up` until the frames through
it are applied; `applied_cap` plays a target that has applied no further than
that (say, while the process server still forwards frames from before the sync).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from siterecovery.agents.source.capture import apply_frame
from siterecovery.common import blockhash, errors, frames, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.grpcserver import Service, start_server
from siterecovery.common.pb import dataplane_pb2, dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

MiB = 1024 * 1024
PS_ID = "ps-1"
SOURCE_ID = "src-1"


def paused_copy(assignment: rpb.PairAssignment) -> rpb.PairAssignment:
    """The same assignment with the pair paused by the controller."""
    paused = rpb.PairAssignment()
    paused.CopyFrom(assignment)
    paused.desired_state = rpb.PAIR_DESIRED_STATE_PAUSED
    return paused


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling, with a deadline


def content_digest(path: Path, chunk: int = MiB) -> str:
    """Hash of every non-zero chunk and its offset, visiting only data regions: equal for two
    images with the same contents however sparse each is."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            pos = start - start % chunk
            while pos < end:
                data = os.pread(fd, chunk, pos)
                if data.count(0) != len(data):
                    digest.update(pos.to_bytes(8, "little"))
                    digest.update(data)
                pos += chunk
            offset = max(end, pos)
    finally:
        os.close(fd)
    return digest.hexdigest()


@dataclass
class PairRecord:
    disk_size: int
    target: Path
    durable: int = 0
    frames: list[rpb.Frame] = field(default_factory=list)  # accepted, in order (write data dropped)
    data_bytes: int = 0  # write payload bytes accepted (resent ones included)
    zero_bytes: int = 0  # zeroed-range bytes accepted (resent ones included)
    streams: int = 0
    hash_calls: int = 0  # answered
    hash_blocks: int = 0
    hash_behind: int = 0  # refused as target-catching-up
    hash_through: list[int] = field(default_factory=list)  # every call's applied_through_seq


class FakeProcessServer(dataplane_pb2_grpc.ProcessServerServicer):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pairs: dict[str, PairRecord] = {}
        self.lock = threading.Lock()
        self.send_acks = threading.Event()
        self.send_acks.set()
        self.accepting = threading.Event()
        self.accepting.set()
        self.break_after: int | None = None
        self.errors: list[str] = []
        self.hash_failures = 0
        self.applied_cap: int | None = None
        # Say `accepts_batches` (a process server of this version); False plays an older one.
        self.accepts_batches = False
        # Frames per message received, in order (a `frame` message counts 1).
        self.message_sizes: list[int] = []

    def preload(self, pair_id: str, image: Path, disk_size: int) -> Path:
        """Make the pair's target image a copy of `image` (an older copy of the disk)."""
        with self.lock:
            target = self.directory / f"{pair_id}.img"
            shutil.copyfile(image, target)
            self.pairs[pair_id] = PairRecord(disk_size, target)
            return target

    def BlockHashes(self, request, context):
        with self.lock:
            record = self.pairs.get(request.pair_id)
            failing = self.hash_failures > 0
            self.hash_failures -= failing
        if failing:
            raise errors.Unavailable("the fake master target is away", code="unreachable-test")
        if record is None:
            raise errors.NotFound(f"no pair {request.pair_id}", code="pair-not-assigned")
        blockhash.check_range(request.offset, request.block_count, record.disk_size)
        with self.lock:  # frames are applied under the lock: a digest sees whole frames
            record.hash_through.append(request.applied_through_seq)
            applied = record.durable if self.applied_cap is None else min(record.durable, self.applied_cap)
            if request.applied_through_seq > applied:
                record.hash_behind += 1
                raise errors.Unavailable(
                    f"pair {request.pair_id}: the target has applied frames through seq {applied}, the delta sync "
                    f"needs {request.applied_through_seq} first", code="target-catching-up",
                )
            record.hash_calls += 1
            fd = os.open(record.target, os.O_RDONLY)
            try:
                digests, present, size = blockhash.file_digests(fd, request.offset, request.block_count, record.disk_size)
            finally:
                os.close(fd)
            record.hash_blocks += request.block_count
        return rpb.BlockHashesReply(
            offset=request.offset, block_bytes=blockhash.BLOCK_BYTES, digests=digests, present_blocks=present,
            target_exists=True, target_size_bytes=size,
        )

    def record(self, pair_id: str) -> PairRecord:
        with self.lock:
            return self.pairs[pair_id]

    def reset(self, pair_id: str) -> None:
        with self.lock:
            self.pairs[pair_id].durable = 0

    def Replicate(self, request_iterator, context):
        first = next(request_iterator)
        pair_id, size = first.open.pair_id, first.open.disk_size_bytes
        with self.lock:
            record = self.pairs.get(pair_id)
            if record is None:
                target = self.directory / f"{pair_id}.img"
                if not target.exists():
                    with open(target, "wb") as f:
                        f.truncate(size)
                record = self.pairs[pair_id] = PairRecord(size, target)
            record.streams += 1
            durable = record.durable
        yield rpb.ReplicationReply(accepted=rpb.StreamAccepted(durable_seq=durable, accepts_batches=self.accepts_batches))
        fd = os.open(record.target, os.O_RDWR)
        try:
            yield from self._receive(request_iterator, context, pair_id, size, record, fd)
        except grpc.RpcError:
            return  # the source went away
        finally:
            os.close(fd)

    def _receive(self, request_iterator, context, pair_id, size, record, fd):
        last_in_stream = 0
        count = 0
        for message in request_iterator:
            while not self.accepting.wait(0.1):  # holding the stream back; a cancelled call ends it
                if not context.is_active():
                    return
            if message.WhichOneof("kind") == "batch" and not self.accepts_batches:
                self.errors.append("a batch sent to a process server that did not ask for batches")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no batches here")
            carried = frames.message_frames(message) or ()
            self.message_sizes.append(len(carried))
            for frame in carried:
                reply = self._frame(context, pair_id, size, record, fd, frame, last_in_stream)
                last_in_stream = frame.seq
                if reply is not None:
                    yield reply
            count += 1
            if self.break_after is not None and count >= self.break_after:
                self.break_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "the fake process server broke the stream")

    def _frame(self, context, pair_id, size, record, fd, frame, last_in_stream):
        """Check and apply one frame; its Ack (None while acks are held back)."""
        try:
            frames.validate(frame, size)
            frames.verify(pair_id, frame)
            if frame.seq <= last_in_stream:
                raise AssertionError(f"seq {frame.seq} after {last_in_stream} in one stream")
        except Exception as exc:
            self.errors.append(str(exc))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self.lock:
            if frame.seq > record.durable:
                apply_frame(fd, frame)
                kept = rpb.Frame()
                kept.CopyFrom(frame)
                if frame.WhichOneof("body") == "write":
                    kept.write.data = b""
                record.frames.append(kept)
                record.durable = frame.seq
                record.data_bytes += frames.payload_length(frame) if frame.WhichOneof("body") == "write" else 0
                record.zero_bytes += frame.zero.length if frame.WhichOneof("body") == "zero" else 0
            durable = record.durable
        if self.send_acks.is_set():
            return rpb.ReplicationReply(ack=rpb.Ack(seq=durable))
        return None


class Site:
    """A CA, the fake process server on 127.0.0.1:0 with its mTLS identity, and the source's credentials."""

    def __init__(self, directory: Path) -> None:
        self.ca = pki.CertificateAuthority.load_or_create(directory / "pki")
        key, cert = self.ca.issue_keypair(pki.Identity(PS_ID, pki.PROCESS_SERVER), sans=[pki.agent_dns_name(PS_ID)])
        ps_creds = AgentCredentials(pki.Identity(PS_ID, pki.PROCESS_SERVER), key, cert, self.ca.cert_pem, "")
        key, cert = self.ca.issue_keypair(pki.Identity(SOURCE_ID, pki.SOURCE))
        self.source_creds = AgentCredentials(pki.Identity(SOURCE_ID, pki.SOURCE), key, cert, self.ca.cert_pem, "")
        (directory / "ps").mkdir()
        self.ps = FakeProcessServer(directory / "ps")
        self.server = start_server(
            host="127.0.0.1", port=0, credentials=ps_creds.server_credentials(),
            services=[Service(dataplane_pb2.DESCRIPTOR.services_by_name["ProcessServer"].full_name, self.ps,
                              dataplane_pb2_grpc.add_ProcessServerServicer_to_server)],
        )
        self.endpoint = f"127.0.0.1:{self.server.port}"

    def connect(self, endpoint: str, process_server_id: str) -> grpc.Channel:
        """What the source agent's daemon does: mTLS, the process server's name checked."""
        return secure_channel(
            endpoint, self.source_creds.channel_credentials(), target_name=pki.agent_dns_name(process_server_id)
        )

    def assignment(self, pair_id: str, disk_name: str, disk_size: int, *, mode: int = rpb.REPLICATION_MODE_NBD,
                   sync_kind: int = rpb.SYNC_KIND_UNSPECIFIED, **policy: int) -> rpb.PairAssignment:
        return rpb.PairAssignment(
            sync_kind=sync_kind,
            pair_id=pair_id, machine_id=SOURCE_ID, disk_name=disk_name, disk_size_bytes=disk_size, mode=mode,
            process_server_id=PS_ID, process_server_endpoint=self.endpoint,
            policy=rpb.RecoveryPolicy(
                crash_consistent_interval_seconds=policy.pop("crash", 3600),
                app_consistent_interval_seconds=policy.pop("app", 0),
            ),
            desired_state=rpb.PAIR_DESIRED_STATE_REPLICATING,
            scan_interval_seconds=policy.pop("scan", 300),
        )

    def stop(self) -> None:
        self.server.stop(grace=0)
