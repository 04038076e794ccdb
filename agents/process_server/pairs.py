"""The process server's part in replication pairs (the runtime's PairParticipant).

It holds the controller's current assignments (the receiver checks streams
against them, and BlockHashes requests: hashes.py, or blob_hashes.py for an
Azure pair), runs one forwarder per
assigned pair - a `Forwarder` to the pair's master target, or, for a pair whose
target kind is an Azure page blob, a `BlobForwarder` that writes the blob
itself (blob_forwarder.py; one writer per blob: a pair whose blob another
pair's forwarder still writes waits for it to stop) - and reports each pair's
spool and forwarding status with every heartbeat. A pair that leaves the
assignments has its forwarder stopped and its open stream ended; its spooled
frames stay on disk (the pair may come back; see the gaps in the report).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from siterecovery.common import blockhash, errors, pki
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import common_pb2
from siterecovery.common.pb import replication_pb2 as rpb

from . import hashes
from .azure_storage import SETTING, StorageCredentialFile
from .forwarder import DEFAULT_POLICY, Forwarder, ForwardPolicy
from .receiver import Receiver
from .spool import Spool

if TYPE_CHECKING:  # blob_forwarder imports the Azure SDK: only when an Azure pair comes
    from .blob_forwarder import BlobForwarder, BlobPolicy

log = get_logger(__name__)

# A change in any of these restarts the pair's forwarder.
_FORWARDING_FIELDS = ("master_target_id", "master_target_endpoint", "disk_size_bytes", "target_kind", "azure_blob")
# A blob forwarder does not dial anyone: only these restart it.
_BLOB_FIELDS = ("disk_size_bytes", "target_kind", "azure_blob")


def _changed(wanted: rpb.PairAssignment, running: rpb.PairAssignment) -> bool:
    fields = _BLOB_FIELDS if running.target_kind == rpb.TARGET_KIND_AZURE_PAGE_BLOB else _FORWARDING_FIELDS
    return any(getattr(wanted, f) != getattr(running, f) for f in fields)


class ProcessServerPairs:
    """`credentials()` is the agent's mTLS identity (None until enrolled).

    `storage` is this process server's own Azure Storage credential (None when
    it has none: it then refuses Azure pairs with the setting to fix);
    `state_dir` holds the Azure pairs' state files; `on_change` is called when a
    pair has news for the controller (a recovery point), to heartbeat at once.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        credentials: Callable[[], AgentCredentials | None],
        policy: ForwardPolicy = DEFAULT_POLICY,
        storage: StorageCredentialFile | None = None,
        state_dir: Path | None = None,
        blob_policy: BlobPolicy | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self._credentials = credentials
        self._policy = policy
        self._storage = storage
        self._state_dir = state_dir
        self._blob_policy = blob_policy
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._assignments: dict[str, rpb.PairAssignment] = {}
        self._forwarders: dict[str, Forwarder | BlobForwarder] = {}
        # Blob forwarders told to stop whose thread may still run. A blob has one
        # writer at a time (read-modify-write of edge pages, snapshots, the state
        # file), so a pair's next blob forwarder starts only once this one is gone.
        self._draining: dict[str, BlobForwarder] = {}
        # Pairs whose blob another pair's forwarder still writes: they start once it has stopped.
        self._waiting: set[str] = set()
        self._failures: dict[str, errors.SiteRecoveryError] = {}
        self.receiver = Receiver(spool, lookup=self.assignment, me=self.me, stop=self._stop)

    def me(self) -> str:
        creds = self._credentials()
        return creds.identity.id if creds is not None else ""

    def assignment(self, pair_id: str) -> rpb.PairAssignment | None:
        with self._lock:
            return self._assignments.get(pair_id)

    def block_hashes(self, request: rpb.BlockHashesRequest, caller: pki.Identity) -> rpb.BlockHashesReply:
        """BlockHashes for a source agent's delta sync: asked of the pair's master target (hashes.py),
        or read from the page blob of an Azure pair this process server ends (blob_hashes.py)."""
        return hashes.block_hashes(
            request, caller=caller, assignment=self.assignment(request.pair_id), me=self.me(),
            credentials=self._credentials(), read_blob=self._blob_hashes,
        )

    def _blob_hashes(self, assignment: rpb.PairAssignment, request: rpb.BlockHashesRequest) -> rpb.BlockHashesReply:
        with self._lock:
            writer = self._blob_writer(assignment)
            forwarder = self._forwarders.get(assignment.pair_id)
        if writer is not None:
            # The blob's last writer (a disabled pair) may still apply frames: digests read now could
            # be overwritten by frames that are not this pair's.
            raise errors.Unavailable(
                f"pair {assignment.pair_id}: page blob {assignment.azure_blob.blob_name} is still written by "
                f"pair {writer}, which is stopping",
                hint="the source asks again by itself; if it persists, disable the other pair",
                code="azure-blob-busy",
            )
        from .blob_forwarder import (  # the Azure SDK: only when an Azure pair asks
            DEFAULT_BLOB_POLICY,
            BlobForwarder,
        )
        from .blob_hashes import blob_block_hashes

        # The gate (blob_hashes.py): what the pair's forwarder has written into the blob; none
        # running (yet) has written nothing of this session's stream. The asked seq is a delta
        # sync's INITIAL_STARTED, usually a moment behind in the spool: wait a little, as a master
        # target does, rather than send the source into its retry backoff (0.2 s, 0.4 s ...).
        applied = 0
        if isinstance(forwarder, BlobForwarder):
            forwarder.wait_applied(request.applied_through_seq, blockhash.APPLIED_WAIT_SECONDS)
            applied = forwarder.state.applied_seq
        policy = self._blob_policy or DEFAULT_BLOB_POLICY
        return blob_block_hashes(assignment, request, self._storage, applied_seq=applied, policy=policy.retry)

    def _blob_writer(self, assignment: rpb.PairAssignment) -> str | None:
        """Another pair whose blob forwarder (running, or stopping) writes this pair's blob; the lock is held."""
        if assignment.target_kind != rpb.TARGET_KIND_AZURE_PAGE_BLOB:
            return None
        target = assignment.azure_blob
        blob = f"{target.storage_account}/{target.container}/{target.blob_name}"
        for forwarder in [*self._forwarders.values(), *self._draining.values()]:
            if forwarder.pair_id != assignment.pair_id and getattr(forwarder, "blob", None) == blob and (
                forwarder.alive or forwarder.pair_id in self._forwarders
            ):
                return forwarder.pair_id
        return None

    # -- PairParticipant -----------------------------------------------------------
    def apply_assignments(
        self, pairs: Sequence[rpb.PairAssignment], tag_requests: Sequence[rpb.TagRequest]
    ) -> None:
        creds = self._credentials()
        if creds is None or self._stop.is_set():
            return
        mine = {p.pair_id: p for p in pairs if p.process_server_id == creds.identity.id}
        stopping: list[Forwarder | BlobForwarder] = []
        with self._lock:
            self._assignments = dict(mine)
            for pair_id, forwarder in list(self._forwarders.items()):
                wanted = mine.get(pair_id)
                if wanted is None or _changed(wanted, forwarder.assignment):
                    stopping.append(self._forwarders.pop(pair_id))
                    if not isinstance(forwarder, Forwarder):  # a BlobForwarder
                        self._draining[pair_id] = forwarder
            for pair_id, forwarder in list(self._draining.items()):
                if not forwarder.alive and forwarder not in stopping:
                    del self._draining[pair_id]
            gone = [f.pair_id for f in stopping if f.pair_id not in mine]
            for pair_id in set(self._failures) - set(mine):
                del self._failures[pair_id]
            self._waiting &= set(mine)
            for pair_id, assignment in mine.items():
                if pair_id in self._forwarders:
                    self._forwarders[pair_id].assignment = assignment
                    continue
                if pair_id in self._draining:
                    continue  # its previous blob forwarder is still stopping: at a later heartbeat
                writer = self._blob_writer(assignment)
                if writer is not None:
                    # Another pair's forwarder still writes this blob (say, a pair disabled just before
                    # this one was enabled onto the same blob): one writer at a time, so wait for it.
                    if pair_id not in self._waiting:
                        log.info("waiting for the page blob's previous writer to stop", pair=pair_id, writer=writer)
                    self._waiting.add(pair_id)
                    continue
                self._waiting.discard(pair_id)
                try:
                    forwarder = self._forwarder(assignment, creds)
                except errors.SiteRecoveryError as exc:
                    if pair_id not in self._failures:
                        log.error("cannot forward pair", pair=pair_id, code=exc.code, error=exc.message)
                    self._failures[pair_id] = exc
                    continue
                self._failures.pop(pair_id, None)
                self._forwarders[pair_id] = forwarder
                forwarder.start()
                log.info("forwarding pair", pair=pair_id, target=assignment.master_target_id,
                         target_kind=rpb.TargetKind.Name(assignment.target_kind))
        for forwarder in stopping:
            forwarder.stop()
        with self._lock:
            stopped = any(not f.alive for f in self._draining.values())
        if stopped:
            self._on_stopped()
        for pair_id in gone:
            log.info("pair left this process server", pair=pair_id)
            self.receiver.end_pair(pair_id)

    def _on_stopped(self) -> None:
        """A blob forwarder stopped: its successor may start now rather than at the next heartbeat."""
        with self._lock:
            assignments = list(self._assignments.values())
        if any(p.pair_id in self._draining or p.pair_id in self._waiting for p in assignments):
            self.apply_assignments(assignments, [])

    def _forwarder(self, assignment: rpb.PairAssignment, creds: AgentCredentials) -> Forwarder | BlobForwarder:
        if assignment.target_kind != rpb.TARGET_KIND_AZURE_PAGE_BLOB:
            return Forwarder(assignment, self.spool, creds, policy=self._policy)
        if self._storage is None or self._state_dir is None:
            raise errors.PreconditionFailed(
                f"pair {assignment.pair_id} is to be written into Azure page blob {assignment.azure_blob.blob_name}, "
                "but this process server has no Azure Storage credential",
                hint=f"set {SETTING} in the process server's settings to a 0600 file holding the storage "
                "account's connection string, then restart it",
                code="azure-storage-not-configured",
            )
        from .blob_forwarder import DEFAULT_BLOB_POLICY, BlobForwarder

        return BlobForwarder(
            assignment, self.spool, self._storage, self._state_dir, policy=self._blob_policy or DEFAULT_BLOB_POLICY,
            on_change=self._on_change,
        )

    def pair_statuses(self) -> list[rpb.PairStatus]:
        with self._lock:
            forwarders = list(self._forwarders.values())
            failures = dict(self._failures)
        out = [f.status() for f in forwarders]
        for pair_id, exc in sorted(failures.items()):
            out.append(
                rpb.PairStatus(
                    pair_id=pair_id,
                    state=rpb.PAIR_STATE_ERROR,
                    reason=f"process server cannot spool or forward this pair: {exc.message}"
                    + (f" ({exc.hint})" if exc.hint else ""),
                    reason_code=exc.code,
                )
            )
        return out

    # -- the daemon ----------------------------------------------------------------
    def problems(self) -> list[common_pb2.Problem]:
        return self.spool.problems()

    def end_streams(self) -> None:
        self.receiver.end_all()

    def close(self) -> None:
        """Stop every forwarder and end every stream (the spool stays open; close it after)."""
        self._stop.set()
        self.receiver.end_all()
        with self._lock:
            forwarders = list(self._forwarders.values())
            self._forwarders.clear()
        for forwarder in forwarders:
            forwarder.stop()
