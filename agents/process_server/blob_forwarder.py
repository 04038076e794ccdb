"""Applying an azure-page-blob pair's spooled frames to its Azure page blob.

For forward protection to Azure the process server is the end of the data
path: no master target, the process server writes the disk into one page blob
(common/azure/pageblob.py) and takes recovery points as blob snapshots
(common/azure/points.py). One `BlobForwarder` thread per such pair; it takes
the place of the `Forwarder` (forwarder.py) and has the same face
(`start`, `stop`, `status`).

What it does with each spooled frame, in seq order, one at a time:

- check it end to end exactly as a master target does (`frames.validate`,
  `frames.payload`, `frames.verify`; a frame that fails is never written);
- SYNC INITIAL_STARTED: create the blob when missing (zero-filled, sized to
  the disk rounded up to 1 MiB, with its fixed-VHD footer). An existing blob
  made for a disk of the same size is reused as it is - never zeroed, never
  created again (`open_or_create` creates only when missing): a full sync
  overwrites all of it, a delta sync (a pair enabled with `--sync delta` onto
  the blob an earlier protection left, whatever pair wrote it before and with
  no state file here yet) only the blocks that differ, whose digests this
  process server read from the blob (blob_hashes.py). A blob of another size
  is refused; for a delta pair as `target-size-mismatch`, with the fix;
- write: Put Page (edges read-merged when unaligned, pieces of 4 MiB, pieces
  of zeros as Clear Pages); zero: Clear Pages;
- tag: a snapshot with metadata, taken only after every frame before it has
  been written (Azure acknowledges a Put Page once it is durable). Tags that
  arrive while a sync runs are not points (the blob is not a consistent disk
  then), as on a master target;
- SYNC INITIAL_DONE: the blob is a usable disk from here on.

**Durability and what a crash leaves behind.** After a run of frames (at most
`batch_frames` / `batch_bytes`, or whatever the spool held) the forwarder
writes the pair's state file and fsyncs it, and only then releases those
frames from the spool. State file `<state_dir>/azure-pairs/<pair_id>.json`
(replaced atomically)::

    {"format": 1, "pair_id", "blob": "<account>/<container>/<blob name>",
     "applied_seq", "applied_captured_at_ns", "newest_captured_at_ns",
     "applied_bytes_total", "sync": "none"|"started"|"done", "ever_synced",
     "blob_created"}

So `applied_seq` >= the spool's released mark, always. A `kill -9` anywhere
leaves the blob holding every frame up to `applied_seq` and maybe some after
it, partly; the next session resumes at `applied_seq + 1` from the spool
(nothing is asked of the source again, no resync) and applies those frames
again. That converges to the exact disk: each write or zero sets its whole
range to fixed contents, so every byte changed after `applied_seq` is set
again, in order, by a frame that is applied again. A tag applied again finds
its snapshot by tag id and takes no second one; a snapshot cannot hold a
frame after its tag, because frames are applied in order and a snapshot, once
taken, never changes. The source and the spool see nothing of this: the
receiver acknowledges what the spool holds.

A state file whose `applied_seq` is behind the spool's released mark (lost or
restored from a backup), or a blob missing although the state says it was
created, is damage: the pair goes to ERROR with the fix (re-protect it),
nothing is guessed.

**Failures.** Every Azure call goes through `errors.call` (retries 429, 5xx
and broken connections, waiting what `Retry-After` asks). When that gives
up, the session ends and a new one starts after a capped backoff, at least as
long as the last `Retry-After`; meanwhile frames stay in the spool, which is
bounded, and a full spool holds the sources back (receiver.py): nothing is
lost. Throttling and an unreachable Azure are not errors of the pair (the
spool's health shows the backlog); any other refusal (authentication,
permissions, a blob of another size, a damaged frame) puts the pair in ERROR
with Azure's reason until a session goes well again.

**Points.** Each snapshot carries, besides points.py's metadata,
`sr_pair_id`, `sr_seq`, `sr_group_id`, `sr_on_demand` and `sr_note`
(URL-quoted). The forwarder lists the blob's snapshots once per session and
keeps this pair's in memory for `status` (heartbeats never call Azure).
Retention: every `prune_interval` seconds, snapshots captured before the
pair's retention window are deleted, except the newest point; so are the
points an earlier pair of the same blob left (a reprotect to Azure after a
failback writes the blob the first protection wrote, as a new pair). The window ends
at the older of this clock and the newest capture time in the stream, as on a
master target.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceExistsError
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.common import errors, frames
from siterecovery.common.azure import points as blob_points
from siterecovery.common.azure.errors import DEFAULT_RETRY, AzureRetryPolicy, call, retry_after
from siterecovery.common.azure.pageblob import PageBlobDisk
from siterecovery.common.daemon import write_json_atomically
from siterecovery.common.framelog import FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

from .azure_storage import SETTING, StorageCredentialFile, redact, with_storage_hint
from .blob_hashes import size_mismatch
from .spool import Spool

log = get_logger(__name__)

STATE_FORMAT = 1
STATE_DIR = "azure-pairs"
SYNC_NONE, SYNC_STARTED, SYNC_DONE = "none", "started", "done"
# Azure's answers that mean "not now", not "no": the spool holds the frames meanwhile.
TRANSIENT_CODES = frozenset({"azure-throttled", "azure-unavailable", "stopping"})
RATE_WINDOW = 10.0
_POLL = 0.5
META_PAIR, META_SEQ, META_GROUP, META_ON_DEMAND, META_NOTE = (
    "sr_pair_id", "sr_seq", "sr_group_id", "sr_on_demand", "sr_note",
)
KIND_NAMES = {
    rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT: "crash-consistent",
    rpb.RECOVERY_POINT_KIND_APP_CONSISTENT: "app-consistent",
    rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT: "multi-vm-consistent",
}
KIND_VALUES = {v: k for k, v in KIND_NAMES.items()}


@dataclass(frozen=True)
class BlobPolicy:
    """How a blob forwarder paces itself; the defaults suit production, tests shrink them."""

    # Frames / payload bytes applied between two state-file writes (and spool releases).
    batch_frames: int = 256
    batch_bytes: int = 32 * 1024 * 1024
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    prune_interval: float = 60.0
    retry: AzureRetryPolicy = DEFAULT_RETRY

    def __post_init__(self) -> None:
        if self.batch_frames <= 0 or self.batch_bytes <= 0 or not 0 < self.initial_backoff <= self.max_backoff:
            raise errors.InvalidInput(f"blob forwarding policy {self} is not valid", code="config-range")


DEFAULT_BLOB_POLICY = BlobPolicy()


@dataclass
class BlobPairState:
    """What the forwarder keeps of one pair across restarts (the module docstring has the file)."""

    pair_id: str
    blob: str
    applied_seq: int = 0
    applied_captured_at_ns: int = 0
    newest_captured_at_ns: int = 0
    applied_bytes_total: int = 0
    sync: str = SYNC_NONE
    ever_synced: bool = False
    blob_created: bool = False
    format: int = field(default=STATE_FORMAT)

    @classmethod
    def load(cls, path: Path, pair_id: str, blob: str) -> BlobPairState | None:
        """The saved state, None when there is none; Integrity when it is unreadable."""
        import json

        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise errors.Integrity(
                f"the state file {path} of pair {pair_id} is unreadable ({exc})",
                hint="the blob's applied position is unknown: re-protect the pair (disable, then enable replication)",
                code="azure-state-damaged",
            ) from None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            state = cls(**known)
        except TypeError as exc:
            raise errors.Integrity(f"the state file {path} is damaged ({exc})", code="azure-state-damaged") from None
        if state.format != STATE_FORMAT or state.pair_id != pair_id or state.sync not in (SYNC_NONE, SYNC_STARTED, SYNC_DONE):
            raise errors.Integrity(
                f"the state file {path} is not this version's state of pair {pair_id}",
                hint="re-protect the pair (disable, then enable replication)",
                code="azure-state-damaged",
            )
        return state

    def save(self, path: Path) -> None:
        write_json_atomically(path, asdict(self), mode=0o600)


class _Stopped(Exception):
    """The forwarder is stopping: leave whatever Azure call or wait is under way."""


class BlobForwarder:
    """Applies one azure-page-blob pair; `start()`, then `stop()`. Status via `status()`."""

    def __init__(
        self,
        assignment: rpb.PairAssignment,
        spool: Spool,
        storage: StorageCredentialFile,
        state_dir: Path,
        *,
        policy: BlobPolicy = DEFAULT_BLOB_POLICY,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if assignment.target_kind != rpb.TARGET_KIND_AZURE_PAGE_BLOB or not assignment.azure_blob.blob_name:
            raise errors.InvalidInput(f"pair {assignment.pair_id} names no page blob", code="azure-target-missing")
        self.assignment = assignment
        self.pair_id = assignment.pair_id
        target = assignment.azure_blob
        self.blob = f"{target.storage_account}/{target.container}/{target.blob_name}"
        self._spool = spool
        self._log: FrameLog = spool.log(self.pair_id)
        self._storage = storage
        self._state_path = Path(state_dir) / STATE_DIR / f"{self.pair_id}.json"
        self._policy = policy
        self._clock = clock
        self._wall = wall
        self._on_change = on_change
        self._client_options = dict(client_options or {})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Notified as each frame is written (`wait_applied`); `waiting` counts its waiters.
        self._applied_cond = threading.Condition()
        self.waiting = 0
        saved = BlobPairState.load(self._state_path, self.pair_id, self.blob)
        if saved is not None and saved.blob != self.blob:
            raise errors.PreconditionFailed(
                f"pair {self.pair_id} was written to blob {saved.blob}; its assignment now names {self.blob}",
                hint="a pair's blob cannot move: re-protect the pair",
                code="azure-blob-moved",
            )
        self.state = saved or BlobPairState(pair_id=self.pair_id, blob=self.blob)
        self._points: list[blob_points.BlobPoint] = []
        # Points an earlier pair left on this blob (a protection cycle before a
        # failover and failback): no pair offers them; pruned by age like ours.
        self._earlier: list[blob_points.BlobPoint] = []
        self._disk: PageBlobDisk | None = None
        self._container: Any = None
        self._last_prune = float("-inf")
        self._written: deque[tuple[float, int]] = deque()
        self.bytes_written = 0
        self.error: errors.SiteRecoveryError | None = None
        self.connected = False
        # Paused and idle: nothing is being written to the blob (a failover may copy it as it is).
        self.holding = False
        # Sessions ended by an error (Azure unreachable, a refusal), since start.
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=f"blob-{self.pair_id}", daemon=True)

    # -- life ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _sleep(self, seconds: float) -> None:
        """The Azure retry loop's sleep: it ends at once, by raising, when we stop."""
        if self._stop.wait(seconds):
            raise _Stopped()

    def _run(self) -> None:
        backoff = self._policy.initial_backoff
        while not self._stop.is_set():
            started = self._clock()
            wait = backoff
            try:
                self._session()
            except _Stopped:
                break
            except errors.SiteRecoveryError as exc:
                if self._stop.is_set():
                    break
                self.failures += 1
                exc = with_storage_hint(exc, self._storage)
                if exc.code not in TRANSIENT_CODES:
                    self.error = exc
                asked = retry_after(exc.__cause__) if exc.__cause__ is not None else None
                if asked is not None:
                    wait = max(wait, asked)  # Azure said when; do not come back earlier
                log.warning(
                    "writing the page blob failed; retrying",
                    pair=self.pair_id, blob=self.blob, code=exc.code, error=redact(exc.message),
                    retry_in=round(wait, 2),
                )
            except Exception as exc:  # a bug: keep the thread, and so the pair, alive
                self.failures += 1
                log.error("blob forwarding crashed; retrying", pair=self.pair_id, error=redact(str(exc)))
                self.error = errors.Internal("internal error; see the process server log", code="internal")
            self.connected = False
            if self._clock() - started > self._policy.max_backoff:
                backoff = self._policy.initial_backoff  # the session went well for a while
            if self._stop.wait(wait):
                break
            backoff = min(backoff * 2, self._policy.max_backoff)
        self._disk = None
        self._container = None
        log.info("blob forwarder stopped", pair=self.pair_id)

    # -- one session -------------------------------------------------------------
    def _session(self) -> None:
        target = self.assignment.azure_blob
        self._container = self._storage.container(target.storage_account, target.container, **self._client_options)
        self._disk = None
        state = self.state
        released = self._log.released_seq
        if released > state.applied_seq:
            raise errors.Integrity(
                f"pair {self.pair_id}: the spool released frames up to {released}, but the blob's state "
                f"({self._state_path}) says only {state.applied_seq} were written",
                hint="the state file was lost or restored from a backup; re-protect the pair "
                "(disable, then enable replication) for a full resync",
                code="target-behind",
            )
        if state.blob_created:
            self._disk = self._open_existing()
        else:
            self._ensure_container()
        try:
            self._reload_points()
        except errors.NotFound as exc:
            target = self.assignment.azure_blob
            raise errors.NotFound(
                exc.message,
                hint=f"create container {target.container} in storage account {target.storage_account}, or give "
                f"the process server a credential ({SETTING}) that may create it",
                code="azure-container-not-found",
            ) from exc
        self._spool.release(self._log, state.applied_seq)
        self.connected = True
        self.error = None
        log.info("writing page blob", pair=self.pair_id, blob=self.blob, from_seq=state.applied_seq + 1)
        while not self._stop.is_set():
            if self.assignment.desired_state == rpb.PAIR_DESIRED_STATE_PAUSED:
                self.holding = True
                self._stop.wait(_POLL)  # paused by an administrator: keep the frames spooled
                continue
            self.holding = False
            if not self._apply_available():
                self._prune_if_due()
                self._log.wait_for(self.state.applied_seq, timeout=_POLL)

    def _open_existing(self) -> PageBlobDisk:
        try:
            disk = PageBlobDisk.open(
                self._container, self.assignment.azure_blob.blob_name, policy=self._policy.retry, sleep=self._sleep
            )
        except errors.NotFound:
            raise errors.Integrity(
                f"pair {self.pair_id}: page blob {self.blob} is gone, though frames up to "
                f"{self.state.applied_seq} were written into it",
                hint="someone deleted the blob; re-protect the pair (disable, then enable replication)",
                code="azure-blob-missing",
            ) from None
        if disk.disk_size != self.assignment.disk_size_bytes:
            raise errors.Conflict(
                f"page blob {self.blob} holds a {disk.disk_size}-byte disk; the pair's disk has "
                f"{self.assignment.disk_size_bytes} bytes",
                hint="the blob belongs to another disk or the disk was resized: re-protect the pair",
                code="azure-blob-mismatch",
            )
        return disk

    def _ensure_container(self) -> None:
        """Create the pair's container when missing (a SAS scoped to it may not: then it must exist)."""

        def create() -> None:
            try:
                self._container.create_container()
            except ResourceExistsError:
                pass

        try:
            call(f"create container {self.assignment.azure_blob.container}", create, self._policy.retry, sleep=self._sleep)
        except errors.PermissionDenied:
            pass  # the blob's creation says what is wrong, if anything

    def _ensure_disk(self) -> PageBlobDisk:
        if self._disk is None:
            if not self.state.blob_created:
                self._ensure_container()
            try:
                self._disk = PageBlobDisk.open_or_create(
                    self._container, self.assignment.azure_blob.blob_name, self.assignment.disk_size_bytes,
                    metadata={META_PAIR: self.pair_id}, policy=self._policy.retry, sleep=self._sleep,
                )
            except errors.Conflict as exc:
                if self.assignment.sync_kind == rpb.SYNC_KIND_DELTA:
                    raise size_mismatch(exc, self.assignment) from exc
                raise
            if not self.state.blob_created:
                self.state.blob_created = True
                self._save()  # before any frame depends on it
                log.info("page blob ready", pair=self.pair_id, blob=self.blob)
        return self._disk

    def _reload_points(self) -> None:
        found = blob_points.list_points(
            self._container, self.assignment.azure_blob.blob_name, policy=self._policy.retry, sleep=self._sleep
        )
        mine = [p for p in found if p.extra.get(META_PAIR) == self.pair_id]
        earlier = [p for p in found if p.extra.get(META_PAIR) not in ("", None, self.pair_id)]
        with self._lock:
            self._points = mine
            self._earlier = earlier
        self._changed()

    def _apply_available(self) -> bool:
        """Apply what the spool holds (up to one batch), then save and release; False when it held nothing.

        Adjacent zero ranges are cleared with one Clear Pages (an initial sync
        sends a 1 MiB zero range per empty chunk); they count as applied only
        once cleared.
        """
        policy = self._policy
        count = payload = 0
        state = self.state
        zeros: list[rpb.Frame] = []
        try:
            for frame in self._log.read_from(state.applied_seq + 1):
                if frame.seq <= (zeros[-1].seq if zeros else state.applied_seq):
                    continue
                data = self._check(frame)
                count += 1
                if frame.WhichOneof("body") == "zero":
                    if zeros and zeros[-1].zero.offset + zeros[-1].zero.length != frame.zero.offset:
                        self._clear(zeros)
                    zeros.append(frame)
                else:
                    self._clear(zeros)
                    self._apply(frame, data)
                    payload += frames.payload_length(frame)
                if count >= policy.batch_frames or payload >= policy.batch_bytes or self._stop.is_set():
                    break
            self._clear(zeros)
        finally:
            if count:
                self._save()
                self._spool.release(self._log, state.applied_seq)
        return count > 0

    def _check(self, frame: rpb.Frame) -> bytes:
        """The frame's data, checked end to end exactly as a master target checks it."""
        frames.validate(frame, self.assignment.disk_size_bytes)
        data = frames.payload(frame)
        frames.verify(self.pair_id, frame, data)
        return data

    def _clear(self, run: list[rpb.Frame]) -> None:
        """Apply a run of adjacent zero frames with one Clear Pages; empties `run`."""
        if not run:
            return
        start = run[0].zero.offset
        end = run[-1].zero.offset + run[-1].zero.length
        self._ensure_disk().zero(start, end - start)
        for frame in run:
            self._applied(frame)
        run.clear()

    def _apply(self, frame: rpb.Frame, data: bytes) -> None:
        """Apply one checked frame other than a zero range (module docstring)."""
        state = self.state
        body = frame.WhichOneof("body")
        if body == "write":
            self._ensure_disk().write(frame.write.offset, data)
            state.applied_bytes_total += frame.write.length
            self._count_written(frame.write.length)
        elif body == "sync":
            self._ensure_disk()  # an empty disk's sync may hold nothing but its markers
            if frame.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED:
                state.sync = SYNC_STARTED
            else:
                state.sync, state.ever_synced = SYNC_DONE, True
            self._changed()
        elif body == "tag":
            self._take_point(frame)
        self._applied(frame)

    def _applied(self, frame: rpb.Frame) -> None:
        state = self.state
        captured = frame.captured_at.ToNanoseconds()
        state.applied_seq = frame.seq
        state.applied_captured_at_ns = captured
        state.newest_captured_at_ns = max(state.newest_captured_at_ns, captured)
        with self._applied_cond:
            self._applied_cond.notify_all()

    def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait up to `timeout` s for the blob to hold the frames through `seq`; whether it does."""
        with self._applied_cond:
            self.waiting += 1
            try:
                return self._applied_cond.wait_for(lambda: self.state.applied_seq >= seq, timeout)
            finally:
                self.waiting -= 1

    def _take_point(self, frame: rpb.Frame) -> None:
        tag = frame.tag
        if self.state.sync != SYNC_DONE or not self.state.ever_synced:
            log.info("tag during a sync is not a recovery point", pair=self.pair_id, tag=tag.tag_id, seq=frame.seq)
            return
        tag_id = urllib.parse.quote(tag.tag_id, safe="")  # metadata values are ASCII header values
        with self._lock:
            known = list(self._points)
        if any(p.tag_id == tag_id for p in known):
            return  # applied again after a restart: the snapshot exists
        extra = {
            META_PAIR: self.pair_id,
            META_SEQ: str(frame.seq),
            META_GROUP: urllib.parse.quote(tag.group_id, safe=""),
            META_ON_DEMAND: "1" if tag.on_demand else "0",
            META_NOTE: urllib.parse.quote(tag.note, safe=""),
        }
        point = blob_points.create_point(
            self._ensure_disk(),
            tag_id,
            KIND_NAMES[tag.kind],
            frame.captured_at.ToDatetime(tzinfo=UTC),
            extra=extra,
            existing=known,
        )
        with self._lock:
            self._points = sorted([*self._points, point], key=lambda p: (p.captured_at, p.snapshot))
        log.info("recovery point taken", pair=self.pair_id, tag=tag.tag_id, snapshot=point.snapshot, seq=frame.seq)
        self._changed()

    def _save(self) -> None:
        self.state.save(self._state_path)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # -- retention ---------------------------------------------------------------
    def _prune_if_due(self) -> None:
        now = self._clock()
        if 0 <= now - self._last_prune < self._policy.prune_interval:
            return
        self._last_prune = now
        self.prune(self._wall())

    def prune(self, now: float) -> int:
        """Delete snapshots older than the pair's retention window, never its newest point; how many.

        Besides this pair's points, the ones an earlier pair of the same blob
        left (one pair writes a blob at a time: the cycle before a failover,
        failback and reprotect to Azure) go by the same window; none of them
        is the newest point of this pair, so all of them may go.
        """
        window = self.assignment.policy.retention_window_seconds or 86400
        newest_ns = self.state.newest_captured_at_ns
        reference = min(now, newest_ns / 1e9) if newest_ns else now
        cutoff = datetime.fromtimestamp(reference - window, UTC)
        with self._lock:
            expired = [p for p in self._points[:-1] if p.captured_at < cutoff]
            expired += [p for p in self._earlier if p.captured_at < cutoff]
        for point in expired:
            blob_points.delete_point(self._container, point, policy=self._policy.retry, sleep=self._sleep)
            with self._lock:
                self._points = [p for p in self._points if p.snapshot != point.snapshot]
                self._earlier = [p for p in self._earlier if p.snapshot != point.snapshot]
        if expired:
            log.info("recovery points expired", pair=self.pair_id, points=len(expired))
            self._changed()
        return len(expired)

    # -- status ------------------------------------------------------------------
    def _count_written(self, nbytes: int) -> None:
        now = self._clock()
        with self._lock:
            self.bytes_written += nbytes
            self._written.append((now, nbytes))
            while self._written and self._written[0][0] < now - RATE_WINDOW:
                self._written.popleft()

    @property
    def throughput(self) -> float:
        now = self._clock()
        with self._lock:
            recent = sum(n for t, n in self._written if t >= now - RATE_WINDOW)
        return recent / RATE_WINDOW

    def points(self) -> list[rpb.RecoveryPoint]:
        with self._lock:
            known = list(self._points)
        return [_point_proto(p) for p in known]

    def status(self) -> rpb.PairStatus:
        """The pair as its end reports it (like a master target) plus the spool's part.

        last_seq: highest seq spooled; acked_seq: highest written into the blob;
        backlog: what waits in the spool; bytes_sent: write data written into the
        blob since the process server started; points: the blob's snapshots.
        """
        frame_log, state = self._log, self.state
        out = rpb.PairStatus(
            pair_id=self.pair_id,
            state=rpb.PAIR_STATE_REPLICATING if state.sync == SYNC_DONE else rpb.PAIR_STATE_INITIAL_SYNC,
            last_seq=frame_log.last_seq,
            acked_seq=max(state.applied_seq, frame_log.released_seq),
            backlog_frames=frame_log.pending_frames,
            backlog_bytes=frame_log.pending_bytes,
            bytes_sent=self.bytes_written,
            throughput_bytes_per_second=self.throughput,
            applied_bytes_total=state.applied_bytes_total,
            points=self.points(),
        )
        if state.applied_captured_at_ns:
            out.applied_captured_at.CopyFrom(_stamp(state.applied_captured_at_ns))
        oldest = frame_log.oldest_pending_captured_at
        if oldest is not None:
            out.oldest_pending_captured_at.CopyFrom(oldest)
        if self.holding:
            out.state = rpb.PAIR_STATE_PAUSED
            out.reason_code, out.reason = "paused", "paused: nothing is written to the blob until it resumes"
        error = self.error
        if error is not None:
            out.state = rpb.PAIR_STATE_ERROR
            out.reason = redact(f"page blob {self.blob}: {error.message}" + (f" ({error.hint})" if error.hint else ""))
            out.reason_code = error.code
        return out


def _stamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _point_proto(point: blob_points.BlobPoint) -> rpb.RecoveryPoint:
    extra = point.extra
    captured = Timestamp()
    captured.FromDatetime(point.captured_at)
    try:
        seq = int(extra.get(META_SEQ, "0"))
    except ValueError:
        seq = 0
    return rpb.RecoveryPoint(
        tag_id=urllib.parse.unquote(point.tag_id),
        kind=KIND_VALUES.get(point.kind, rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT),
        seq=seq,
        captured_at=captured,
        group_id=urllib.parse.unquote(extra.get(META_GROUP, "")),
        note=urllib.parse.unquote(extra.get(META_NOTE, "")),
        on_demand=extra.get(META_ON_DEMAND) == "1",
    )
