"""The source agent's part in replication pairs: capture, initial sync or scan, tags, shipping.

`SourceReplication` is the agent runtime's `PairParticipant`. For every pair
assigned to this machine it runs a `PairReplicator`:

- nbd mode: the pair's journal is attached to the disk's `DiskCapture`, so every
  write through the NBD export is journaled (capture.py); a new pair starts
  with the initial sync (sync.py), or, when its assignment says SYNC_KIND_DELTA
  (the target already holds an older copy), with the delta sync (delta.py), which
  asks the process server for the target's block hashes and sends only the
  blocks that differ; the kind is kept in the pair's state;
- scan mode: periodic hash passes (scan.py); the first pass is the initial sync;
- a *shipper* thread streams the frames to the process server (shipper.py);
- a *catch-up* thread (nbd mode) journals the blocks marked while the pair's
  journal was past its limit, once the process server catches up (catchup.py);
- a *saver* thread saves the pair's state after acknowledgements (see
  `PairReplicator._save_loop`), so the shipper never waits on an fsync;
- a *tagger* thread inserts recovery points: crash-consistent every
  `policy.crash_consistent_interval_seconds`, app-consistent every
  `policy.app_consistent_interval_seconds` (freeze script, tag, thaw script;
  a failing or slow freeze degrades the point to crash-consistent with a note;
  none is taken when no freeze script is configured), and the tags the
  controller asks for (`TagRequest`, inserted once each with on_demand set).
  A multi-VM-consistent request is a barrier: at its `cut_at` the disk's writes
  are held and `hold_barrier(tag_id)` is asked until it answers COMMIT (insert
  the tag, let writes go) or ABORT (let writes go), at most `BARRIER_WAIT`.
  Tags wait until the initial sync is done and no changed block waits for its
  catch-up (`consistent`); none are taken while paused.

NBD exports: every configured disk is served from the agent's start (see
daemon.py), assigned or not. While a disk has no nbd-mode pair its writes go
straight to the file and are not journaled; the initial sync of a pair created
later reads them from the disk. At start `recover()` re-attaches the journals of
the pairs found under `<state_dir>/pairs/` (replaying what they hold, see
capture.py) before the export serves anything, so no write escapes a journal
across a restart. A pair the controller no longer lists is forgotten: its
journal and state are removed (its seq lease is kept).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.common import errors, frames
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

from .capture import DiskCapture, PairJournal
from .catchup import CatchUp
from .delta import DEFAULT_BATCH_BLOCKS, DeltaSync
from .hooks import run_hook
from .pairstate import SYNC_COPYING, SYNC_DELTA, SYNC_DONE, SYNC_FULL, PairState, TagSpec, forget_pair
from .scan import ScanSource
from .shipper import Shipper
from .sync import InitialSync

log = get_logger(__name__)

PAIRS_DIR = "pairs"
BARRIER_WAIT = 30.0
BARRIER_POLL = 0.2
MODE_NAMES = {rpb.REPLICATION_MODE_NBD: "nbd", rpb.REPLICATION_MODE_SCAN: "scan"}
SYNC_CAUSE_UNCLEAN_SHUTDOWN = "resync-unclean-shutdown"
JOURNAL_FULL = "journal-full"
SYNC_KIND_NAMES = {rpb.SYNC_KIND_DELTA: SYNC_DELTA}  # anything else (UNSPECIFIED, FULL): full
DEFAULT_CRASH_INTERVAL = 300
DEFAULT_SCAN_INTERVAL = 300
# BlockHashes: the process server asks the master target, which may read 1 GiB for one call.
HASHES_TIMEOUT = 180.0
# The saver saves the state when half the send window waits on a save, or this long after an
# acknowledgement that moved it (each save: a JSON file, two fsyncs; see _save_loop).
SAVE_INTERVAL = 0.5


@dataclass(frozen=True)
class ReplicationOptions:
    """What a pair needs from the agent's settings."""

    window_bytes: int = 64 * 1024 * 1024
    freeze_script: Path | None = None
    thaw_script: Path | None = None
    hook_timeout_seconds: float = 60.0
    # Delta sync: blocks per BlockHashes call (64 KiB each).
    delta_batch_blocks: int = DEFAULT_BATCH_BLOCKS
    # A pair's journal limit (0: none) and the share of the state volume kept free (capture.py).
    journal_limit_bytes: int = 0
    journal_reserve_fraction: float = 0.0


Connect = Callable[[str, str], grpc.Channel]
HoldBarrier = Callable[[str], tuple[int, str]]


class PairReplicator:
    """One pair on the source. `open()` it (attaches the journal), then `update()` it with assignments."""

    def __init__(
        self,
        directory: Path,
        disk: DiskCapture,
        state: PairState,
        *,
        options: ReplicationOptions,
        connect: Connect,
        hold_barrier: HoldBarrier | None = None,
        notify: Callable[[], None] = lambda: None,
        is_new: bool = False,
    ) -> None:
        self.directory = directory
        self.disk = disk
        self.state = state
        self.pair_id = state.pair_id
        self.options = options
        self._connect = connect
        self._hold_barrier = hold_barrier
        self._notify = notify
        self._state_lock = threading.Lock()
        self.stop = threading.Event()
        self.assignment: rpb.PairAssignment | None = None
        self.error: tuple[str, str] | None = None
        self.journal = PairJournal(
            directory, state.pair_id, limit_bytes=options.journal_limit_bytes,
            reserve_fraction=options.journal_reserve_fraction,
        )
        self.scan: ScanSource | None = None
        self.sync: InitialSync | None = None
        self.catchup: CatchUp | None = None
        if state.mode == "nbd":
            if disk.journal is not None:
                raise errors.Conflict(
                    f"disk {disk.name} is already replicated by pair {disk.journal.pair_id}",
                    hint="disable the other pair first",
                    code="disk-busy",
                )
            disk.attach(self.journal)
            resync = self.journal.resync_needed and not is_new
            if resync:
                # The machine stopped (power loss, kernel crash) while journaled writes were only
                # written back, not synced: the journal may miss writes the disk file has, or the
                # reverse. Compare the disk with the target and send what differs.
                log.warning(
                    "the machine restarted without a clean shutdown while writes were not yet durable; "
                    "resynchronising the pair (only blocks that differ from the target travel)",
                    pair=self.pair_id, disk=disk.name, phase=state.sync_phase, cursor=state.sync_cursor,
                )
                state.sync_kind = SYNC_DELTA
            if state.sync_kind == SYNC_DELTA:
                self.sync = DeltaSync(
                    disk, self.journal, state, save=self.save, fetch=self._block_hashes,
                    wake=lambda: self.shipper.wake(), stop=self.stop, batch_blocks=options.delta_batch_blocks,
                )
            else:
                self.sync = InitialSync(disk, self.journal, state, save=self.save)
            if is_new or resync:
                # Saves the state: from now on a restart resumes this sync.
                self.sync.start(cause=SYNC_CAUSE_UNCLEAN_SHUTDOWN if resync else "")
            self.journal.resync_recorded()
            self.source = self.sync
            self.catchup = CatchUp(
                disk, self.journal, state, save=self.save, sync_brackets=lambda: self.sync.brackets, stop=self.stop
            )
        else:
            if is_new:
                self._journal_started()
            self.journal.resync_recorded()  # scan passes compare the whole disk anyway
            self.scan = ScanSource(
                disk, self.journal, state, directory, interval=DEFAULT_SCAN_INTERVAL, stop=self.stop,
                on_tag_acked=self._scan_tag_acked,
            )
            self.source = self.scan
        self.shipper = Shipper(
            pair_id=self.pair_id,
            disk_size=disk.size,
            journal=self.journal,
            connect=self._channel,
            window_bytes=options.window_bytes,
            stop=threading.Event(),
            source=self.source,
            on_acked=self._on_acked,
            on_lost=self._on_lost,
        )
        # The saver: acknowledged through `_ack_seq`, that progress saved through `_saved_seq`.
        self._save_cond = threading.Condition()
        self._ack_seq = 0
        self._saved_seq = 0
        self._saver_stop = False
        self._save_urgent = False
        self._saved_done = state.sync_phase == SYNC_DONE
        self._save_thread: threading.Thread | None = None
        self._ship_thread: threading.Thread | None = None
        self._catchup_thread: threading.Thread | None = None
        self._tag_thread: threading.Thread | None = None
        self._tag_wake = threading.Event()
        self._req_lock = threading.Lock()
        self._requests: dict[str, rpb.TagRequest] = {}
        self._seen_requests: set[str] = set(state.tags_done)
        self.tags_inserted = 0

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls, directory: Path, disk: DiskCapture, assignment: rpb.PairAssignment | None = None, **kwargs
    ) -> PairReplicator:
        """Open a known pair from `directory`, or create it from `assignment`."""
        state = PairState.load(directory)
        is_new = state is None
        if state is None:
            if assignment is None:
                raise errors.NotFound(f"no pair state in {directory}", code="pair-state-missing")
            mode = MODE_NAMES.get(assignment.mode)
            if mode is None:
                raise errors.InvalidInput(f"pair {assignment.pair_id} has no replication mode", code="pair-mode")
            directory.mkdir(parents=True, exist_ok=True)
            # A delta sync needs the NBD journal (its argument rests on every write being a frame).
            kind = SYNC_KIND_NAMES.get(assignment.sync_kind, SYNC_FULL) if mode == "nbd" else SYNC_FULL
            state = PairState(
                pair_id=assignment.pair_id, disk_name=disk.name, disk_size=disk.size, mode=mode, sync_kind=kind
            )
            state.save(directory)
        return cls(directory, disk, state, is_new=is_new, **kwargs)

    def save(self) -> None:
        with self._state_lock:
            self.state.save(self.directory)

    def _journal_started(self) -> None:
        with self.disk.quiesced():
            seq = self.journal.lease.take()
            self.journal.append([frames.sync_frame(self.pair_id, seq, rpb.SYNC_PHASE_INITIAL_STARTED, self.disk.size)])
        self.state.sync_phase = SYNC_COPYING
        self.save()

    # -- following the controller -----------------------------------------------------------
    def update(self, assignment: rpb.PairAssignment) -> None:
        previous = self.assignment
        self.assignment = assignment
        if assignment.disk_size_bytes and assignment.disk_size_bytes != self.disk.size:
            self.error = (
                f"disk {self.disk.name} is {self.disk.size} bytes but the pair was made for "
                f"{assignment.disk_size_bytes}; replication is stopped",
                "disk-size-changed",
            )
        elif self.journal.failed:
            self.error = (self.journal.failed, "disk-write-failed")
        else:
            self.error = None
        if self.scan is not None:
            self.scan.set_interval(float(assignment.scan_interval_seconds or DEFAULT_SCAN_INTERVAL))
        paused = assignment.desired_state == rpb.PAIR_DESIRED_STATE_PAUSED
        if paused or self.error is not None:
            self._stop_shipping()
        else:
            moved = previous is not None and (
                previous.process_server_endpoint != assignment.process_server_endpoint
                or previous.process_server_id != assignment.process_server_id
            )
            self._start_shipping()
            if moved:
                log.info("process server changed; reconnecting", pair=self.pair_id,
                         endpoint=assignment.process_server_endpoint)
                self.shipper.interrupt()
        if self._tag_thread is None:
            self._tag_thread = threading.Thread(target=self._tag_loop, name=f"tags-{self.pair_id}", daemon=True)
            self._tag_thread.start()
        self._tag_wake.set()

    def _channel(self) -> grpc.Channel:
        assignment = self.assignment
        if assignment is None or not assignment.process_server_endpoint:
            raise errors.Unavailable(
                f"pair {self.pair_id}: the process server has no data endpoint yet",
                hint="the process server reports it when it registers",
                code="ps-endpoint-missing",
            )
        return self._connect(assignment.process_server_endpoint, assignment.process_server_id)

    def _block_hashes(self, offset: int, count: int, applied_through_seq: int = 0) -> rpb.BlockHashesReply:
        """The target's digests of `count` blocks from `offset`, through the process server (delta sync),
        taken once the target has applied the pair's frames through `applied_through_seq`."""
        channel = self._channel()
        try:
            return dataplane_pb2_grpc.ProcessServerStub(channel).BlockHashes(
                rpb.BlockHashesRequest(
                    pair_id=self.pair_id, offset=offset, block_count=count, applied_through_seq=applied_through_seq
                ),
                timeout=HASHES_TIMEOUT,
            )
        except grpc.RpcError as exc:
            endpoint = self.assignment.process_server_endpoint if self.assignment is not None else ""
            raise errors.from_rpc_error(exc, target=endpoint) from exc
        finally:
            channel.close()

    def _start_shipping(self) -> None:
        if self._save_thread is None:
            self._save_thread = threading.Thread(target=self._save_loop, name=f"save-{self.pair_id}", daemon=True)
            self._save_thread.start()
        if self.catchup is not None and self._catchup_thread is None:
            self._catchup_thread = threading.Thread(
                target=self.catchup.run, name=f"catchup-{self.pair_id}", daemon=True
            )
            self._catchup_thread.start()
        if self._ship_thread is not None and self._ship_thread.is_alive():
            return
        self.shipper.stop = threading.Event()
        self._ship_thread = threading.Thread(target=self.shipper.run, name=f"ship-{self.pair_id}", daemon=True)
        self._ship_thread.start()

    def _stop_shipping(self, timeout: float = 10.0) -> None:
        thread = self._ship_thread
        if thread is None:
            return
        self.shipper.stop.set()
        self.shipper.interrupt()
        thread.join(timeout)
        self._ship_thread = None

    @property
    def paused(self) -> bool:
        return self.assignment is not None and self.assignment.desired_state == rpb.PAIR_DESIRED_STATE_PAUSED

    def close(self) -> None:
        """Stop the threads; the journal stays attached until `detach()`."""
        self.stop.set()
        self._tag_wake.set()
        self.journal.room.set()
        self._stop_shipping()
        if self._tag_thread is not None:
            self._tag_thread.join(10)
        if self._catchup_thread is not None:
            self._catchup_thread.join(10)
        self._stop_saver()

    def detach(self) -> None:
        if isinstance(self.sync, DeltaSync):
            self.sync.close()
        if self.disk.journal is self.journal:
            try:  # while the disk is attached: releasing fsyncs it first
                self.journal.release_due(now=True)
            except OSError as exc:  # the frames stay journaled; the next start replays them
                log.warning("releasing acknowledged frames failed", pair=self.pair_id, error=str(exc))
            self.disk.detach()
        if self.scan is not None:
            self.scan.close()
        self.journal.close()

    def forget(self) -> None:
        self.close()
        self.detach()
        forget_pair(self.directory)
        log.info("pair forgotten", pair=self.pair_id, disk=self.disk.name)

    # -- acknowledgements --------------------------------------------------------------------
    def _on_acked(self, seq: int, unsaved_bytes: int) -> None:
        """The shipper ran the callbacks of every frame <= seq (`unsaved_bytes` of them wait in
        its window for a save): the saver saves what they moved."""
        source = self.source
        if not unsaved_bytes and not source.state_dirty:
            return  # journaled frames only: nothing to save, nothing held in the window
        with self._save_cond:
            self._ack_seq = max(self._ack_seq, seq)
            if unsaved_bytes >= self.options.window_bytes // 2 or source.done:
                self._save_urgent = True
            self._save_cond.notify()

    def _save_loop(self) -> None:
        """Save the state moved by acknowledgements, off the shipper, one save for many Acks.

        When: once half the send window is acknowledged but not saved (so the save
        ends before the window fills with frames waiting on it), when the sync is
        done (the controller hears of it at once), or SAVE_INTERVAL after an
        acknowledgement that moved the state. A save per Ack (every 1-8 MiB at the
        process server's group commit) cost the shipper a fifth of its time, and
        each save's fsyncs compete with the spool's and the target's on the disk.

        What `state.json` protects after a kill -9 or a power cut is the sync's
        position (cursor, phase) and the scan's; the acknowledged frames themselves
        are the process server's (its spool is fsynced before it acknowledges), and
        journaled frames are released by the journal on its own. A saved state
        that lags the acknowledgements only makes the restarted source send again,
        with new seqs, chunks the process server already holds: they carry the disk
        as it is now (made inside `quiesced()`, after every journaled write with a
        lower seq), so applying them again loses nothing and needs no full resync.
        What must never happen is a state *ahead* of what the process server holds,
        and that cannot: the in-memory state only moves on acknowledgements (or,
        for start() and tags, is saved synchronously through `save()`, which takes
        the same lock, so an older snapshot is never written over a newer one).
        The lag is bounded: the shipper keeps each acknowledged volatile frame in
        its window until `progress_saved` covers it, so a restart resends at most
        a window, as before. A failed save (disk full, I/O error) is retried; the
        window then stays full and shipping waits, never skipping a save.
        """
        while True:
            with self._save_cond:
                while self._ack_seq <= self._saved_seq and not self._saver_stop:
                    self._save_cond.wait()
                if self._ack_seq <= self._saved_seq:
                    return  # stopping, nothing left to save
                # More acknowledgements gather until half the window waits on this save (or the
                # sync is done, or SAVE_INTERVAL passed): one save for many Acks.
                self._save_cond.wait_for(lambda: self._save_urgent or self._saver_stop, SAVE_INTERVAL)
                self._save_urgent = False
                seq = self._ack_seq
            # Saved even when `state_dirty` is clear: whoever cleared it (DeltaSync._save_if_due
            # on the shipper's thread) may not have written yet, and progress_saved(seq) must
            # follow a save whose snapshot was taken after the callbacks of every frame <= seq.
            source = self.source
            source.state_dirty = False  # before the snapshot: a later change sets it again
            try:
                self.save()
            except OSError as exc:
                source.state_dirty = True
                log.error("saving the pair's state failed; retrying", pair=self.pair_id, error=str(exc))
                with self._save_cond:
                    if self._save_cond.wait_for(lambda: self._saver_stop, 1.0):
                        return  # stopping: the state stays behind, which is safe
                continue
            if source.done != self._saved_done:
                self._saved_done = source.done
                if source.done:
                    self._notify()  # the controller hears of the finished sync at once
            with self._save_cond:
                self._saved_seq = max(self._saved_seq, seq)
            self.shipper.progress_saved(seq)

    def _stop_saver(self) -> None:
        """Save what is acknowledged and end the saver (after the shipper stopped)."""
        thread = self._save_thread
        if thread is None:
            return
        with self._save_cond:
            self._saver_stop = True
            self._save_cond.notify()
        thread.join(10)
        self._save_thread = None

    def _on_lost(self, _durable: int) -> None:
        if self.sync is not None:
            self.sync.start()
        elif self.scan is not None:
            self.scan.reset()
            self._journal_started()

    def _scan_tag_acked(self, tag: TagSpec) -> None:
        if tag.on_demand:
            with self._state_lock:
                self.state.remember_tag(tag.tag_id)
            self.save()
        self.tags_inserted += 1

    # -- tags ---------------------------------------------------------------------------------
    def request_tag(self, request: rpb.TagRequest) -> None:
        with self._req_lock:
            if request.tag_id in self._seen_requests:
                return
            self._seen_requests.add(request.tag_id)
            self._requests[request.tag_id] = request
        self._tag_wake.set()

    def _policy(self) -> tuple[float, float]:
        policy = self.assignment.policy if self.assignment is not None else rpb.RecoveryPolicy()
        crash = policy.crash_consistent_interval_seconds or DEFAULT_CRASH_INTERVAL
        return float(crash), float(policy.app_consistent_interval_seconds)

    def _tag_loop(self) -> None:
        crash, app = self._policy()
        next_crash = time.monotonic() + crash
        next_app = time.monotonic() + app if app else None
        while not self.stop.is_set():
            self._tag_wake.clear()
            crash, app = self._policy()
            now = time.monotonic()
            next_crash = min(next_crash, now + crash)  # the policy may have been shortened
            if next_app is not None and app:
                next_app = min(next_app, now + app)
            ready = not self.paused and self.error is None and self.consistent
            if ready:
                try:
                    self._take_requested()
                    now = time.monotonic()
                    if self.scan is None and now >= next_crash:
                        self.insert_tag(TagSpec(uuid.uuid4().hex, rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT))
                        next_crash = now + crash
                    periodic_app = app and self.options.freeze_script is not None and self.scan is None
                    if periodic_app and (next_app is None or now >= next_app):
                        if next_app is not None:
                            self.app_consistent_tag(TagSpec(uuid.uuid4().hex, rpb.RECOVERY_POINT_KIND_APP_CONSISTENT))
                        next_app = time.monotonic() + app
                except errors.SiteRecoveryError as exc:
                    log.error("taking a recovery point failed", pair=self.pair_id, error=exc.message)
                except Exception as exc:  # keep the thread: the next point may work
                    log.exception("taking a recovery point failed", pair=self.pair_id, error=str(exc))
            wait = 1.0
            if ready and self.scan is None:
                wait = max(0.05, min(wait, next_crash - time.monotonic()))
            self._tag_wake.wait(wait)

    def _take_requested(self) -> None:
        while not self.stop.is_set():
            with self._req_lock:
                if not self._requests:
                    return
                tag_id, request = next(iter(self._requests.items()))
            spec = TagSpec(tag_id, request.kind, group_id=request.group_id, on_demand=True)
            if request.kind == rpb.RECOVERY_POINT_KIND_APP_CONSISTENT:
                self.app_consistent_tag(spec)
            elif request.kind == rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT and request.HasField("cut_at"):
                self._barrier_tag(spec, request.cut_at)
            else:
                self.insert_tag(spec)
            with self._req_lock:
                self._requests.pop(tag_id, None)

    @property
    def consistent(self) -> bool:
        """Whether the stream, cut now, is a point: the sync is done and no changed block waits."""
        return self.source.done and not (self.catchup is not None and self.catchup.pending)

    def insert_tag(self, tag: TagSpec) -> None:
        """Put `tag` into the stream now, at a write boundary."""
        if self.scan is not None:
            self.scan.request(tag)
            self.shipper.wake()
            return
        with self.disk.quiesced():
            if self.catchup is not None and self.catchup.pending:
                raise errors.Unavailable(
                    f"pair {self.pair_id} is catching up blocks written while its journal was full; "
                    "no recovery point until they are sent",
                    hint="wait for the pair to report replicating again",
                    code=JOURNAL_FULL,
                )
            seq = self.journal.lease.take()
            self.journal.append([
                frames.tag_frame(
                    self.pair_id, seq, tag.tag_id, tag.kind, group_id=tag.group_id, note=tag.note,
                    on_demand=tag.on_demand,
                )
            ])
        self.tags_inserted += 1
        if tag.on_demand:
            with self._state_lock:
                self.state.remember_tag(tag.tag_id)
            self.save()
        log.info("recovery point inserted", pair=self.pair_id, tag=tag.tag_id, kind=rpb.RecoveryPointKind.Name(tag.kind),
                 seq=seq, note=tag.note or None)

    def app_consistent_tag(self, tag: TagSpec) -> None:
        """Freeze, tag, thaw; a failing freeze degrades the point to crash-consistent."""
        crash = rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT
        freeze = self.options.freeze_script
        if self.scan is not None:
            self.insert_tag(_degraded(tag, crash, "scan mode takes no app-consistent points: taken as crash-consistent"))
            return
        if freeze is None:
            self.insert_tag(_degraded(tag, crash, "no freeze script is configured: taken as crash-consistent"))
            return
        env = {"SR_PAIR_ID": self.pair_id, "SR_DISK": self.disk.name, "SR_TAG_ID": tag.tag_id}
        timeout = self.options.hook_timeout_seconds
        frozen = run_hook(freeze, timeout=timeout, env={**env, "SR_HOOK": "freeze"})
        try:
            if frozen.ok:
                self.insert_tag(tag)
            else:
                note = f"freeze script failed ({frozen.describe()}): degraded to crash-consistent"
                log.warning("freeze script failed", pair=self.pair_id, tag=tag.tag_id, result=frozen.describe(),
                            output=frozen.output[-500:] or None)
                self.insert_tag(_degraded(tag, crash, note))
        finally:
            # Thawing after a failed freeze too: the script may have frozen part of the application.
            if self.options.thaw_script is not None:
                thawed = run_hook(self.options.thaw_script, timeout=timeout, env={**env, "SR_HOOK": "thaw"})
                if not thawed.ok:
                    log.warning("thaw script failed", pair=self.pair_id, tag=tag.tag_id, result=thawed.describe(),
                                output=thawed.output[-500:] or None)

    def _barrier_tag(self, tag: TagSpec, cut_at: Timestamp) -> None:
        if self._hold_barrier is None or self.scan is not None:
            self.insert_tag(tag)
            return
        delay = cut_at.ToNanoseconds() / 1e9 - time.time()
        if delay > 0 and self.stop.wait(delay):
            return
        self.disk.hold()
        try:
            deadline = time.monotonic() + BARRIER_WAIT
            while not self.stop.is_set():
                try:
                    outcome, reason = self._hold_barrier(tag.tag_id)
                except errors.SiteRecoveryError as exc:
                    outcome, reason = rpb.BARRIER_OUTCOME_WAIT, exc.message
                if outcome == rpb.BARRIER_OUTCOME_COMMIT:
                    self.insert_tag(tag)
                    return
                if outcome == rpb.BARRIER_OUTCOME_ABORT or time.monotonic() > deadline:
                    log.warning("multi-VM point abandoned", pair=self.pair_id, tag=tag.tag_id,
                                reason=reason or "no answer in time")
                    return
                self.stop.wait(BARRIER_POLL)
        finally:
            self.disk.release()

    # -- status ---------------------------------------------------------------------------------
    def _tracking(self, sent_when: str) -> str:
        """What a tracking pair's status says: why, how much is marked, and when it travels."""
        marked = self.journal.dirty.dirty_bytes // 2**20 if self.journal.dirty is not None else 0
        return (f"the source journal is full ({self.journal.full_reason}), so writes are tracked as changed "
                f"blocks ({marked} MiB marked) and sent {sent_when}")

    def status(self) -> rpb.PairStatus:
        status = rpb.PairStatus(pair_id=self.pair_id)
        if self.journal.failed and self.error is None:
            self.error = (self.journal.failed, "disk-write-failed")
        if self.error is not None:
            status.state = rpb.PAIR_STATE_ERROR
            status.reason, status.reason_code = self.error
        elif self.paused:
            status.state = rpb.PAIR_STATE_PAUSED
            status.reason = "paused by the controller; " + (
                self._tracking("once the pair resumes") if self.journal.tracking else "writes are still journaled"
            )
        elif not self.consistent:
            status.state = rpb.PAIR_STATE_INITIAL_SYNC
        else:
            status.state = rpb.PAIR_STATE_REPLICATING
        if status.state == rpb.PAIR_STATE_INITIAL_SYNC and self.journal.tracking:
            # Ahead of an unreachable process server (named in it): no recovery point is taken meanwhile.
            unreachable = f"; cannot stream to the process server: {self.shipper.last_error}" if (
                self.shipper.last_error) else ""
            if self.catchup is not None and self.catchup.error:
                unreachable += f"; sending them failed (retrying): {self.catchup.error}"
            status.MergeFrom(rpb.PairStatus(
                reason=self._tracking("once the process server catches up; no recovery point is taken until then")
                + unreachable,
                reason_code=JOURNAL_FULL,
            ))
        elif status.state in (rpb.PAIR_STATE_INITIAL_SYNC, rpb.PAIR_STATE_REPLICATING) and self.shipper.last_error:
            status.reason = f"cannot stream to the process server: {self.shipper.last_error}"
            status.reason_code = "process-server-unreachable"
        elif status.state == rpb.PAIR_STATE_INITIAL_SYNC and isinstance(self.sync, DeltaSync) and self.sync.fetch_error:
            message, code = self.sync.fetch_error
            status.reason = f"cannot read the target disk's block hashes (delta sync; retrying): {message}"
            status.reason_code = code
        elif status.state == rpb.PAIR_STATE_INITIAL_SYNC and self.state.sync_cause == SYNC_CAUSE_UNCLEAN_SHUTDOWN:
            status.MergeFrom(rpb.PairStatus(
                reason="resynchronising: the source machine stopped without a clean shutdown (power loss or "
                "kernel crash) while writes were not yet durable; only blocks that differ from the target are sent",
                reason_code=SYNC_CAUSE_UNCLEAN_SHUTDOWN,
            ))
        dirty = self.journal.dirty
        if self.sync is not None and self.sync.done and dirty is not None and dirty.count:
            status.sync_total_bytes = self.disk.size  # catching up: the share of the disk not marked
            status.sync_done_bytes = max(0, self.disk.size - dirty.dirty_bytes)
            status.sync_sent_bytes = self.state.sync_sent_bytes
        elif self.sync is not None:
            self.sync.fill_status(status)
        else:
            status.sync_done_bytes = self.source.done_bytes
            status.sync_total_bytes = self.disk.size
        log_ = self.journal.log
        status.last_seq = max(log_.last_seq, self.shipper.last_sent, self.shipper.acked_seq)
        status.acked_seq = self.shipper.acked_seq
        # Pending is what the process server has not acknowledged: the journal releases
        # acknowledged frames only about once a second (PairJournal.acknowledge).
        acked = max(self.shipper.acked_seq, log_.released_seq)
        status.backlog_frames = log_.pending_frames_after(acked)
        status.backlog_bytes = log_.pending_bytes_after(acked)
        oldest = log_.oldest_captured_at_after(acked)
        if dirty is not None and dirty.count:
            # Marked blocks are writes the target does not have, the first from `since_ns` on.
            status.backlog_bytes += dirty.dirty_bytes
            marked = Timestamp()
            marked.FromNanoseconds(dirty.since_ns)
            if oldest is None or marked.ToNanoseconds() < oldest.ToNanoseconds():
                oldest = marked
        if oldest is not None:
            status.oldest_pending_captured_at.CopyFrom(oldest)
        status.bytes_sent = self.shipper.bytes_sent
        status.throughput_bytes_per_second = self.shipper.throughput()
        return status


def _degraded(tag: TagSpec, kind: int, note: str) -> TagSpec:
    return TagSpec(tag.tag_id, kind, group_id=tag.group_id, note=note, on_demand=tag.on_demand)


class SourceReplication:
    """The source agent's `PairParticipant` (agents/runtime.py). See the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        disks: Mapping[str, DiskCapture],
        *,
        connect: Connect,
        options: ReplicationOptions = ReplicationOptions(),
        hold_barrier: HoldBarrier | None = None,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = Path(state_dir) / PAIRS_DIR
        self.disks = dict(disks)
        self._kwargs = {"options": options, "connect": connect, "hold_barrier": hold_barrier, "notify": notify}
        self._lock = threading.Lock()
        self._pairs: dict[str, PairReplicator] = {}
        self._failed: dict[str, tuple[str, str]] = {}
        self._closed = False

    def recover(self) -> None:
        """Re-attach the journals of known pairs (replaying them); call before serving NBD."""
        if not self.root.exists():
            return
        for directory in sorted(self.root.iterdir()):
            state = PairState.load(directory) if directory.is_dir() else None
            if state is None:
                continue
            disk = self.disks.get(state.disk_name)
            if disk is None:
                log.error("a replicated disk is no longer configured", pair=state.pair_id, disk=state.disk_name)
                self._failed[state.pair_id] = (
                    f"disk {state.disk_name} is not configured on this agent any more",
                    "disk-missing",
                )
                continue
            try:
                self._pairs[state.pair_id] = PairReplicator(directory, disk, state, **self._kwargs)
            except errors.SiteRecoveryError as exc:
                log.error("cannot recover pair", pair=state.pair_id, error=exc.message)
                self._failed[state.pair_id] = (exc.message, exc.code)
                continue
            log.info("pair recovered", pair=state.pair_id, disk=state.disk_name, mode=state.mode,
                     sync=state.sync_phase)

    def pair(self, pair_id: str) -> PairReplicator | None:
        with self._lock:
            return self._pairs.get(pair_id)

    def apply_assignments(
        self, pairs: Sequence[rpb.PairAssignment], tag_requests: Sequence[rpb.TagRequest]
    ) -> None:
        with self._lock:
            if self._closed:
                return
            wanted = {a.pair_id: a for a in pairs}
            for pair_id in [p for p in self._pairs if p not in wanted]:
                self._pairs.pop(pair_id).forget()
            for pair_id in [p for p in self._failed if p not in wanted]:
                self._failed.pop(pair_id)
            for pair_id, assignment in wanted.items():
                replicator = self._pairs.get(pair_id)
                if replicator is None:
                    replicator = self._create(assignment)
                    if replicator is None:
                        continue
                self._failed.pop(pair_id, None)
                replicator.update(assignment)
            for request in tag_requests:
                replicator = self._pairs.get(request.pair_id)
                if replicator is not None:
                    replicator.request_tag(request)

    def _create(self, assignment: rpb.PairAssignment) -> PairReplicator | None:
        disk = self.disks.get(assignment.disk_name)
        try:
            if disk is None:
                raise errors.NotFound(
                    f"disk {assignment.disk_name!r} is not configured on this agent",
                    hint="add it to the source agent's disks, or disable replication of it",
                    code="disk-missing",
                )
            replicator = PairReplicator.open(self.root / assignment.pair_id, disk, assignment, **self._kwargs)
        except errors.SiteRecoveryError as exc:
            if self._failed.get(assignment.pair_id, ("",))[0] != exc.message:
                log.error("cannot replicate pair", pair=assignment.pair_id, error=exc.message)
            self._failed[assignment.pair_id] = (exc.message, exc.code)
            return None
        self._pairs[assignment.pair_id] = replicator
        log.info("pair started", pair=assignment.pair_id, disk=disk.name, mode=replicator.state.mode)
        return replicator

    def pair_statuses(self) -> list[rpb.PairStatus]:
        with self._lock:
            statuses = [r.status() for r in self._pairs.values()]
            for pair_id, (reason, code) in self._failed.items():
                statuses.append(
                    rpb.PairStatus(pair_id=pair_id, state=rpb.PAIR_STATE_ERROR, reason=reason, reason_code=code)
                )
        return statuses

    def end_streams(self) -> None:
        """A source agent serves no data-plane streams (its NBD export stops with it)."""

    def close(self) -> None:
        """Stop every pair's threads and detach the journals (call after the NBD server stopped)."""
        with self._lock:
            self._closed = True
            replicators = list(self._pairs.values())
        for replicator in replicators:
            replicator.close()
        for replicator in replicators:
            replicator.detach()
