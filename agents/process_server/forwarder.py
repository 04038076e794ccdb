"""Forwarding one pair's spooled frames to its master target (MasterTarget.Apply).

One thread per pair. A session: dial the master target (mutual TLS, checking
that the certificate names `master_target_id`), send `open`, read
`accepted.durable_seq`, release the spool through it, then send every spooled
frame after it in order, keeping at most `window_bytes` unacknowledged, and
release the spool through each cumulative Ack. Frames leave the spool only when
the master target has acknowledged them, so a crash or an error anywhere loses
nothing: the next session starts again after what the master target holds.

An Ack frees the forwarding window at once; the release itself (the spool's
release mark written and fsynced, then its directory: two fsyncs) runs on a
thread of its own, always through the newest Ack, so Acks that arrive while
one release is being written cost one release together. Releasing on the
thread that reads the Acks held the window full through both fsyncs: in
py-spy profiles of a full sync that thread spent about half its time in them
(bench/RESULTS.md, full_sync). Releasing later than the Ack is always safe:
the spool then holds frames the master target already has, and after a restart
the next session releases through the master target's `durable_seq` anyway.

On an error the session ends, the error is logged (code and message) and,
after a capped exponential backoff waited on the stop event, a new session
starts. A refusal by the master target (any error other than "cannot reach it")
puts the pair in ERROR with the master target's reason and code (say
`retention-full`) until a session is accepted again.

Frames travel as the spool holds them: each record's bytes (a serialized
`Frame`, its record hash checked by the log) are framed as a
`ReplicationMessage.frame` field by hand (`frames.frame_message`), or with the
records read along with it as one `batch` (`frames.BatchBuilder`: what the
spool holds right then, up to 1 MiB / 256 frames, never waited for) when the
master target's StreamAccepted said `accepts_batches`, and handed to gRPC
through a pass-through serializer, never parsed and serialized again here. A 1 MiB frame so costs one read and one join on this hop instead of half
a dozen copies through protobuf (bench/RESULTS.md, full_sync). The master target parses every
frame and checks its end-to-end checksum, as before.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from siterecovery.common import errors, frames, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.framelog import RELEASE_BYTES, RELEASE_INTERVAL, FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.common.rates import RateWindow

from .spool import Spool

log = get_logger(__name__)

# Codes of errors that mean "could not reach the master target", not "it refused".
_TRANSPORT_CODES = frozenset({"unreachable", "unavailable"})
# Right after a pair is enabled, the master target may not have its assignment
# yet (it arrives with its own next heartbeat): not an error for this long.
NOT_YET_ASSIGNED = "pair-not-assigned"
NOT_YET_GRACE = 30.0
# How long the throughput figure looks back.
RATE_WINDOW = 10.0
_POLL = 0.5
APPLY_METHOD = "/siterecovery.v1.MasterTarget/Apply"


@dataclass(frozen=True)
class ForwardPolicy:
    """How a forwarder paces itself; the defaults suit production."""

    window_bytes: int = 32 * 1024 * 1024
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    # Acknowledged frames are released (framelog's RELEASE_INTERVAL: why) at most every
    # release_interval seconds, sooner once release_bytes of them wait or a receiver waits
    # for spool space.
    release_interval: float = RELEASE_INTERVAL
    release_bytes: int = RELEASE_BYTES

    def __post_init__(self) -> None:
        if (self.window_bytes <= 0 or not 0 < self.initial_backoff <= self.max_backoff
                or self.release_interval < 0 or self.release_bytes < 0):
            raise errors.InvalidInput(f"forward policy {self} is not valid", code="config-range")


DEFAULT_POLICY = ForwardPolicy()


class _Session:
    """One Apply call: what has been sent and not yet acknowledged."""

    def __init__(self) -> None:
        self.accepted = threading.Event()
        self.ended = threading.Event()
        self.start_seq = 0
        self.cond = threading.Condition()
        self.inflight: deque[tuple[int, int]] = deque()  # (seq, bytes)
        self.inflight_bytes = 0
        # The master target said `accepts_batches`: several frames per message.
        self.batches = False

    def end(self) -> None:
        self.ended.set()
        with self.cond:
            self.cond.notify_all()


class Forwarder:
    """Forwards one pair; `start()`, then `stop()`. Status via the read-only properties."""

    def __init__(
        self,
        assignment: rpb.PairAssignment,
        spool: Spool,
        credentials: AgentCredentials,
        *,
        policy: ForwardPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.assignment = assignment
        self.pair_id = assignment.pair_id
        self._spool = spool
        self._log: FrameLog = spool.log(assignment.pair_id)
        self._credentials = credentials
        self._policy = policy
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._session: _Session | None = None
        self._thread = threading.Thread(target=self._run, name=f"forward-{self.pair_id}", daemon=True)
        # The release thread: releases the spool through `_release_to`, the newest Ack.
        self._releaser = threading.Thread(target=self._release_loop, name=f"release-{self.pair_id}", daemon=True)
        self._release_cond = threading.Condition()
        self._release_to = 0
        self._release_soon = False  # a receiver waits for spool space
        self._rate = RateWindow(RATE_WINDOW, clock)
        self.bytes_sent = 0
        self.acked_seq = self._log.released_seq
        self.error: errors.SiteRecoveryError | None = None
        self.connected = False
        self._started_at = clock()

    # -- life ------------------------------------------------------------------
    def start(self) -> None:
        self._spool.add_pressure_listener(self._space_wanted)
        self._thread.start()
        self._releaser.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._spool.remove_pressure_listener(self._space_wanted)
        self._stop.set()
        with self._release_cond:
            self._release_cond.notify_all()
        with self._lock:
            call, session = self._call, self._session
        if session is not None:
            session.end()
        if call is not None:
            call.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._releaser.is_alive() and self._releaser is not threading.current_thread():
            self._releaser.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = self._policy.initial_backoff
        while not self._stop.is_set():
            started = self._clock()
            try:
                self._forward()
            except errors.SiteRecoveryError as exc:
                if self._stop.is_set():
                    break
                self.connected = False
                not_yet = exc.code == NOT_YET_ASSIGNED and self._clock() - self._started_at < NOT_YET_GRACE
                if exc.code not in _TRANSPORT_CODES and not not_yet:
                    self.error = exc
                log.warning(
                    "forwarding to the master target failed; retrying",
                    pair=self.pair_id, target=self.assignment.master_target_id,
                    code=exc.code, error=exc.message, retry_in=round(backoff, 2),
                )
            except Exception as exc:  # a bug: keep the thread, and so the pair, alive
                log.error("forwarding crashed; retrying", pair=self.pair_id, exc_info=exc)
            self.connected = False
            if self._clock() - started > self._policy.max_backoff:
                backoff = self._policy.initial_backoff  # the session went well for a while
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self._policy.max_backoff)
        log.info("forwarder stopped", pair=self.pair_id)

    # -- one session -------------------------------------------------------------
    def _forward(self) -> None:
        a = self.assignment
        channel = secure_channel(
            a.master_target_endpoint,
            self._credentials.channel_credentials(),
            target_name=pki.agent_dns_name(a.master_target_id),
        )
        session = _Session()
        try:
            apply = channel.stream_stream(
                APPLY_METHOD,
                request_serializer=frames.pass_through,
                response_deserializer=rpb.ReplicationReply.FromString,
            )
            call = apply(self._requests(session))
            with self._lock:
                self._call, self._session = call, session
            if self._stop.is_set():
                call.cancel()
            self._replies(session, call)
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return
            raise errors.from_rpc_error(exc, target=a.master_target_endpoint) from exc
        finally:
            session.end()
            with self._lock:
                self._call, self._session = None, None
            channel.close()

    def _replies(self, session: _Session, call: Iterator[rpb.ReplicationReply]) -> None:
        replies = iter(call)
        first = next(replies, None)
        if first is None or first.WhichOneof("kind") != "accepted":
            raise errors.Internal(
                f"master target {self.assignment.master_target_id} did not accept the stream",
                code="target-protocol",
            )
        durable = first.accepted.durable_seq
        released = self._log.released_seq
        if durable < released:
            raise errors.Integrity(
                f"pair {self.pair_id}: master target {self.assignment.master_target_id} holds frames "
                f"up to {durable} only, but acknowledged up to {released} before",
                hint="the target disk lost acknowledged writes (restored from a backup?); resynchronise the pair",
                code="target-behind",
            )
        self._acknowledged(session, durable)
        session.start_seq = durable + 1
        session.batches = first.accepted.accepts_batches
        session.accepted.set()
        self.connected = True
        self.error = None
        log.info("forwarding", pair=self.pair_id, target=self.assignment.master_target_id, from_seq=durable + 1)
        for reply in replies:
            if reply.WhichOneof("kind") != "ack":
                raise errors.Internal("master target sent something other than an Ack", code="target-protocol")
            self._acknowledged(session, reply.ack.seq)
        if not self._stop.is_set():
            raise errors.Unavailable(
                f"master target {self.assignment.master_target_id} ended the stream", code="unavailable"
            )

    def _acknowledged(self, session: _Session, seq: int) -> None:
        """The master target holds everything <= seq: free the window now, release soon."""
        self.acked_seq = max(self.acked_seq, min(seq, self._log.last_seq))
        with session.cond:
            while session.inflight and session.inflight[0][0] <= seq:
                session.inflight_bytes -= session.inflight.popleft()[1]
            session.cond.notify_all()
        with self._release_cond:
            if seq > self._release_to:
                self._release_to = seq
                self._release_cond.notify()

    def _space_wanted(self) -> None:
        """The spool is at its bound and a receiver waits: release what is acknowledged now."""
        with self._release_cond:
            self._release_soon = True
            self._release_cond.notify()

    def _release_wait(self, done: int, last: float) -> float | None:
        """How long to wait before releasing the acknowledged frames above `done`: 0 now,
        None until notified (nothing new is acknowledged); call holding `_release_cond`."""
        if self._release_to <= done:
            return None
        policy = self._policy
        if self._release_soon or self._log.pending_bytes_through(self._release_to) >= policy.release_bytes:
            return 0.0
        return max(0.0, last + policy.release_interval - self._clock())

    def _release_loop(self) -> None:
        """The release thread: release the spool through the newest Ack, one release at a time,
        paced by the policy's release_interval and release_bytes.

        Once stopped it releases what was acknowledged last (so a stopping process
        server leaves its mark up to date) and ends."""
        done, last = 0, self._clock()
        while True:
            with self._release_cond:
                while not self._stop.is_set() and (wait := self._release_wait(done, last)) != 0:
                    self._release_cond.wait(wait)
                target, stopping = self._release_to, self._stop.is_set()
                self._release_soon = False
                last = self._clock()
            if target > done:
                try:
                    self._spool.release(self._log, target)
                    done = target
                except errors.SiteRecoveryError as exc:
                    # The frames stay spooled (safe); the next Ack tries again.
                    log.warning("releasing forwarded frames failed", pair=self.pair_id, code=exc.code,
                                error=exc.message)
                    if self._stop.wait(_POLL):
                        return
                except Exception as exc:  # a bug: keep releasing on later Acks
                    log.error("releasing forwarded frames crashed", pair=self.pair_id, exc_info=exc)
                    if self._stop.wait(_POLL):
                        return
            if stopping:
                return

    def _requests(self, session: _Session) -> Iterator[bytes]:
        """The request stream, serialized (consumed by a gRPC thread): open, then frames as they come."""
        a = self.assignment
        yield rpb.ReplicationMessage(
            open=rpb.StreamOpen(pair_id=a.pair_id, disk_size_bytes=a.disk_size_bytes)
        ).SerializeToString()
        while not session.accepted.wait(_POLL):
            if session.ended.is_set():
                return
        nxt = session.start_seq
        batch = frames.BatchBuilder(session.batches)
        while not session.ended.is_set():
            for seq, body in self._log.read_serialized_from(nxt):
                size = len(body)
                if batch and (not batch.fits(size) or self._window_full(session, size)):
                    # Sent before waiting: the frames of a batch count in the window already.
                    yield batch.take()
                with session.cond:
                    while self._window_full(session, size) and not session.ended.is_set():
                        session.cond.wait(_POLL)
                    if session.ended.is_set():
                        return
                    session.inflight.append((seq, size))
                    session.inflight_bytes += size
                nxt = seq + 1
                self._count_sent(frames.serialized_data_length(body))
                batch.add(body)
                if not session.batches:
                    yield batch.take()
            if batch:  # caught up with the spool: send what there is, never wait to fill a batch
                yield batch.take()
            self._log.wait_for(nxt - 1, timeout=_POLL)

    def _window_full(self, session: _Session, size: int) -> bool:
        return bool(session.inflight) and session.inflight_bytes + size > self._policy.window_bytes

    # -- status ------------------------------------------------------------------
    def _count_sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
        self._rate.add(nbytes)

    @property
    def throughput(self) -> float:
        """Bytes per second sent over the last RATE_WINDOW seconds."""
        return self._rate.rate()

    def status(self) -> rpb.PairStatus:
        """The pair as this process server sees it.

        last_seq: highest seq spooled; acked_seq: highest the master target
        acknowledged; backlog: frames and bytes (on disk, compressed) in the spool
        that the master target has not acknowledged; bytes_sent: write data sent to the master target as it went
        on the wire (compressed; a frame sent again after a reconnect counts again).
        """
        frame_log = self._log
        # Counted from the master target's Ack, not from the release (which follows it
        # on the release thread): the backlog is what the master target does not hold yet.
        acked = max(self.acked_seq, frame_log.released_seq)
        out = rpb.PairStatus(
            pair_id=self.pair_id,
            state=rpb.PAIR_STATE_REPLICATING,
            last_seq=frame_log.last_seq,
            acked_seq=acked,
            backlog_frames=frame_log.pending_frames_after(acked),
            backlog_bytes=frame_log.pending_bytes_after(acked),
            bytes_sent=self.bytes_sent,
            throughput_bytes_per_second=self.throughput,
        )
        oldest = frame_log.oldest_captured_at_after(acked)
        if oldest is not None:
            out.oldest_pending_captured_at.CopyFrom(oldest)
        error = self.error
        if error is not None:
            out.state = rpb.PAIR_STATE_ERROR
            out.reason = f"master target {self.assignment.master_target_id} refused the stream: {error.message}"
            if error.hint:
                out.reason += f" ({error.hint})"
            out.reason_code = error.code
        return out
