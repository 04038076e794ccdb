"""The process server's data path in process: a source stream in, a fake master target out.

Everything runs over real mutual TLS on 127.0.0.1 port 0 with a throwaway CA:
the test plays the source agent (a source certificate), the process server is
the real servicer, receiver, spool and forwarder, and the master target is a
minimal in-process fake that checks and records what it is sent.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from siterecovery.agents.process_server.daemon import ProcessServerServicer, add_servicer
from siterecovery.agents.process_server.forwarder import ForwardPolicy
from siterecovery.agents.process_server.pairs import ProcessServerPairs
from siterecovery.agents.process_server.spool import Spool
from siterecovery.common import errors, frames, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.grpcserver import RunningServer, Service, start_server
from siterecovery.common.pb import common_pb2, dataplane_pb2, dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

PAIR = "pair-1"
DISK = 64 * 1024 * 1024
KiB = 1024
TIMEOUT = 20.0
POLICY = ForwardPolicy(window_bytes=512 * KiB, initial_backoff=0.05, max_backoff=0.3)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def digest(items: Iterable[rpb.Frame]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.SerializeToString())
    return h.hexdigest()


def make_frames(first: int, count: int, *, size: int = 8 * KiB, seed: int = 0) -> list[rpb.Frame]:
    rng = random.Random(seed + first)
    out = []
    for seq in range(first, first + count):
        kind = seq % 10
        if kind == 3:
            out.append(frames.zero_frame(PAIR, seq, rng.randrange(DISK // size) * size, size))
        elif kind == 7:
            out.append(frames.tag_frame(PAIR, seq, f"t{seq}", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT))
        else:
            # Half compressible, half not: the spool compresses what it can.
            data = bytes([seq % 251]) * size if seq % 2 else rng.randbytes(size)
            out.append(frames.write_frame(PAIR, seq, rng.randrange(DISK // size) * size, data))
    return out


# -- certificates ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> pki.CertificateAuthority:
    return pki.CertificateAuthority.load_or_create(tmp_path_factory.mktemp("pki"))


def credentials(ca: pki.CertificateAuthority, agent_id: str, role: str) -> AgentCredentials:
    identity = pki.Identity(id=agent_id, role=role)
    key, cert = ca.issue_keypair(identity)
    return AgentCredentials(identity=identity, key_pem=key, cert_pem=cert, ca_pem=ca.cert_pem, server_address="")


# -- the fake master target ----------------------------------------------------------------


@dataclass
class FakeMasterTarget(dataplane_pb2_grpc.MasterTargetServicer):
    """Applies frames in memory: verifies each (after decompression), acks each, idempotent."""

    applied: list[rpb.Frame] = field(default_factory=list)
    opens: list[rpb.StreamOpen] = field(default_factory=list)
    # Frames received again after they had been acknowledged (must stay 0).
    resent_acked: int = 0
    # Stop reading once this seq is applied, until `hold_after` changes (None: never hold).
    hold_after: int | None = None
    refuse: errors.SiteRecoveryError | None = None
    # Say `accepts_batches` (a master target of this version); False plays an older one,
    # which takes only `frame` messages.
    accepts_batches: bool = False
    # Frames per message received, in order (a `frame` message counts 1).
    message_sizes: list[int] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def last(self) -> int:
        return self.applied[-1].seq if self.applied else 0

    def set_hold(self, seq: int | None) -> None:
        with self.cond:
            self.hold_after = seq
            self.cond.notify_all()

    def Apply(self, request_iterator: Iterator[rpb.ReplicationMessage], context) -> Iterator[rpb.ReplicationReply]:
        first = next(request_iterator)
        self.opens.append(first.open)
        if self.refuse is not None:
            raise self.refuse
        yield rpb.ReplicationReply(
            accepted=rpb.StreamAccepted(durable_seq=self.last, accepts_batches=self.accepts_batches)
        )
        context.add_callback(lambda: self.set_hold(self.hold_after))  # wake a held stream when it ends
        while True:
            with self.cond:
                self.cond.wait_for(
                    lambda: self.hold_after is None or self.last < self.hold_after or not context.is_active()
                )
            if not context.is_active():
                return
            try:
                message = next(request_iterator, None)
            except grpc.RpcError:
                return  # the process server went away
            if message is None:
                return
            if message.WhichOneof("kind") != "frame" and not self.accepts_batches:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only frames follow the open message")
            carried = frames.message_frames(message) or ()
            self.message_sizes.append(len(carried))
            for frame in carried:
                frames.verify(first.open.pair_id, frame)
                with self.cond:
                    if frame.seq <= self.last:
                        self.resent_acked += 1
                    else:
                        self.applied.append(frames.decompress(frame))
                    self.cond.notify_all()
            yield rpb.ReplicationReply(ack=rpb.Ack(seq=self.last))


def serve(creds: AgentCredentials, servicer: object, name: str, add: Callable) -> RunningServer:
    return start_server(
        host="127.0.0.1",
        port=0,
        credentials=creds.server_credentials(),
        services=[Service(dataplane_pb2.DESCRIPTOR.services_by_name[name].full_name, servicer, add)],
    )


# -- the process server under test -----------------------------------------------------------


class ProcessServer:
    def __init__(
        self, spool_dir: Path, creds: AgentCredentials, *, limit: int = 64 * 1024 * KiB, fsync: bool = False,
        policy: ForwardPolicy = POLICY,
    ) -> None:
        self.spool = Spool(spool_dir, limit_bytes=limit, fsync=fsync)
        self.pairs = ProcessServerPairs(self.spool, credentials=lambda: creds, policy=policy)
        runtime = SimpleNamespace(credentials=creds)
        self.server = serve(
            creds,
            ProcessServerServicer(runtime, self.pairs.receiver, self.pairs),  # type: ignore[arg-type]
            "ProcessServer",
            add_servicer,
        )

    def close(self) -> None:
        self.pairs.close()
        self.server.stop(grace=0)
        self.spool.close()

    def status(self, pair_id: str = PAIR) -> rpb.PairStatus:
        return next(s for s in self.pairs.pair_statuses() if s.pair_id == pair_id)


@dataclass
class Site:
    ca: pki.CertificateAuthority
    tmp: Path
    source: AgentCredentials
    ps_creds: AgentCredentials
    mt: FakeMasterTarget
    mt_server: RunningServer
    ps: ProcessServer | None = None

    def assignment(self, **changes: object) -> rpb.PairAssignment:
        fields = dict(
            pair_id=PAIR,
            machine_id="src-1",
            disk_size_bytes=DISK,
            process_server_id="ps-1",
            master_target_id="mt-1",
            master_target_endpoint=f"127.0.0.1:{self.mt_server.port}",
        )
        fields.update(changes)
        return rpb.PairAssignment(**fields)

    def start_ps(self, *, assign: bool = True, **kwargs: object) -> ProcessServer:
        self.ps = ProcessServer(self.tmp / "spool", self.ps_creds, **kwargs)
        if assign:
            self.ps.pairs.apply_assignments([self.assignment()], [])
        return self.ps

    def replicate(
        self,
        messages: Iterable[rpb.Frame | rpb.ReplicationMessage],
        *,
        creds: AgentCredentials | None = None,
        pair_id: str = PAIR,
        disk_size: int = DISK,
        on_reply: Callable[[rpb.ReplicationReply], None] = lambda _r: None,
    ) -> list[rpb.ReplicationReply]:
        """Play the source: open, send, collect the replies until the server ends the stream."""
        assert self.ps is not None
        channel = secure_channel(
            f"127.0.0.1:{self.ps.server.port}",
            (creds or self.source).channel_credentials(),
            target_name=pki.agent_dns_name("ps-1"),
        )

        def requests() -> Iterator[rpb.ReplicationMessage]:
            yield rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id=pair_id, disk_size_bytes=disk_size))
            for m in messages:
                yield m if isinstance(m, rpb.ReplicationMessage) else rpb.ReplicationMessage(frame=m)

        replies = []
        try:
            for reply in dataplane_pb2_grpc.ProcessServerStub(channel).Replicate(requests(), timeout=60):
                replies.append(reply)
                on_reply(reply)
        finally:
            channel.close()
        return replies


@pytest.fixture
def site(ca, tmp_path) -> Iterator[Site]:
    mt = FakeMasterTarget()
    mt_creds = credentials(ca, "mt-1", pki.MASTER_TARGET)
    mt_server = serve(mt_creds, mt, "MasterTarget", dataplane_pb2_grpc.add_MasterTargetServicer_to_server)
    s = Site(
        ca=ca,
        tmp=tmp_path,
        source=credentials(ca, "src-1", pki.SOURCE),
        ps_creds=credentials(ca, "ps-1", pki.PROCESS_SERVER),
        mt=mt,
        mt_server=mt_server,
    )
    try:
        yield s
    finally:
        mt.set_hold(None)
        if s.ps is not None:
            s.ps.close()
        mt_server.stop(grace=0)


def acks(replies: list[rpb.ReplicationReply]) -> list[int]:
    return [r.ack.seq for r in replies if r.WhichOneof("kind") == "ack"]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- tests -----------------------------------------------------------------------------------


def test_frames_reach_the_master_target_in_order_and_hash_equal(site: Site) -> None:
    ps = site.start_ps(fsync=True)
    sent = make_frames(1, 200)
    replies = site.replicate(sent)
    assert replies[0].accepted.durable_seq == 0
    assert acks(replies)[-1] == 200 and acks(replies) == sorted(acks(replies))
    wait_until(lambda: site.mt.last == 200, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    assert site.mt.opens[0] == rpb.StreamOpen(pair_id=PAIR, disk_size_bytes=DISK)
    # The spool compressed what compresses: it holds less than the payload it was sent.
    wait_until(lambda: ps.status().acked_seq == 200, "the master target to acknowledge everything")
    status = ps.status()
    assert (status.state, status.last_seq, status.backlog_frames, status.backlog_bytes) == (
        rpb.PAIR_STATE_REPLICATING, 200, 0, 0,
    )
    assert not status.HasField("oldest_pending_captured_at")
    payload = sum(len(f.write.data) for f in sent)
    assert 0 < status.bytes_sent < payload
    assert status.throughput_bytes_per_second > 0
    # The release follows the Ack on the forwarder's release thread: the spool lets go of it all.
    frame_log = ps.spool.log(PAIR)
    wait_until(lambda: frame_log.released_seq == 200, "the spool to be released through the last Ack")
    assert ps.spool.used_bytes == 0 and frame_log.pending_frames == 0


def test_frames_sent_again_are_acknowledged_and_dropped(site: Site) -> None:
    ps = site.start_ps()
    sent = make_frames(1, 20)
    site.replicate(sent[:10])
    replies = site.replicate(sent[5:])  # the source did not see the last acks: resends 6..10
    assert replies[0].accepted.durable_seq == 10
    assert acks(replies)[-1] == 20
    wait_until(lambda: site.mt.last == 20, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    assert site.mt.resent_acked == 0
    assert ps.status().last_seq == 20


def test_restart_resumes_without_resending_acknowledged_frames(site: Site) -> None:
    sent = make_frames(1, 100)
    site.mt.set_hold(40)  # the master target takes 1..40, then stops reading
    ps = site.start_ps()
    assert acks(site.replicate(sent))[-1] == 100
    wait_until(lambda: ps.status().acked_seq == 40, "the master target's acks to release the spool")
    status = ps.status()
    assert (status.last_seq, status.backlog_frames) == (100, 60)
    assert status.oldest_pending_captured_at == sent[40].captured_at
    ps.close()

    site.mt.set_hold(None)
    ps = site.start_ps()
    # The source learns that everything it sent is held: it resends nothing.
    replies = site.replicate(sent[95:])
    assert replies[0].accepted.durable_seq == 100
    assert acks(replies) and set(acks(replies)) == {100}
    wait_until(lambda: site.mt.last == 100, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    assert site.mt.resent_acked == 0, "frames the master target acknowledged were sent again"
    assert [o.pair_id for o in site.mt.opens] == [PAIR, PAIR]


def test_bad_checksum_is_data_loss_and_nothing_is_spooled(site: Site) -> None:
    ps = site.start_ps()
    site.mt.set_hold(0)
    bad = make_frames(1, 1)[0]
    bad.checksum = bytes(16)
    err = rpc_error(lambda: site.replicate([bad]))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert ps.spool.log(PAIR).last_seq == 0 and ps.spool.used_bytes == 0

    good = make_frames(1, 4)  # seq 4 is a write of random data
    damaged = rpb.Frame()
    damaged.CopyFrom(good[3])
    damaged.write.data = b"\x00" + damaged.write.data[1:]
    seen: list[rpb.ReplicationReply] = []
    err = rpc_error(lambda: site.replicate([good[0], good[1], damaged], on_reply=seen.append))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "checksum" in err.details()
    # What came before the bad frame is spooled and acknowledged; the bad frame is not.
    assert ps.spool.log(PAIR).last_seq == 2
    assert acks(seen)[-1] == 2


def batch(items: list[rpb.Frame]) -> rpb.ReplicationMessage:
    return rpb.ReplicationMessage(batch=rpb.FrameBatch(frames=items))


@pytest.mark.parametrize("mt_batches", [False, True], ids=["older master target", "batching master target"])
def test_batches_are_spooled_and_forwarded_in_batches_only_to_a_master_target_that_takes_them(
    site: Site, mt_batches: bool
) -> None:
    site.mt.accepts_batches = mt_batches
    site.mt.set_hold(0)  # everything is spooled before the forwarder may send any of it
    ps = site.start_ps()
    sent = make_frames(1, 120)
    replies = site.replicate([batch(sent[:50]), sent[50], batch(sent[51:])])
    assert replies[0].accepted.accepts_batches
    assert acks(replies)[-1] == 120 and acks(replies) == sorted(acks(replies))
    site.mt.set_hold(None)
    wait_until(lambda: site.mt.last == 120, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    assert sum(site.mt.message_sizes) == 120
    if mt_batches:
        assert max(site.mt.message_sizes) > 1
    else:
        assert set(site.mt.message_sizes) == {1}
    wait_until(lambda: ps.status().acked_seq == 120, "the spool to be released")


def test_a_batch_with_one_bad_frame_is_refused_whole_and_nothing_of_it_is_spooled(site: Site) -> None:
    ps = site.start_ps()
    site.mt.set_hold(0)
    good = make_frames(1, 10)  # seq 9 is a write of random data
    damaged = rpb.Frame()
    damaged.CopyFrom(good[8])
    damaged.write.data = b"\x00" + damaged.write.data[1:]
    seen: list[rpb.ReplicationReply] = []
    err = rpc_error(lambda: site.replicate([batch(good[:4]), batch([*good[4:8], damaged, good[9]])],
                                           on_reply=seen.append))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "frame 9 failed its checksum" in err.details()
    # The batch before is spooled and acknowledged; nothing of the damaged one is.
    assert ps.spool.log(PAIR).last_seq == 4
    assert acks(seen)[-1] == 4
    # Sent again intact, the batch is taken.
    assert acks(site.replicate([batch(good[4:])]))[-1] == 10


def test_malformed_frames_inside_a_batch_get_the_errors_of_single_frames(site: Site) -> None:
    ps = site.start_ps()
    site.mt.set_hold(0)
    beyond = frames.write_frame(PAIR, 2, DISK - 4 * KiB, bytes(8 * KiB))
    err = rpc_error(lambda: site.replicate([batch([make_frames(1, 1)[0], beyond])]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame 2 reaches byte" in err.details() and "past the end" in err.details()
    no_body = rpb.Frame(seq=1, checksum=bytes(16))
    err = rpc_error(lambda: site.replicate([batch([no_body])]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame 1 has no body" in err.details()
    err = rpc_error(lambda: site.replicate([batch([])]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds no frames" in err.details()
    assert ps.spool.log(PAIR).last_seq == 0 and ps.spool.used_bytes == 0


def test_out_of_range_frame_is_invalid_argument(site: Site) -> None:
    ps = site.start_ps()
    beyond = frames.write_frame(PAIR, 1, DISK - 4 * KiB, bytes(8 * KiB))
    err = rpc_error(lambda: site.replicate([beyond]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "past the end" in err.details()
    assert ps.spool.log(PAIR).last_seq == 0


def test_stream_is_refused_unless_the_pair_and_the_caller_check_out(site: Site) -> None:
    ps = site.start_ps()
    one = make_frames(1, 1)
    intruder = credentials(site.ca, "src-2", pki.SOURCE)
    err = rpc_error(lambda: site.replicate(one, creds=intruder))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "src-2" in err.details() and "src-1" in err.details()

    err = rpc_error(lambda: site.replicate(one, pair_id="pair-unknown"))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    err = rpc_error(lambda: site.replicate(one, disk_size=DISK * 2))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A pair assigned to another process server is not found here either.
    ps.pairs.apply_assignments([site.assignment(process_server_id="ps-2")], [])
    err = rpc_error(lambda: site.replicate(one))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert ps.spool.log(PAIR).last_seq == 0
    assert not (site.tmp / "spool" / "pairs" / "pair-unknown").exists()


def test_stream_must_start_with_open(site: Site) -> None:
    site.start_ps()
    channel = secure_channel(
        f"127.0.0.1:{site.ps.server.port}", site.source.channel_credentials(),
        target_name=pki.agent_dns_name("ps-1"),
    )
    stub = dataplane_pb2_grpc.ProcessServerStub(channel)
    message = rpb.ReplicationMessage(frame=make_frames(1, 1)[0])
    err = rpc_error(lambda: list(stub.Replicate(iter([message]), timeout=10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_full_spool_holds_the_source_back_until_the_target_drains(site: Site) -> None:
    limit = 1024 * KiB
    site.mt.set_hold(0)  # the master target accepts but applies nothing yet
    ps = site.start_ps(limit=limit)
    rng = random.Random(5)
    sent = [frames.write_frame(PAIR, s, s * 128 * KiB, rng.randbytes(128 * KiB)) for s in range(1, 161)]
    consumed = [0]
    result: dict[str, object] = {}

    def frames_counted() -> Iterator[rpb.Frame]:
        for f in sent:
            consumed[0] = f.seq
            yield f

    def source() -> None:
        try:
            result["replies"] = site.replicate(frames_counted())
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=source)
    thread.start()
    wait_until(lambda: ps.spool.waiting, "the receiver to wait for spool space")
    wait_until(
        lambda: any(p.code == "spool-full" and p.severity == common_pb2.SEVERITY_CRITICAL
                    for p in ps.pairs.problems()),
        "a spool-full problem",
    )
    assert ps.spool.used_bytes <= limit
    assert consumed[0] < len(sent), "the source was not held back"
    assert ps.spool.log(PAIR).last_seq < len(sent)

    site.mt.set_hold(None)  # the master target drains: the source resumes
    thread.join(TIMEOUT)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert acks(result["replies"])[-1] == len(sent)  # type: ignore[arg-type]
    wait_until(lambda: site.mt.last == len(sent), "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    wait_until(lambda: not ps.pairs.problems(), "the spool problems to clear")


def test_releases_are_paced_but_a_full_spool_and_a_stop_release_at_once(site: Site) -> None:
    # A release an hour apart: only spool pressure and the stop can release anything here.
    slow = replace(POLICY, release_interval=3600.0, release_bytes=1 << 40)
    ps = site.start_ps(limit=1024 * KiB, policy=slow)
    rng = random.Random(6)
    sent = [frames.write_frame(PAIR, s, s * 128 * KiB, rng.randbytes(128 * KiB)) for s in range(1, 161)]
    replies = site.replicate(sent)  # 20 MiB through a 1 MiB spool: released under pressure
    assert acks(replies)[-1] == len(sent)
    wait_until(lambda: site.mt.last == len(sent), "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)
    wait_until(lambda: ps.status().acked_seq == len(sent), "the last Ack")
    frame_log = ps.spool.log(PAIR)
    # The frames acknowledged after the last receiver's wait are not released yet ...
    assert 0 < frame_log.released_seq < len(sent)
    assert ps.status().backlog_bytes == 0  # ... and not counted as backlog either
    ps.close()
    site.ps = None
    # ... until the process server stops: its mark then covers the last Ack.
    reopened = Spool(site.tmp / "spool", limit_bytes=1024 * KiB, fsync=False)
    try:
        assert reopened.log(PAIR).released_seq == len(sent)
    finally:
        reopened.close()


def test_spool_reports_high_at_80_percent(tmp_path: Path) -> None:
    spool = Spool(tmp_path, limit_bytes=100 * KiB, fsync=False)
    log = spool.log(PAIR)
    seq = 0
    while spool.used_bytes < 70 * KiB:
        seq += 1
        log.append([frames.write_frame(PAIR, seq, 0, random.Random(seq).randbytes(4 * KiB))])
    assert spool.problems() == []
    while spool.used_bytes < 80 * KiB:
        seq += 1
        log.append([frames.write_frame(PAIR, seq, 0, random.Random(seq).randbytes(4 * KiB))])
    [problem] = spool.problems()
    assert (problem.code, problem.severity) == ("spool-high", common_pb2.SEVERITY_WARNING)
    assert str(tmp_path) in problem.message
    # Full: a reservation waits (here: gives up when cancelled), and the problem is critical.
    assert not spool.reserve(50 * KiB, cancelled=lambda: True)
    spool.release(log, seq)
    assert spool.problems() == [] and spool.used_bytes == 0
    # The bound counts what was spooled before a restart, before any stream or forwarder runs.
    log.append([frames.write_frame(PAIR, seq + 1, 0, random.Random(0).randbytes(4 * KiB))])
    used = spool.used_bytes
    spool.close()
    reopened = Spool(tmp_path, limit_bytes=100 * KiB, fsync=False)
    assert reopened.pair_ids() == [PAIR] and reopened.used_bytes == used > 0
    reopened.close()


def test_master_target_refusal_puts_the_pair_in_error_until_accepted(site: Site) -> None:
    site.mt.refuse = errors.PreconditionFailed(
        "the retention drive is full", hint="free space on it", code="retention-full"
    )
    ps = site.start_ps()
    wait_until(lambda: ps.status().state == rpb.PAIR_STATE_ERROR, "the pair to report the refusal")
    status = ps.status()
    assert status.reason_code == "retention-full"
    assert "mt-1" in status.reason and "retention drive is full" in status.reason
    site.mt.refuse = None
    wait_until(lambda: ps.status().state == rpb.PAIR_STATE_REPLICATING, "the pair to recover")
    site.replicate(make_frames(1, 5))
    wait_until(lambda: site.mt.last == 5, "frames to flow again")


def test_unreachable_master_target_keeps_frames_and_is_not_an_error(site: Site, ca) -> None:
    ps = site.start_ps(assign=False)
    ps.pairs.apply_assignments([site.assignment(master_target_endpoint="127.0.0.1:1")], [])
    sent = make_frames(1, 10)
    assert acks(site.replicate(sent))[-1] == 10
    status = ps.status()
    assert (status.state, status.backlog_frames, status.acked_seq) == (rpb.PAIR_STATE_REPLICATING, 10, 0)
    # The controller moves the pair's master target to a reachable address: it all arrives.
    ps.pairs.apply_assignments([site.assignment()], [])
    wait_until(lambda: site.mt.last == 10, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)


def test_pair_leaving_the_assignments_stops_its_forwarder_and_stream(site: Site) -> None:
    ps = site.start_ps()
    forwarder = ps.pairs._forwarders[PAIR]
    never = threading.Event()
    result: dict[str, object] = {}

    def endless() -> Iterator[rpb.Frame]:
        yield from make_frames(1, 3)
        never.wait(TIMEOUT)

    def source() -> None:
        try:
            site.replicate(endless())
        except grpc.RpcError as exc:
            result["code"] = exc.code()

    thread = threading.Thread(target=source)
    thread.start()
    try:
        wait_until(lambda: ps.spool.log(PAIR).last_seq == 3, "frames to be spooled")
        ps.pairs.apply_assignments([], [])
        assert not forwarder.alive
        assert ps.pairs.pair_statuses() == []
        thread.join(TIMEOUT)
        assert result.get("code") == grpc.StatusCode.CANCELLED
    finally:
        never.set()


def test_a_new_stream_for_a_pair_ends_the_old_one(site: Site) -> None:
    ps = site.start_ps()
    sent = make_frames(1, 10)
    never = threading.Event()
    result: dict[str, object] = {}

    def first_source() -> None:
        def stalled() -> Iterator[rpb.Frame]:
            yield from sent[:5]
            never.wait(TIMEOUT)

        try:
            site.replicate(stalled())
        except grpc.RpcError as exc:
            result["code"] = exc.code()

    thread = threading.Thread(target=first_source)
    thread.start()
    try:
        wait_until(lambda: ps.spool.log(PAIR).last_seq == 5, "the first stream's frames to be spooled")
        replies = site.replicate(sent[5:])  # the source reconnected
        assert replies[0].accepted.durable_seq == 5 and acks(replies)[-1] == 10
        thread.join(TIMEOUT)
        assert result.get("code") == grpc.StatusCode.CANCELLED
    finally:
        never.set()
    wait_until(lambda: site.mt.last == 10, "the master target to apply everything")
    assert digest(site.mt.applied) == digest(sent)


def test_disk_full_refuses_the_batch_as_unavailable_and_acknowledges_nothing_of_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    ps = site.start_ps()
    site.mt.set_hold(0)
    site.replicate(make_frames(1, 3))

    def full(_fd: int, _data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "writev", full)  # the frame log writes a batch with writev
    seen: list[rpb.ReplicationReply] = []
    err = rpc_error(lambda: site.replicate(make_frames(4, 3), on_reply=seen.append))
    monkeypatch.undo()
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(err.trailing_metadata())[errors.CODE_KEY] == "disk-full"
    assert acks(seen) == [] and ps.spool.log(PAIR).last_seq == 3
    assert ps.spool.used_bytes == ps.spool.log(PAIR).pending_bytes  # no reservation leaked
    # With space back the source resumes where the process server stands.
    replies = site.replicate(make_frames(4, 3))
    assert replies[0].accepted.durable_seq == 3 and acks(replies)[-1] == 6


def test_an_azure_pair_without_a_storage_credential_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    from siterecovery.agents.process_server.azure_storage import SETTING

    spool = Spool(tmp_path / "spool", limit_bytes=1 << 20)
    creds = SimpleNamespace(identity=pki.Identity("ps-1", pki.PROCESS_SERVER))
    pairs = ProcessServerPairs(spool, credentials=lambda: creds)
    azure = rpb.PairAssignment(
        pair_id="pair-az", machine_id="src-1", disk_size_bytes=1 << 20, process_server_id="ps-1",
        master_target_id="ps-1", target_kind=rpb.TARGET_KIND_AZURE_PAGE_BLOB,
        azure_blob=rpb.AzureBlobTarget(storage_account="srdrstore", container="replicas", blob_name="h-1/disk0.vhd"),
    )
    try:
        pairs.apply_assignments([azure], [])
        (status,) = pairs.pair_statuses()
        assert (status.state, status.reason_code) == (rpb.PAIR_STATE_ERROR, "azure-storage-not-configured")
        assert SETTING in status.reason
        # Frames still spool: the receiver knows the pair.
        assert pairs.assignment("pair-az") == azure
    finally:
        pairs.close()
        spool.close()


def test_a_blob_forwarder_is_replaced_only_after_it_stopped_and_not_for_an_endpoint(tmp_path: Path) -> None:
    from siterecovery.agents.process_server.azure_storage import StorageCredentialFile
    from siterecovery.agents.process_server.blob_forwarder import BlobForwarder

    conn = tmp_path / "azure.conn"
    # Nothing listens there: sessions fail as "unavailable" and the forwarder keeps trying.
    conn.write_text("DefaultEndpointsProtocol=http;AccountName=srdrstore;AccountKey=a2V5;"
                    "BlobEndpoint=http://127.0.0.1:9/srdrstore;\n")
    os.chmod(conn, 0o600)
    spool = Spool(tmp_path / "spool", limit_bytes=1 << 20)
    creds = SimpleNamespace(identity=pki.Identity("ps-1", pki.PROCESS_SERVER))
    pairs = ProcessServerPairs(spool, credentials=lambda: creds, storage=StorageCredentialFile(conn),
                               state_dir=tmp_path / "state")
    azure = rpb.PairAssignment(
        pair_id="pair-az", machine_id="src-1", disk_size_bytes=1 << 20, process_server_id="ps-1",
        master_target_id="ps-1", master_target_endpoint="127.0.0.1:1", target_kind=rpb.TARGET_KIND_AZURE_PAGE_BLOB,
        azure_blob=rpb.AzureBlobTarget(storage_account="srdrstore", container="replicas", blob_name="h-1/disk0.vhd"),
    )
    try:
        pairs.apply_assignments([azure], [])
        first = pairs._forwarders["pair-az"]
        assert isinstance(first, BlobForwarder) and first.alive
        moved = rpb.PairAssignment()
        moved.CopyFrom(azure)
        moved.master_target_endpoint = moved.process_server_endpoint = "127.0.0.1:2"  # the process server moved
        pairs.apply_assignments([moved], [])
        assert pairs._forwarders["pair-az"] is first and first.assignment == moved
        other = rpb.PairAssignment()
        other.CopyFrom(moved)
        other.azure_blob.blob_name = "h-1/disk0-new.vhd"
        pairs.apply_assignments([other], [])
        second = pairs._forwarders["pair-az"]
        assert second is not first and not first.alive and second.assignment == other
    finally:
        pairs.close()
        spool.close()
