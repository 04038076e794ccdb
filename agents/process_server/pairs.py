"""The process server's part in replication pairs (the runtime's PairParticipant).

It holds the controller's current assignments (the receiver checks streams
against them, and BlockHashes requests: hashes.py), runs one Forwarder per assigned pair, and reports each pair's
spool and forwarding status with every heartbeat. A pair that leaves the
assignments has its forwarder stopped and its open stream ended; its spooled
frames stay on disk (the pair may come back; see the gaps in the report).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from siterecovery.common import errors, pki
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import common_pb2
from siterecovery.common.pb import replication_pb2 as rpb

from . import hashes
from .forwarder import DEFAULT_POLICY, Forwarder, ForwardPolicy
from .receiver import Receiver
from .spool import Spool

log = get_logger(__name__)

# A change in any of these restarts the pair's forwarder.
_FORWARDING_FIELDS = ("master_target_id", "master_target_endpoint", "disk_size_bytes")


class ProcessServerPairs:
    """`credentials()` is the agent's mTLS identity (None until enrolled)."""

    def __init__(
        self,
        spool: Spool,
        *,
        credentials: Callable[[], AgentCredentials | None],
        policy: ForwardPolicy = DEFAULT_POLICY,
    ) -> None:
        self.spool = spool
        self._credentials = credentials
        self._policy = policy
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._assignments: dict[str, rpb.PairAssignment] = {}
        self._forwarders: dict[str, Forwarder] = {}
        self._failures: dict[str, errors.SiteRecoveryError] = {}
        self.receiver = Receiver(spool, lookup=self.assignment, me=self.me, stop=self._stop)

    def me(self) -> str:
        creds = self._credentials()
        return creds.identity.id if creds is not None else ""

    def assignment(self, pair_id: str) -> rpb.PairAssignment | None:
        with self._lock:
            return self._assignments.get(pair_id)

    def block_hashes(self, request: rpb.BlockHashesRequest, caller: pki.Identity) -> rpb.BlockHashesReply:
        """BlockHashes for a source agent's delta sync, asked of the pair's master target (hashes.py)."""
        return hashes.block_hashes(
            request, caller=caller, assignment=self.assignment(request.pair_id), me=self.me(),
            credentials=self._credentials(),
        )

    # -- PairParticipant -----------------------------------------------------------
    def apply_assignments(
        self, pairs: Sequence[rpb.PairAssignment], tag_requests: Sequence[rpb.TagRequest]
    ) -> None:
        creds = self._credentials()
        if creds is None or self._stop.is_set():
            return
        mine = {p.pair_id: p for p in pairs if p.process_server_id == creds.identity.id}
        stopping: list[Forwarder] = []
        with self._lock:
            self._assignments = dict(mine)
            for pair_id, forwarder in list(self._forwarders.items()):
                wanted = mine.get(pair_id)
                if wanted is None or any(
                    getattr(wanted, f) != getattr(forwarder.assignment, f) for f in _FORWARDING_FIELDS
                ):
                    stopping.append(self._forwarders.pop(pair_id))
            gone = [f.pair_id for f in stopping if f.pair_id not in mine]
            for pair_id in set(self._failures) - set(mine):
                del self._failures[pair_id]
            for pair_id, assignment in mine.items():
                if pair_id in self._forwarders:
                    self._forwarders[pair_id].assignment = assignment
                    continue
                try:
                    forwarder = Forwarder(assignment, self.spool, creds, policy=self._policy)
                except errors.SiteRecoveryError as exc:
                    if pair_id not in self._failures:
                        log.error("cannot forward pair", pair=pair_id, code=exc.code, error=exc.message)
                    self._failures[pair_id] = exc
                    continue
                self._failures.pop(pair_id, None)
                self._forwarders[pair_id] = forwarder
                forwarder.start()
                log.info("forwarding pair", pair=pair_id, target=assignment.master_target_id)
        for forwarder in stopping:
            forwarder.stop()
        for pair_id in gone:
            log.info("pair left this process server", pair=pair_id)
            self.receiver.end_pair(pair_id)

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
                    reason=f"process server cannot spool this pair: {exc.message}",
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
