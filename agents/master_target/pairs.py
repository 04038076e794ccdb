"""The master target's pairs: assignments in, statuses out, streams and materialisations checked.

`MasterTargetPairs` is the master target's `PairParticipant` (agents/runtime.py).
Every heartbeat hands it the controller's complete list of assignments; it
keeps those whose master target is this agent, opens each pair's target disk
and journal (target.py; recovery runs there), and closes pairs that are no
longer assigned (their files stay). It answers for the Apply stream
(`open_stream`: which pair, from whom), for Materialize, for OpenView and
CloseView (read-only NBD views of a disk at a point: pitview.py, views.py) and for BlockHashes
(hashes.py: the digests of a range of a pair's target disk, asked for by the
pair's process server only, for a delta sync, answered from the target file's
digest map where it knows them: digestmap.py; the maps live in
`<retention_dir>/.digest-maps/`, one per target path, kept when a pair is closed
so that the next pair onto the same file finds it, removed with a pair whose
target file is gone).

An apply stream is accepted only when
- the pair is currently assigned to this master target (else NOT_FOUND),
- the caller's certificate names the pair's process server (else PERMISSION_DENIED),
- the stream's disk size is the pair's (else FAILED_PRECONDITION),
- the pair is not paused by the administrator (else UNAVAILABLE, `pair-paused`),
- `target_path` lies in a datastore directory and `journal_dir` in the
  retention directory (paths.py; else INVALID_ARGUMENT, nothing created).
A newer stream for a pair replaces an older one (a reconnecting process server
must not wait for the old connection to time out).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from siterecovery.agents.master_target import digestmap, hashes, paths
from siterecovery.agents.master_target import materialize as materializing
from siterecovery.agents.master_target.target import DEFAULT_OPTIONS, PairTarget, TargetOptions
from siterecovery.agents.master_target.views import ViewExports
from siterecovery.common import blockhash, errors, pki
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import replication_pb2 as rpb

log = get_logger(__name__)

# How long a new pair waits for an older pair's close of the same target file.
CLOSE_WAIT_SECONDS = 30.0
# BlockHashes waits at most this long for the target to apply the stream through the asked seq
# (a module attribute: tests shorten or lengthen it).
APPLIED_WAIT_SECONDS = blockhash.APPLIED_WAIT_SECONDS


class _Owner:
    """One apply stream's claim on a pair."""

    def __init__(self, cancel: Callable[[], object] | None) -> None:
        self._cancel = cancel

    def cancel(self) -> None:
        if self._cancel is not None:
            try:
                self._cancel()
            except Exception:  # the stream may be gone already
                pass


class _Entry:
    def __init__(self, assignment: rpb.PairAssignment) -> None:
        self.assignment = assignment
        self.target: PairTarget | None = None
        self.open_error: errors.SiteRecoveryError | None = None
        self.lock = threading.Lock()

    def where(self) -> tuple[str, str, int]:
        a = self.assignment
        return a.target_path, a.journal_dir, a.disk_size_bytes


class MasterTargetPairs:
    """Replication pairs whose target disks this master target writes."""

    def __init__(
        self,
        *,
        datastore_dirs: Sequence[Path],
        retention_dir: Path,
        agent_id: Callable[[], str],
        options: TargetOptions = DEFAULT_OPTIONS,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
        views: ViewExports | None = None,
    ) -> None:
        self.views = views or ViewExports()
        self.datastore_dirs = tuple(Path(d) for d in datastore_dirs)
        self.retention_dir = Path(retention_dir)
        self._agent_id = agent_id
        self.options = options
        self.clock = clock
        self.on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        # Digest maps of the target files, by resolved target path (digestmap.py).
        self.digest_dir = self.retention_dir / digestmap.DIR_NAME
        # Targets being closed, by resolved path: a new pair onto the same file waits for the
        # close, which saves the file's digest map for it.
        self._closing: dict[str, threading.Thread] = {}

    # -- PairParticipant -----------------------------------------------------------
    def apply_assignments(
        self, pairs: Sequence[rpb.PairAssignment], tag_requests: Sequence[rpb.TagRequest] = ()
    ) -> None:
        me = self._agent_id()
        wanted = {p.pair_id: p for p in pairs if p.master_target_id == me}
        fresh: list[_Entry] = []
        gone: list[_Entry] = []
        with self._lock:
            for pair_id, entry in list(self._entries.items()):
                assignment = wanted.get(pair_id)
                if assignment is None or _Entry(assignment).where() != entry.where():
                    gone.append(self._entries.pop(pair_id))
            for pair_id, assignment in wanted.items():
                entry = self._entries.get(pair_id)
                if entry is None:
                    entry = self._entries[pair_id] = _Entry(assignment)
                    fresh.append(entry)
                entry.assignment = assignment
            current = list(self._entries.values())
        for entry in gone:
            log.info("pair no longer assigned here; closing it", pair=entry.assignment.pair_id)
            self._stop_stream(entry)
            if entry.target is not None:
                closing = threading.Thread(target=self._close_gone, args=(entry.target,), name="pair-close",
                                           daemon=True)
                with self._lock:  # registered and started at once: a waiter never joins an unstarted thread
                    self._closing[str(entry.target.target_path)] = closing
                    closing.start()
        for entry in current:
            if entry.target is not None:
                entry.target.retention_window = _window(entry.assignment)
            if entry.assignment.desired_state == rpb.PAIR_DESIRED_STATE_PAUSED:
                self._stop_stream(entry)
        for entry in fresh:
            try:
                self._target(entry)
            except errors.SiteRecoveryError:
                pass  # reported in pair_statuses and again at the next stream open

    def pair_statuses(self) -> list[rpb.PairStatus]:
        """For the heartbeat, which also prunes each pair's journal when due."""
        return self.observed_statuses(prune=True)

    def observed_statuses(self, *, prune: bool = False) -> list[rpb.PairStatus]:
        """Every pair's status; without `prune` nothing changes on disk (a metrics scrape)."""
        with self._lock:
            entries = list(self._entries.values())
        out = []
        for entry in entries:
            target = entry.target
            if target is not None:
                if prune:
                    target.maybe_prune()
                out.append(target.status())
            elif entry.open_error is not None:
                error = entry.open_error
                out.append(rpb.PairStatus(
                    pair_id=entry.assignment.pair_id, state=rpb.PAIR_STATE_ERROR,
                    reason=str(error), reason_code=error.code,
                ))
            else:
                out.append(rpb.PairStatus(pair_id=entry.assignment.pair_id, state=rpb.PAIR_STATE_INITIAL_SYNC))
        return out

    # -- pairs ------------------------------------------------------------------------
    def _entry(self, pair_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(pair_id)
        if entry is None:
            raise errors.NotFound(
                f"pair {pair_id!r} is not assigned to this master target",
                hint="check `srctl replication status`; a new assignment arrives with the next heartbeat",
                code="pair-not-assigned",
            )
        return entry

    def _close_gone(self, target: PairTarget) -> None:
        """Close a pair no longer assigned; a target file that is gone takes its digest map along."""
        try:
            target.close()
            if not target.target_path.exists() and target.digest_map_path is not None:
                target.digest_map_path.unlink(missing_ok=True)
        finally:
            with self._lock:
                key = str(target.target_path)
                if self._closing.get(key) is threading.current_thread():
                    del self._closing[key]

    def _wait_closed(self, target_path: Path) -> None:
        """Wait (a while) for an older pair's close of the same file: it saves the digest map."""
        with self._lock:
            closing = self._closing.get(str(target_path))
        if closing is not None and closing is not threading.current_thread():
            closing.join(CLOSE_WAIT_SECONDS)

    def _target(self, entry: _Entry) -> PairTarget:
        """The entry's open PairTarget, created (paths checked, recovery run) on first use."""
        with entry.lock:
            if entry.target is not None:
                return entry.target
            a = entry.assignment
            try:
                target_path = paths.inside(a.target_path, self.datastore_dirs, what="target_path")
                journal_dir = paths.inside(a.journal_dir, (self.retention_dir,), what="journal_dir")
                self._wait_closed(target_path)
                target = PairTarget(
                    pair_id=a.pair_id, target_path=target_path, journal_dir=journal_dir,
                    disk_size=a.disk_size_bytes, options=self.options, clock=self.clock,
                    delta=a.sync_kind == rpb.SYNC_KIND_DELTA,
                    digest_map=digestmap.map_path(self.digest_dir, target_path),
                )
                target.retention_window = _window(a)
                target.on_change = self.on_change
                target.open()
            except errors.SiteRecoveryError as exc:
                entry.open_error = exc
                log.error("pair cannot be opened", pair=a.pair_id, code=exc.code, error=exc.message)
                raise
            entry.open_error = None
            entry.target = target
            return target

    def target(self, pair_id: str) -> PairTarget:
        """The open PairTarget of an assigned pair (NotFound when not assigned)."""
        return self._target(self._entry(pair_id))

    def _stop_stream(self, entry: _Entry) -> None:
        target = entry.target
        if target is not None and target.owner is not None:
            owner, target.owner = target.owner, None
            owner.cancel()

    # -- Apply -----------------------------------------------------------------------
    def open_stream(
        self, request: rpb.StreamOpen, caller: pki.Identity, *, cancel: Callable[[], object] | None = None
    ) -> tuple[PairTarget, object]:
        """Check an apply stream's open and claim the pair for it: (target, owner token)."""
        entry = self._entry(request.pair_id)
        a = entry.assignment
        if caller.id != a.process_server_id:
            raise errors.PermissionDenied(
                f"{caller.id} is not the process server of pair {a.pair_id} (that is {a.process_server_id})",
                hint="frames of a pair are accepted only from its assigned process server",
                code="wrong-process-server",
            )
        if request.disk_size_bytes != a.disk_size_bytes:
            raise errors.PreconditionFailed(
                f"the stream of pair {a.pair_id} is for a {request.disk_size_bytes}-byte disk; the pair's "
                f"disk has {a.disk_size_bytes} bytes",
                hint="the source disk changed size; re-create the pair", code="disk-size-mismatch",
            )
        if a.desired_state == rpb.PAIR_DESIRED_STATE_PAUSED:
            raise errors.Unavailable(
                f"pair {a.pair_id} is paused by an administrator", hint="resume it with srctl", code="pair-paused"
            )
        target = self._target(entry)
        target.ensure_ready()
        owner = _Owner(cancel)
        with target.lock:
            previous, target.owner = target.owner, owner
        if previous is not None:
            log.info("a newer apply stream replaces the older one", pair=a.pair_id)
            previous.cancel()
        return target, owner

    def release(self, target: PairTarget, owner: object) -> None:
        if target.owner is owner:
            target.owner = None

    # -- BlockHashes -----------------------------------------------------------------
    def block_hashes(self, request: rpb.BlockHashesRequest, caller: pki.Identity) -> rpb.BlockHashesReply:
        """Digests of a range of an assigned pair's target disk, for the pair's process server."""
        entry = self._entry(request.pair_id)
        a = entry.assignment
        if caller.id != a.process_server_id:
            raise errors.PermissionDenied(
                f"{caller.id} is not the process server of pair {a.pair_id} (that is {a.process_server_id})",
                hint="block hashes of a pair are given only to its assigned process server",
                code="wrong-process-server",
            )
        blockhash.check_range(request.offset, request.block_count, a.disk_size_bytes)
        # Opened (and, when missing, created sparse) as for a stream; a pair that cannot be
        # opened (say, a target of the wrong size) answers with that error.
        target = self._target(entry)
        # A delta sync's digests must come after every frame up to its INITIAL_STARTED marker
        # (agents/source/delta.py). `applied_seq` is read from the committed state, which a
        # commit replaces whole and only after the batch is in the target file, and which only
        # grows: no need to wait for the apply lock (a materialisation may hold it for minutes).
        # The marker is usually a moment away (the process server forwards it right behind the
        # sync's start): wait a little rather than send the source into its retry backoff.
        if not target.wait_applied(request.applied_through_seq, APPLIED_WAIT_SECONDS):
            blockhash.check_applied(
                request, target.applied_seq, holder="the target has applied",
                hint="the target catches up by itself as the process server forwards the pair's frames; "
                "the source asks again",
            )
        return hashes.target_hashes(target.target_path, request.offset, request.block_count, a.disk_size_bytes,
                                    target.digests)

    # -- Materialize -----------------------------------------------------------------
    def materialize(self, request: rpb.MaterializeRequest) -> rpb.MaterializeReply:
        if request.in_place:
            entry = self._entry(request.pair_id)
            if request.output_path:
                raise errors.InvalidInput("in_place writes no output file; leave output_path empty",
                                          code="output-with-in-place")
            if entry.assignment.desired_state != rpb.PAIR_DESIRED_STATE_PAUSED:
                raise errors.PreconditionFailed(
                    f"pair {request.pair_id} is not paused; its disk cannot be put back to a point in place",
                    hint="pause the pair first (the failback workflow does)", code="pair-not-paused",
                )
            target = self._target(entry)
            self._stop_stream(entry)
            return materializing.revert(target, request.point)
        target = self.target(request.pair_id)
        return materializing.materialize(target, request.point, request.output_path, self.datastore_dirs)

    # -- point views -------------------------------------------------------------------
    def open_view(self, request: rpb.OpenViewRequest) -> rpb.ViewReply:
        return self.views.open(self.target(request.pair_id), request.point)

    def close_view(self, request: rpb.CloseViewRequest) -> rpb.CloseViewReply:
        closed = self.views.close(self.target(request.pair_id), request.view_id)
        return rpb.CloseViewReply(closed_view_ids=closed)

    def end_streams(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._stop_stream(entry)

    def close(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._stop_stream(entry)
            if entry.target is not None:
                entry.target.close()
        self.views.stop()


def _window(assignment: rpb.PairAssignment) -> int:
    return assignment.policy.retention_window_seconds or 86400
