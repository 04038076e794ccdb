"""Ships one pair's frames to its process server over ProcessServer.Replicate.

Two kinds of frames share the pair's seq space:

- *journaled* frames (writes, zeroed ranges, tags, the start-of-sync marker),
  read back from the pair's journal and kept there until acknowledged;
- *volatile* frames (initial-sync chunks, scan blocks, the end-of-sync marker,
  scan tags) made on demand by a `VolatileSource` from the disk as it is. They
  are never stored: each carries an `on_ack` callback that moves the source's
  persisted progress forward once the process server holds the frame, and
  after a reconnect the source is rewound to that acknowledged progress and
  makes them again, with new seqs.

A stream: send `open(pair_id, disk_size)`, read `accepted.durable_seq`, treat
it as an acknowledgement, then send frames in strictly increasing seq order
(journal frames and volatile frames merged by seq: a volatile frame is made
inside `DiskCapture.quiesced()`, so every journaled frame with a lower seq is
already in the journal when it exists) while at most `window_bytes` are
unacknowledged. Journaled frames go as the journal holds them (serialized);
several frames share a `batch` message when the process server said
`accepts_batches` (up to 1 MiB / 256 frames). Once the shipper has run dry
(sent everything ready), the next message waits until `COALESCE_SECONDS`
after that moment, so the writes of several commits share it: each message
costs every hop a round of wakeups, a spool append and its sync, an apply
group, whatever it carries, and with one message per commit that cost, not the
bytes, set the daemons' CPU at 16 KiB writes (bench/RESULTS.md: about 24 → 21
daemon CPU-s per GB). The RPO grows by at most that wait; a sender that is not
running dry (a sync, a backlog) never waits. Each `Ack(seq)` runs the volatile
frames' callbacks and acknowledges seq to the journal, which releases through it at most once a
second (`PairJournal.acknowledge`: a release costs three fsyncs; releasing
later is always safe, the process server drops frames it already holds). Any error ends the stream: log it, back off
(capped exponential, sleeping on the stop event), reconnect, and resume after
the new durable_seq.

If the process server holds less than this source already released (a new or
rebuilt process server), frames are missing that no longer exist here:
`on_lost` is called so the replicator starts the pair's sync over.

A volatile frame's acknowledgement only moves the source's progress in
memory (its `on_ack`); the replicator saves that progress on its own thread,
coalescing many acknowledgements into one save, and then calls
`progress_saved(seq)`. Until then the frame still counts against the window
(`_unsaved`), so what a kill -9 makes the source send again after a restart
stays bounded by the window, as it was when every Ack was saved on this
thread (which cost a JSON file, two fsyncs and a directory fsync per Ack).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from siterecovery.common import errors, frames
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.common.rates import RateWindow

from .capture import PairJournal

log = get_logger(__name__)

# After running dry, the next message waits this long for more frames to join it.
COALESCE_SECONDS = 0.01

INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 10.0
THROUGHPUT_WINDOW = 10.0
# How long the first reply (accepted) may take.
ACCEPT_TIMEOUT = 30.0
_END = object()
REPLICATE_METHOD = "/siterecovery.v1.ProcessServer/Replicate"


@dataclass
class Produced:
    frame: rpb.Frame
    on_ack: Callable[[], None] | None = None
    # The frame serialized already (frames.serialized_write_frame); `frame` then
    # describes it without its data.
    body: bytes | None = None


@dataclass
class _Stored:
    """A journaled frame as the journal holds it: its seq and its serialized `Frame`."""

    seq: int
    body: bytes | memoryview


class VolatileSource(Protocol):
    def produce(self) -> Produced | None:
        """The next volatile frame (its seq taken inside `quiesced()`), or None for now."""
        ...

    def rewind(self) -> None:
        """Frames made but not acknowledged are lost: make them again from the acknowledged state."""
        ...


class StreamBroken(Exception):
    pass


class Shipper:
    """One pair's sender; `run()` until `stop` is set (in its own thread)."""

    def __init__(
        self,
        *,
        pair_id: str,
        disk_size: int,
        journal: PairJournal,
        connect: Callable[[], grpc.Channel],
        window_bytes: int,
        stop: threading.Event,
        source: VolatileSource | None = None,
        on_acked: Callable[[int, int], None] | None = None,
        on_lost: Callable[[int], None] = lambda _seq: None,
    ) -> None:
        self.pair_id = pair_id
        self.disk_size = disk_size
        self.journal = journal
        self.connect = connect
        self.window_bytes = window_bytes
        self.stop = stop
        self.source = source
        # Called with (seq, bytes acknowledged and not saved) after the callbacks of every frame
        # <= seq ran; whoever saves the progress they made calls `progress_saved`. None: nothing
        # to save, no wait.
        self.on_acked = on_acked
        self.on_lost = on_lost
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._inflight: deque[tuple[int, int, Callable[[], None] | None]] = deque()
        # Acknowledged volatile frames whose progress is not saved yet: (seq, size), still in the window.
        self._unsaved: deque[tuple[int, int]] = deque()
        self._unsaved_bytes = 0
        self._inflight_bytes = 0
        self._ack_pending = 0
        self._broken: BaseException | None = None
        self._pending_volatile: Produced | None = None
        self._jiter: Iterator[tuple[int, bytes | memoryview]] | None = None
        self._jpeek: _Stored | None = None
        self._jnext = 1
        # The process server of the current stream takes batches (StreamAccepted).
        self._batches = False
        # When the sender last sent everything that was ready (see COALESCE_SECONDS).
        self._dry_at = float("-inf")
        self.last_sent = 0
        self.acked_seq = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.connected = False
        self.last_error = ""
        self._rate = RateWindow(THROUGHPUT_WINDOW)
        journal.on_append = self._wake.set

    # -- control ---------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def interrupt(self) -> None:
        """End the current stream (to stop, or to reconnect elsewhere)."""
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._wake.set()

    def throughput(self) -> float:
        return self._rate.rate()

    def run(self) -> None:
        delay = INITIAL_BACKOFF
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except Exception as exc:  # every failure: log, back off, reconnect
                if self.stop.is_set():
                    break
                self.last_error = _describe(exc)
                log.warning("replication stream ended", pair=self.pair_id, error=self.last_error,
                            retry_in=round(delay, 2))
            finally:
                self.connected = False
            if time.monotonic() - started > 30.0:
                delay = INITIAL_BACKOFF
            if self.stop.wait(delay):
                break
            delay = min(delay * 2, MAX_BACKOFF)

    # -- one stream ------------------------------------------------------------------
    def _session(self) -> None:
        channel = self.connect()
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def outgoing() -> Iterator[bytes]:
            while True:
                item = requests.get()
                if item is _END:
                    return
                yield item

        try:
            # Requests go serialized (frames.frame_message): each frame is serialized once.
            replicate = channel.stream_stream(
                REPLICATE_METHOD,
                request_serializer=frames.pass_through,
                response_deserializer=rpb.ReplicationReply.FromString,
            )
            requests.put(
                rpb.ReplicationMessage(
                    open=rpb.StreamOpen(pair_id=self.pair_id, disk_size_bytes=self.disk_size)
                ).SerializeToString()
            )
            call = replicate(outgoing())
            with self._lock:
                self._call = call
                self._broken = None
            if self.stop.is_set():
                call.cancel()
            first = self._first_reply(call)
            if first.WhichOneof("kind") != "accepted":
                raise StreamBroken("the process server did not answer the stream's open with accepted")
            self.connected = True
            self.last_error = ""
            self._batches = first.accepted.accepts_batches
            self._resume(first.accepted.durable_seq)
            log.info("replication stream open", pair=self.pair_id, durable_seq=first.accepted.durable_seq)
            reader = threading.Thread(target=self._read_acks, args=(call,), name=f"acks-{self.pair_id}", daemon=True)
            reader.start()
            try:
                self._send_loop(requests)
            finally:
                requests.put(_END)
                call.cancel()
                reader.join(timeout=10)
            self._process_acks()
            with self._lock:
                broken = self._broken
            if broken is not None and not self.stop.is_set():
                raise broken
        finally:
            with self._lock:
                self._call = None
            requests.put(_END)
            channel.close()

    def _first_reply(self, call) -> rpb.ReplicationReply:
        result: list = []

        def read() -> None:
            try:
                result.append(next(call))
            except BaseException as exc:  # handed to the caller
                result.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(ACCEPT_TIMEOUT)
        if not result:
            call.cancel()
            reader.join(5)
            raise StreamBroken(f"the process server did not accept the stream within {ACCEPT_TIMEOUT:.0f} s")
        if isinstance(result[0], StopIteration):
            raise StreamBroken("the process server ended the stream before accepting it")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _resume(self, durable: int) -> None:
        """The receiver holds everything <= durable: resume after it."""
        self.journal.lease.skip_past(durable)
        with self._lock:
            self._ack_pending = max(self._ack_pending, durable)
        self._process_acks(at_least=durable)
        released = self.journal.log.released_seq
        # Everything not acknowledged is resent: journal frames from the journal, volatile ones remade.
        with self._lock:
            self._inflight.clear()
            # Acknowledged frames still waiting on a save keep their place in the window.
            self._inflight_bytes = self._unsaved_bytes
            self._pending_volatile = None
            self._jiter = None
            self._jpeek = None
            self._jnext = durable + 1
            self.last_sent = durable
            self.acked_seq = durable
        if self.source is not None:
            self.source.rewind()
        if durable < released:
            log.error(
                "the process server holds less than this source already released; starting the sync over",
                pair=self.pair_id, durable_seq=durable, released_seq=released,
            )
            self.on_lost(durable)

    def _read_acks(self, call) -> None:
        try:
            for reply in call:
                if reply.WhichOneof("kind") == "ack":
                    with self._lock:
                        self._ack_pending = max(self._ack_pending, reply.ack.seq)
                    self._wake.set()
            broken: BaseException = StreamBroken("the process server ended the stream")
        except grpc.RpcError as exc:
            broken = exc
        except Exception as exc:  # reported by the sender
            broken = exc
        with self._lock:
            self._broken = broken
        self._wake.set()

    def _send_loop(self, requests: queue.SimpleQueue) -> None:
        while True:
            self._wake.clear()
            if self.stop.is_set():
                return
            with self._lock:
                if self._broken is not None:
                    return
            self._process_acks()
            # Having run dry just now, let the frames of the next commits gather for a moment.
            hold = self._dry_at + COALESCE_SECONDS - time.monotonic()
            if hold > 0 and self.stop.wait(hold):
                return
            # Everything ready now goes, in batches when the process server takes them.
            batch = frames.BatchBuilder(self._batches)
            sent = False
            while self._inflight_bytes < self.window_bytes and not self.stop.is_set():
                item = self._next_frame()
                if item is None:
                    if sent:
                        self._dry_at = time.monotonic()
                    break
                body = self._account(item)
                if batch and not batch.fits(len(body)):
                    requests.put(batch.take())
                batch.add(body)
                sent = True
            if batch:
                requests.put(batch.take())
            if not sent:
                self.journal.release_due()  # an acknowledgement whose release was put off
                self._wake.wait(1.0)

    def _account(self, item: Produced | _Stored) -> bytes | memoryview:
        """Count `item` as sent and unacknowledged; its serialized frame."""
        if isinstance(item, _Stored):
            seq, body, on_ack = item.seq, item.body, None
            data_bytes = frames.serialized_data_length(body)
        else:
            frame, on_ack = item.frame, item.on_ack
            seq = frame.seq
            # Once: ByteSize() and a ReplicationMessage would encode it again.
            body = item.body if item.body is not None else frame.SerializeToString()
            data_bytes = frame.write.length if frame.WhichOneof("body") == "write" else 0
        if seq <= self.last_sent:
            raise errors.Internal(
                f"pair {self.pair_id}: frame {seq} would follow {self.last_sent}; refusing to send out of order",
                code="seq-order",
            )
        with self._lock:
            self._inflight.append((seq, len(body), on_ack))
            self._inflight_bytes += len(body)
            self.last_sent = seq
            self.bytes_sent += data_bytes
            self.frames_sent += 1
        if data_bytes:
            self._rate.add(data_bytes)
        return body

    # -- choosing the next frame ------------------------------------------------------------
    def _peek_journal(self) -> _Stored | None:
        """The next journaled frame not yet sent, or None when the journal holds none now.

        An iterator of remembered frames is a snapshot: when it runs out, frames the
        committer journaled since may be waiting, and they must be seen now, before a
        volatile frame with a higher seq goes (which would put them out of order). So a
        spent iterator is replaced by a fresh one once before saying "none"."""
        if self._jpeek is not None:
            return self._jpeek
        for _fresh in range(2):
            if self._jiter is None:
                if self.journal.log.last_seq < self._jnext:
                    return None
                # Serialized, as the journal holds them: sent without a parse and a serialization;
                # those just journaled from memory, without reading them back (PairJournal.remember).
                recent = self.journal.recent_from(self._jnext)
                if recent is not None:
                    self._jiter = iter(recent)
                else:
                    self._jiter = self.journal.log.read_serialized_from(self._jnext)
            record = next(self._jiter, None)
            if record is not None:
                self._jpeek = _Stored(*record)
                return self._jpeek
            self._jiter = None
        return None

    def _next_frame(self) -> Produced | _Stored | None:
        journaled = self._peek_journal()
        volatile = self._pending_volatile
        if volatile is None and self.source is not None:
            volatile = self._pending_volatile = self.source.produce()
            if volatile is not None and journaled is None:
                journaled = self._peek_journal()  # frames journaled before it was made
        if volatile is not None and (journaled is None or volatile.frame.seq < journaled.seq):
            self._pending_volatile = None
            return volatile
        if journaled is not None:
            self._jpeek = None
            self._jnext = journaled.seq + 1
            return journaled
        return None

    # -- acknowledgements ------------------------------------------------------------------
    def _process_acks(self, at_least: int = 0) -> None:
        with self._lock:
            seq = max(self._ack_pending, at_least)
            if seq <= self.acked_seq and not at_least:
                return
            callbacks = []
            saving = self.on_acked is not None
            while self._inflight and self._inflight[0][0] <= seq:
                frame_seq, size, on_ack = self._inflight.popleft()
                if on_ack is not None:
                    callbacks.append(on_ack)
                    if saving:  # leaves the window once its progress is saved (progress_saved)
                        self._unsaved.append((frame_seq, size))
                        self._unsaved_bytes += size
                        continue
                self._inflight_bytes -= size
            self.acked_seq = max(self.acked_seq, seq)
            unsaved = self._unsaved_bytes
        for callback in callbacks:
            callback()
        if self.on_acked is not None:
            self.on_acked(seq, unsaved)
        self.journal.acknowledge(seq)

    def progress_saved(self, seq: int) -> None:
        """The progress of every acknowledged frame <= seq is saved: they leave the window."""
        with self._lock:
            freed = False
            while self._unsaved and self._unsaved[0][0] <= seq:
                size = self._unsaved.popleft()[1]
                self._inflight_bytes -= size
                self._unsaved_bytes -= size
                freed = True
        if freed:
            self._wake.set()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, errors.SiteRecoveryError):
        return exc.message
    return str(exc) or type(exc).__name__
