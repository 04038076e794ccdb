"""Helpers of the master target tests: seeded frame streams, an in-memory reference disk,
an in-process mTLS gRPC master target, a client that streams like a process server,
and the child process the crash test kills (`python -m tests.unit.mt_support child ...`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc

from siterecovery.agents.master_target.daemon import MasterTargetServicer, add_servicer
from siterecovery.agents.master_target.pairs import MasterTargetPairs
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import errors, frames, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.grpcserver import Service, start_server
from siterecovery.common.pb import dataplane_pb2, dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

KiB = 1024
MiB = 1024 * KiB
MT_ID = "mt-1"
PS_ID = "ps-1"
# Capture times of generated frames start now (older ones would fall out of the retention window).
T0 = float(int(time.time()))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def digest(buf: bytes | bytearray) -> str:
    return hashlib.sha256(buf).hexdigest()


# -- frame streams and the reference disk -------------------------------------------------


def make_stream(
    pair_id: str,
    *,
    seed: int,
    disk_size: int,
    count: int,
    done_at: int | None = 2,
    start_seq: int = 1,
    t0: float = T0,
    max_write: int = 192 * KiB,
    sync: bool = True,
) -> list[rpb.Frame]:
    """A seeded stream: INITIAL_STARTED, writes/zeros/tags (INITIAL_DONE after `done_at`
    frames; None: never), seq gaps, some frames compressed. Deterministic for a seed.
    `sync` False: no sync markers (a continuation of a synced stream)."""
    rng = random.Random(seed)
    out: list[rpb.Frame] = []
    seq = start_seq
    t = t0
    if sync:
        out.append(frames.sync_frame(pair_id, seq, rpb.SYNC_PHASE_INITIAL_STARTED, disk_size, captured_at=t))
    else:
        seq -= 1
        done_at = None
    while len(out) < count:
        seq += rng.choice((1, 1, 1, 2))
        t += rng.uniform(0.01, 2.0)
        if done_at is not None and len(out) == done_at:
            out.append(frames.sync_frame(pair_id, seq, rpb.SYNC_PHASE_INITIAL_DONE, disk_size, captured_at=t))
            continue
        roll = rng.random()
        if roll < 0.62:
            length = rng.choice((512, 4 * KiB, 64 * KiB, max_write, rng.randrange(1, max_write)))
            offset = rng.randrange(0, disk_size - length + 1)
            if rng.random() < 0.5:
                data = rng.randbytes(length)
            else:
                data = bytes([rng.randrange(1, 256)]) * length
            frame = frames.write_frame(pair_id, seq, offset, data, captured_at=t)
            out.append(frames.compress(frame) if rng.random() < 0.5 else frame)
        elif roll < 0.82:
            length = rng.choice((4 * KiB, 64 * KiB, rng.randrange(1, 600 * KiB)))
            offset = rng.randrange(0, disk_size - length + 1)
            out.append(frames.zero_frame(pair_id, seq, offset, length, captured_at=t))
        else:
            kind = rng.choice((rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT, rpb.RECOVERY_POINT_KIND_APP_CONSISTENT))
            out.append(frames.tag_frame(pair_id, seq, f"tag-{seq}", kind, note=f"n{seq}", captured_at=t))
    return out


class Reference:
    """The disk in memory, frame by frame: hashes at every seq asked for."""

    def __init__(self, disk_size: int) -> None:
        self.disk = bytearray(disk_size)
        self.seq = 0

    def apply(self, frame: rpb.Frame) -> None:
        body = frame.WhichOneof("body")
        if body == "write":
            data = frames.payload(frame)
            self.disk[frame.write.offset : frame.write.offset + len(data)] = data
        elif body == "zero":
            self.disk[frame.zero.offset : frame.zero.offset + frame.zero.length] = bytes(frame.zero.length)
        self.seq = frame.seq

    def digest(self) -> str:
        return digest(self.disk)


def reference_hash(stream: Sequence[rpb.Frame], disk_size: int, upto: int) -> str:
    ref = Reference(disk_size)
    for frame in stream:
        if frame.seq > upto:
            break
        ref.apply(frame)
    return ref.digest()


def tag_hashes(
    stream: Sequence[rpb.Frame], disk_size: int, ref: Reference | None = None, synced: bool = False
) -> dict[str, tuple[int, str]]:
    """tag id → (seq, disk hash at it), for tags after INITIAL_DONE."""
    ref = ref or Reference(disk_size)
    out: dict[str, tuple[int, str]] = {}
    for frame in stream:
        ref.apply(frame)
        body = frame.WhichOneof("body")
        if body == "sync":
            synced = frame.sync.phase == rpb.SYNC_PHASE_INITIAL_DONE
        elif body == "tag" and synced:
            out[frame.tag.tag_id] = (frame.seq, ref.digest())
    return out


# -- an in-process master target ------------------------------------------------------------


@dataclass
class Harness:
    """A master target served over mutual TLS on port 0, and clients of every role."""

    root: Path
    options: TargetOptions = field(default_factory=TargetOptions)
    clock: object = None

    def __post_init__(self) -> None:
        self.ca = pki.CertificateAuthority.load_or_create(self.root / "pki")
        self.datastore = self.root / "datastore"
        self.retention = self.root / "retention"
        self.pairs = MasterTargetPairs(
            datastore_dirs=[self.datastore],
            retention_dir=self.retention,
            agent_id=lambda: MT_ID,
            options=self.options,
            **({"clock": self.clock} if self.clock is not None else {}),
        )
        me = self.credentials(MT_ID, pki.MASTER_TARGET)
        servicer = MasterTargetServicer(SimpleNamespace(credentials=me), self.pairs)
        self.server = start_server(
            host="127.0.0.1",
            port=0,
            credentials=me.server_credentials(),
            services=[
                Service(
                    dataplane_pb2.DESCRIPTOR.services_by_name["MasterTarget"].full_name,
                    servicer,
                    add_servicer,
                )
            ],
        )
        self.assignments: dict[str, rpb.PairAssignment] = {}
        self._channels: list[grpc.Channel] = []

    def credentials(self, agent_id: str, role: str) -> AgentCredentials:
        sans = [pki.agent_dns_name(agent_id)] if role in pki.ENROLLABLE_ROLES else []
        key, cert = self.ca.issue_keypair(pki.Identity(id=agent_id, role=role), sans=sans)
        return AgentCredentials(pki.Identity(agent_id, role), key, cert, self.ca.cert_pem, "")

    def stub(self, agent_id: str = PS_ID, role: str = pki.PROCESS_SERVER) -> dataplane_pb2_grpc.MasterTargetStub:
        channel = secure_channel(
            f"127.0.0.1:{self.server.port}",
            self.credentials(agent_id, role).channel_credentials(),
            target_name=pki.agent_dns_name(MT_ID),
        )
        self._channels.append(channel)
        return dataplane_pb2_grpc.MasterTargetStub(channel)

    def admin(self) -> dataplane_pb2_grpc.MasterTargetStub:
        return self.stub("admin", pki.ADMIN)

    def assign(self, pair_id: str, disk_size: int, **overrides) -> rpb.PairAssignment:
        fields = dict(
            pair_id=pair_id,
            machine_id="src-1",
            disk_name="disk0",
            disk_size_bytes=disk_size,
            process_server_id=PS_ID,
            master_target_id=MT_ID,
            target_path=str(self.datastore / "host" / f"{pair_id}.img"),
            journal_dir=str(self.retention / pair_id),
            desired_state=rpb.PAIR_DESIRED_STATE_REPLICATING,
        )
        fields.update(overrides)
        assignment = rpb.PairAssignment(**fields)
        self.assignments[pair_id] = assignment
        self.pairs.apply_assignments(list(self.assignments.values()), [])
        return assignment

    def status(self, pair_id: str) -> rpb.PairStatus:
        (status,) = [s for s in self.pairs.pair_statuses() if s.pair_id == pair_id]
        return status

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.server.stop(grace=1.0)
        self.pairs.close()


@dataclass
class StreamResult:
    durable_seq: int
    acks: list[int]
    accepts_batches: bool = False

    @property
    def last_ack(self) -> int:
        return self.acks[-1] if self.acks else self.durable_seq


def send(
    stub: dataplane_pb2_grpc.MasterTargetStub,
    pair_id: str,
    disk_size: int,
    stream: Iterable[rpb.Frame],
    *,
    resume: bool = True,
    timeout: float = 60.0,
    batch: int = 1,
) -> StreamResult:
    """Stream like a process server: open, wait for accepted, send the frames after
    durable_seq (all of them when not `resume`; `batch` frames per message), half-close,
    collect the acks."""
    accepted = threading.Event()
    durable = [0]
    flags = [False]
    ended = threading.Event()

    def requests():
        yield rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id=pair_id, disk_size_bytes=disk_size))
        accepted.wait(timeout)
        if ended.is_set():
            return
        todo = [frame for frame in stream if not (resume and frame.seq <= durable[0])]
        for at in range(0, len(todo), batch):
            if batch == 1:
                yield rpb.ReplicationMessage(frame=todo[at])
            else:
                yield rpb.ReplicationMessage(batch=rpb.FrameBatch(frames=todo[at : at + batch]))

    acks: list[int] = []
    try:
        for reply in stub.Apply(requests(), timeout=timeout):
            if reply.WhichOneof("kind") == "accepted":
                durable[0] = reply.accepted.durable_seq
                flags[0] = reply.accepted.accepts_batches
                accepted.set()
            else:
                acks.append(reply.ack.seq)
    finally:
        ended.set()
        accepted.set()
    return StreamResult(durable[0], acks, flags[0])


def rpc_error(call) -> tuple[grpc.StatusCode, str, str]:
    """Run `call`, expecting an RpcError: (status, sr-error-code, details)."""
    try:
        call()
    except grpc.RpcError as exc:
        meta = dict(exc.trailing_metadata() or ())
        return exc.code(), meta.get(errors.CODE_KEY, ""), exc.details()
    raise AssertionError("the call succeeded")


# -- the crash child --------------------------------------------------------------------------


def crash_options() -> TargetOptions:
    return TargetOptions(batch_frames=12, segment_bytes=256 * KiB, reserve_bytes=0, prune_interval=1e9)


def child_main(argv: list[str]) -> None:
    """Apply a seeded stream in seeded batches; print each applied seq; maybe SIGKILL
    itself at the N-th time a named step of the apply path is reached."""
    spec = json.loads(argv[0])
    stream = make_stream(spec["pair_id"], seed=spec["seed"], disk_size=spec["disk_size"],
                         count=spec["count"], done_at=spec["done_at"], t0=spec["t0"], max_write=spec["max_write"])
    target = PairTarget(
        pair_id=spec["pair_id"], target_path=Path(spec["target_path"]), journal_dir=Path(spec["journal_dir"]),
        disk_size=spec["disk_size"], options=crash_options(),
    )
    step, count = spec.get("kill_step"), spec.get("kill_count", 0)
    if step:
        seen = [0]

        def hook(name: str) -> None:
            if name == step:
                seen[0] += 1
                if seen[0] >= count:
                    os.kill(os.getpid(), signal.SIGKILL)

        target.crash_hook = hook
    target.open()
    print("open", target.applied_seq, flush=True)
    rng = random.Random(spec["seed"] * 7 + 1)
    pending = [f for f in stream if f.seq > target.applied_seq]
    while pending:
        n = rng.randint(1, 12)
        target.apply([(f, frames.payload(f)) for f in pending[:n]])
        pending = pending[n:]
        print("applied", target.applied_seq, flush=True)
    print("done", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child_main(sys.argv[2:])
