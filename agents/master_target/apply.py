"""The MasterTarget.Apply stream: frames in, cumulative acks out.

A process server opens the stream with `open` (pair id, disk size); the master
target checks it (pairs.py: assigned here, called by the pair's process server,
paths inside our directories, disk size) and answers `accepted` with the seq
it holds durably and `accepts_batches`. Then frames flow in (one per `frame`
message, several per `batch`) and acks flow back:

- a reader thread takes messages off the wire (as bytes, read by
  `frames.received_frames`: a large frame's data is not copied) into a bounded
  inbox, so the apply loop can take whatever queued up as one group commit (up
  to `batch_frames` frames / `batch_bytes` payload bytes, whole messages: a
  batch is never split);
- every frame of a message is validated (frames.validate), skipped when
  already applied (seq <= the last applied: idempotent, still acknowledged),
  decompressed and verified end to end (frames.verify) before any of the
  message is applied;
- the batch is applied (target.py, write-ahead undo) and acknowledged with the
  highest applied seq.

A frame that fails its checks ends the stream with its error (DATA_LOSS for a
checksum, INVALID_ARGUMENT for a frame out of range) after the messages before
its own were applied and acknowledged; nothing of its message is written. The
process server reconnects and resends from `durable_seq + 1`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc
import structlog

from siterecovery.common import errors, frames, grpcserver
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

if TYPE_CHECKING:
    from siterecovery.agents.master_target.pairs import MasterTargetPairs

log = get_logger(__name__)

# How long the apply loop waits for frames before it checks whether it still owns the pair.
POLL_SECONDS = 1.0


class Inbox:
    """Messages read off the wire (each a list of frames: one, or a batch), bounded by size."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._cond = threading.Condition()
        self._items: deque[tuple[Sequence[frames.Received], int, int]] = deque()  # (frames, size, payload)
        self._bytes = 0
        self._closed = False
        self.error: BaseException | None = None

    def put(self, carried: Sequence[frames.Received], size: int) -> bool:
        payload = sum(frames.payload_length(received.frame) for received in carried)
        with self._cond:
            while self._bytes >= self._max_bytes and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append((carried, size, payload))
            self._bytes += size
            self._cond.notify_all()
            return True

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            if not self._closed and error is not None:
                self.error = error
            self._closed = True
            self._cond.notify_all()

    def take(self, max_frames: int, max_payload: int, timeout: float) -> list[Sequence[frames.Received]] | None:
        """Whole messages, up to `max_frames` frames / `max_payload` payload bytes (at least
        one message, however large); [] when none came within `timeout`; None once closed
        and drained. A batch is never split: it is checked, and refused, as a whole."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None if self._closed else []
            out: list[Sequence[frames.Received]] = []
            count = payload = 0
            while self._items:
                carried, size, length = self._items[0]
                if out and (count + len(carried) > max_frames or payload + length > max_payload):
                    break
                self._items.popleft()
                self._bytes -= size
                count += len(carried)
                payload += length
                out.append(carried)
            self._cond.notify_all()
            return out


# What a frame without write data counts for in the inbox.
_SMALL_FRAME = 256


def _inbox_size(frame: rpb.Frame) -> int:
    """What `frame` counts for in the inbox: its uncompressed write length.

    Not ByteSize(): with protobuf's upb backend that encodes the message, a
    copy of the 1 MiB payload per frame. The write length is the data carried,
    or more when it is compressed: the inbox holds about as much as before, or less.
    """
    return frame.write.length if frame.WhichOneof("body") == "write" else _SMALL_FRAME


def _read(requests: Iterable[rpb.ReplicationMessage], inbox: Inbox) -> None:
    try:
        for message in requests:
            carried = frames.incoming(message)
            if carried is None:
                inbox.close(errors.InvalidInput(
                    "only frames may follow the open message of an apply stream",
                    hint="this is a process server bug", code="stream-protocol",
                ))
                return
            if not inbox.put(carried, sum(_inbox_size(received.frame) for received in carried)):
                return
        inbox.close()
    except grpc.RpcError as exc:  # the peer went away or the stream was cancelled
        inbox.close(exc)
    except Exception as exc:  # whatever ends the reader ends the stream
        inbox.close(exc)


def _check(
    pair_id: str, carried: Sequence[frames.Received], disk_size: int, last: int
) -> list[tuple[rpb.Frame, bytes | memoryview]]:
    """(frame, uncompressed payload) of each frame of one message above `last`, all checked.

    Raises the first frame's error: a batch is applied whole or not at all."""
    ready: list[tuple[rpb.Frame, bytes | memoryview]] = []
    for received in carried:
        frame, raw = received.frame, received.raw()
        frames.validate(frame, disk_size, raw)
        if frame.seq <= last:
            continue  # already applied: acknowledged again, not written again
        data = frames.payload(frame, raw)
        frames.verify(pair_id, frame, data)
        ready.append((frame, data))
        last = frame.seq
    return ready


def serve_apply(
    pairs: MasterTargetPairs, requests: Iterator[rpb.ReplicationMessage], context: grpc.ServicerContext
) -> Iterator[rpb.ReplicationReply]:
    """The body of MasterTarget.Apply (a generator of replies)."""
    who = grpcserver.caller()
    first = frames.parse_open(next(requests, None))
    if first is None or first.WhichOneof("kind") != "open":
        raise errors.InvalidInput(
            "an apply stream must start with an open message", hint="this is a process server bug",
            code="stream-protocol",
        )
    target, owner = pairs.open_stream(first.open, who, cancel=context.cancel)
    pair_id = target.pair_id
    structlog.contextvars.bind_contextvars(pair=pair_id)
    options = target.options
    # Two batches: one being taken while the next fills. Four (32 MiB of frames) brought the
    # master target to 200 MiB RSS once in a catch-up (1 MiB frames among 16 KiB ones) and
    # carried no more (bench/RESULTS.md, "Item 3 on this machine").
    inbox = Inbox(max_bytes=2 * options.batch_bytes)
    try:
        last = target.applied_seq
        log.info("apply stream open", durable_seq=last)
        yield rpb.ReplicationReply(accepted=rpb.StreamAccepted(durable_seq=last, accepts_batches=True))
        threading.Thread(target=_read, args=(requests, inbox), name=f"apply-read-{pair_id}", daemon=True).start()
        while True:
            batch = inbox.take(options.batch_frames, options.batch_bytes, POLL_SECONDS)
            if target.owner is not owner:
                raise errors.Unavailable(
                    f"the apply stream of pair {pair_id} was replaced by a newer one or the pair was stopped",
                    hint="the process server reconnects by itself", code="stream-replaced",
                )
            if batch is None:
                if isinstance(inbox.error, errors.SiteRecoveryError):
                    raise inbox.error
                log.info("apply stream closed", applied_seq=target.applied_seq)
                return
            if not batch:
                continue
            ready: list[tuple[rpb.Frame, bytes | memoryview]] = []
            refused: errors.SiteRecoveryError | None = None
            for carried in batch:
                try:
                    checked = _check(pair_id, carried, target.disk_size, last)
                except errors.SiteRecoveryError as exc:
                    refused = exc
                    break
                if checked:
                    ready.extend(checked)
                    last = checked[-1][0].seq
            if ready:
                target.apply(ready, owner)
            yield rpb.ReplicationReply(ack=rpb.Ack(seq=target.applied_seq))
            if refused is not None:
                log.warning("frames refused; nothing of their message was written", code=refused.code,
                            error=refused.message)
                raise refused
    finally:
        inbox.close()
        pairs.release(target, owner)
