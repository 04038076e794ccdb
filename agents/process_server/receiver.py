"""ProcessServer.Replicate: a source agent's stream of one pair's frames into the spool.

The stream: the source sends `open` (pair id and disk size); the process
server checks that the pair is assigned to it and that the caller is the pair's
source machine, then answers `accepted(durable_seq, accepts_batches)` with the
highest seq it holds. Then frames, one per `frame` message or several per
`batch` message; the process server answers with cumulative `Ack`s.

Messages arrive as bytes (daemon.py registers Replicate with no request
deserializer) and `frames.received_frames` reads them: a large lone frame's
data stays a view of the received bytes, which are spooled as they came unless
the data compresses (bench/RESULTS.md).

Two threads per stream:

- the *receiving* thread reads messages, checks every frame of one
  (`frames.validate`, then `frames.verify`) before it keeps any of them, drops
  those it already holds (seq <= durable; acknowledged again), compresses each
  (when a sample of it compresses: `frames.compress`), reserves the message's
  size in the spool (waiting, and so not reading the stream, while the spool
  is full) and queues its frames;
- the *spool* thread takes everything queued, appends it to the pair's log
  with one fsync (group commit) and only then hands one Ack with the log's
  `last_seq` to the RPC's own thread, which sends it (the newest of the Acks
  waiting, when several are). An Ack is never sent for a frame not yet fsynced;
  the spool thread writes the next batch while gRPC sends the Ack.

A frame that fails its checksum ends the stream with DATA_LOSS (one that is
malformed or out of range with INVALID_ARGUMENT) after the messages queued
before its own are written and acknowledged; nothing of its message (the whole
batch) is written. The source resends from its
last Ack. A new stream for a pair ends the one still open for it, so one writer
at a time appends to a log.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from siterecovery.common import errors, frames, grpcserver
from siterecovery.common.framelog import HEADER_SIZE, FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .spool import Spool

log = get_logger(__name__)

# A batch (one append, one fsync, one Ack) stops growing at this size.
MAX_BATCH_BYTES = 8 * 1024 * 1024
# Bytes one stream may have read but not yet written.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
# How long a new stream waits for the previous one of its pair to end.
TAKEOVER_TIMEOUT = 10.0

_END = object()


@dataclass(eq=False)
class _Stream:
    pair_id: str
    context: grpc.ServicerContext
    # SimpleQueue (in C): queue.Queue's put notified a Python Condition per message, 8 % of
    # the process server's GIL time under 16 KiB writes (bench/RESULTS.md, "Small writes").
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    # Bytes read from the stream and not yet written; the writer notifies as it drops.
    queued_bytes: int = 0
    drained: threading.Condition = field(default_factory=threading.Condition)
    # Set by the writer when it ends: nothing may be queued after that.
    sealed: bool = False
    # Whether small writes of this stream are worth a compression attempt (frames.compress).
    compression: frames.CompressionGate = field(default_factory=frames.CompressionGate)

    def cancelled(self) -> bool:
        return self.closed.is_set() or not self.context.is_active()

    def close(self) -> None:
        self.closed.set()
        with self.drained:
            self.drained.notify_all()

    def end(self) -> None:
        """End the RPC from outside (a newer stream took over, or the pair went away)."""
        self.close()
        self.context.cancel()


class Receiver:
    """The logic of ProcessServer.Replicate, handed the spool and the assignment table.

    `lookup(pair_id)` is the pair's current assignment to this process server
    (None when not assigned); `me()` is this agent's id.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        lookup: Callable[[str], rpb.PairAssignment | None],
        me: Callable[[], str],
        stop: threading.Event | None = None,
    ) -> None:
        self._spool = spool
        self._lookup = lookup
        self._me = me
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._active: dict[str, _Stream] = {}

    # -- opening -------------------------------------------------------------
    def _check_open(self, message: rpb.ReplicationMessage | None) -> tuple[str, int]:
        if message is None or message.WhichOneof("kind") != "open":
            raise errors.InvalidInput(
                "a replication stream must start with `open`", code="stream-no-open"
            )
        pair_id, disk_size = message.open.pair_id, message.open.disk_size_bytes
        assignment = self._lookup(pair_id)
        if assignment is None or assignment.process_server_id != self._me():
            raise errors.NotFound(
                f"pair {pair_id!r} is not assigned to process server {self._me()}",
                hint="check the pair's process server with `srctl replication status`; a pair just "
                "enabled reaches the process server with its next heartbeat",
                code="pair-not-assigned",
            )
        who = grpcserver.caller()
        if who.id != assignment.machine_id:
            raise errors.PermissionDenied(
                f"machine {who.id} may not replicate pair {pair_id}: it belongs to machine "
                f"{assignment.machine_id}",
                code="pair-not-yours",
            )
        if disk_size != assignment.disk_size_bytes:
            raise errors.PreconditionFailed(
                f"pair {pair_id}: the source announces a {disk_size}-byte disk, the pair has "
                f"{assignment.disk_size_bytes} bytes",
                hint="the disk was resized; resize the target and update the pair, then resume",
                code="disk-size-mismatch",
            )
        return pair_id, disk_size

    def _take_over(self, stream: _Stream) -> None:
        """Make `stream` the pair's only one, ending an older stream still open for it."""
        with self._lock:
            old = self._active.get(stream.pair_id)
            self._active[stream.pair_id] = stream
        if old is not None:
            log.info("replication stream replaced by a new one", pair=stream.pair_id)
            old.end()
            if not old.done.wait(TAKEOVER_TIMEOUT):
                with self._lock:
                    if self._active.get(stream.pair_id) is stream:
                        del self._active[stream.pair_id]
                raise errors.Unavailable(
                    f"pair {stream.pair_id}: the previous stream has not ended yet",
                    hint="the source retries by itself",
                    code="stream-busy",
                )

    def end_pair(self, pair_id: str) -> None:
        """End the open stream of a pair (it was taken off this process server)."""
        with self._lock:
            stream = self._active.get(pair_id)
        if stream is not None:
            stream.end()

    def end_all(self) -> None:
        with self._lock:
            streams = list(self._active.values())
        for stream in streams:
            stream.end()

    # -- the stream ------------------------------------------------------------
    def replicate(
        self, requests: Iterator[rpb.ReplicationMessage], context: grpc.ServicerContext
    ) -> Iterator[rpb.ReplicationReply]:
        pair_id, disk_size = self._check_open(frames.parse_open(next(requests, None)))
        stream = _Stream(pair_id, context)
        context.add_callback(lambda: (stream.close(), self._spool.wake()))
        try:
            self._take_over(stream)
            frame_log = self._spool.log(pair_id)
            durable = frame_log.last_seq
            log.info("replication stream open", pair=pair_id, durable_seq=durable)
            yield rpb.ReplicationReply(accepted=rpb.StreamAccepted(durable_seq=durable, accepts_batches=True))
            threading.Thread(
                target=self._receive,
                args=(stream, requests, disk_size, durable),
                name=f"receive-{pair_id}",
                daemon=True,
            ).start()
            yield from self._write(stream, frame_log)
        finally:
            # The receiving thread ends by itself once the RPC has ended (which happens
            # only after this generator returns): do not wait for it here. Seal the
            # stream so it can queue nothing more, and give back what it had queued.
            stream.close()
            with stream.drained:
                stream.sealed = True
                leftover, stream.queued_bytes = stream.queued_bytes, 0
            self._spool.settle(leftover)
            with self._lock:
                if self._active.get(pair_id) is stream:
                    del self._active[pair_id]
            stream.done.set()

    def _receive(
        self, stream: _Stream, requests: Iterator[rpb.ReplicationMessage], disk_size: int, durable: int
    ) -> None:
        """The receiving thread: check, compress, reserve, queue; ends the queue with _END."""
        highest = durable
        try:
            for message in requests:
                if stream.cancelled() or self._stop.is_set():
                    break
                carried = frames.incoming(message)
                if carried is None:
                    raise errors.InvalidInput("`open` may come only once, first", code="stream-open-twice")
                # Every frame of a message is checked before any of it is queued: a batch
                # with one bad frame is refused whole (the source resends from its last Ack).
                records = self._check(stream.pair_id, carried, disk_size, highest, stream.compression)
                if not records:
                    stream.queue.put(None)  # held already: acknowledge again, write nothing
                    continue
                size = sum(len(body) for _seq, body in records) + HEADER_SIZE * len(records)
                if not self._reserve(stream, (records, size)):
                    break
                highest = records[-1][0]
        except errors.SiteRecoveryError as exc:
            stream.queue.put(exc)
        except grpc.RpcError:
            pass  # the stream ended under us: the writer sees _END
        except Exception as exc:  # a bug: end the stream as INTERNAL, keep the server
            log.error("replication receive failed", pair=stream.pair_id, exc_info=exc)
            stream.queue.put(errors.Internal("internal error; see the process server log", code="internal"))
        finally:
            stream.queue.put(_END)

    @staticmethod
    def _check(
        pair_id: str, carried: Sequence[frames.Received], disk_size: int, highest: int,
        gate: frames.CompressionGate | None = None,
    ) -> list[tuple[int, bytes | memoryview]]:
        """(seq, serialized spooled frame) of each frame above `highest`, all checked and compressed.

        Raises the first frame's error (range, then checksum) and returns nothing
        then: a batch is kept whole or not at all."""
        records: list[tuple[int, bytes | memoryview]] = []
        for received in carried:
            frame, raw = received.frame, received.raw()
            frames.validate(frame, disk_size, raw)
            if frame.seq <= highest:
                continue  # held already (sent again after a reconnect)
            frames.verify(pair_id, frame, frames.payload(frame, raw))
            spooled = frames.compress(frame, raw, gate)
            if spooled is frame and received.body is not None:
                body: bytes | memoryview = received.body  # as it came: no copy
            else:
                # Serialized here, once: its length is what the spool reserves, and the
                # log writes these bytes as they are.
                body = spooled.SerializeToString()
            records.append((frame.seq, body))
            highest = frame.seq
        return records

    def _reserve(self, stream: _Stream, item: tuple[list[tuple[int, bytes | memoryview]], int]) -> bool:
        """Wait until this stream's read-ahead and then the spool have room; queue `item`.

        False (nothing queued) when the stream ended meanwhile.
        """
        size = item[1]

        def cancelled() -> bool:
            return stream.cancelled() or self._stop.is_set()

        with stream.drained:
            while stream.queued_bytes and stream.queued_bytes + size > MAX_QUEUED_BYTES:
                if cancelled():
                    return False
                stream.drained.wait(1.0)
        if not self._spool.reserve(size, cancelled=cancelled):
            return False
        with stream.drained:
            if not stream.sealed:
                stream.queued_bytes += size
                stream.queue.put(item)
                return True
        self._spool.settle(size)  # the writer is gone
        return False

    def _write(self, stream: _Stream, frame_log: FrameLog) -> Iterator[rpb.ReplicationReply]:
        """The replying side: the spool thread's Acks, the newest of those waiting, as they come."""
        acks: queue.SimpleQueue = queue.SimpleQueue()
        writer = threading.Thread(
            target=self._spool_loop, args=(stream, frame_log, acks), name=f"spool-{stream.pair_id}", daemon=True
        )
        writer.start()
        try:
            while True:
                items = [acks.get()]
                while True:
                    try:
                        items.append(acks.get_nowait())
                    except queue.Empty:
                        break
                seqs = [item for item in items if isinstance(item, int)]
                if seqs:
                    yield rpb.ReplicationReply(ack=rpb.Ack(seq=seqs[-1]))
                ends = [item for item in items if not isinstance(item, int)]
                if not ends:
                    continue
                if isinstance(ends[0], errors.SiteRecoveryError):
                    raise ends[0]
                return
        finally:
            # Wake the spool thread if it waits for frames, and let it end before the
            # stream counts as done: a new stream of the pair must be the log's only writer.
            stream.close()
            stream.queue.put(_END)
            writer.join()

    def _spool_loop(self, stream: _Stream, frame_log: FrameLog, acks: queue.SimpleQueue) -> None:
        """The spool thread: one append (one fsync) per batch of queued frames, then its Ack.

        Acks go to `acks` as the log's `last_seq` after the fsync that covers them,
        then an error that ends the stream, if any, then _END. The RPC's thread
        sends them: the spool thread does not wait for gRPC to send an Ack before it
        writes the next batch (py-spy put a quarter of this thread's time there when
        it did both)."""
        try:
            finished = False
            while not finished:
                item = stream.queue.get()
                batch: list[tuple[int, bytes | memoryview]] = []  # (seq, serialized frame)
                reserved = 0
                ack = False
                failure: errors.SiteRecoveryError | None = None
                while True:
                    if item is _END:
                        finished = True
                    elif isinstance(item, errors.SiteRecoveryError):
                        failure = item
                    elif item is None:
                        ack = True  # a frame held already came again
                    else:
                        batch.extend(item[0])
                        reserved += item[1]
                    if finished or failure is not None or reserved >= MAX_BATCH_BYTES:
                        break
                    try:
                        item = stream.queue.get_nowait()
                    except queue.Empty:
                        break
                try:
                    frame_log.append_serialized(batch)
                except errors.SiteRecoveryError as exc:
                    if exc.code == "disk-full":
                        self._spool.note_disk_full(exc.message)
                    raise
                else:
                    if batch:
                        self._spool.note_disk_full(None)
                finally:
                    with stream.drained:
                        stream.queued_bytes -= reserved
                        stream.drained.notify_all()
                    self._spool.settle(reserved)
                if batch or ack:
                    acks.put(frame_log.last_seq)
                if failure is not None:
                    log.warning(
                        "replication stream refused a frame", pair=stream.pair_id, code=failure.code,
                        error=failure.message,
                    )
                    acks.put(failure)
                    return
        except errors.SiteRecoveryError as exc:
            acks.put(exc)
        except Exception as exc:  # a bug: end the stream as INTERNAL, keep the server
            log.error("replication spooling failed", pair=stream.pair_id, exc_info=exc)
            acks.put(errors.Internal("internal error; see the process server log", code="internal"))
        finally:
            acks.put(_END)
