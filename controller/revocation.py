"""Removing a server, and the list of revoked identities every port enforces.

`srctl servers remove` revokes an agent's certificate (and `srctl user remove`
an operator's, see operators.py): the store marks it revoked (the row stays,
for the record). From then on:

- the configuration server refuses the certificate on every RPC (the guard in
  common/grpcserver.py asks `Revocations.is_revoked`);
- every agent learns the revoked ids from its next heartbeat response and its
  data port refuses them too (agents/runtime.py keeps them on disk, so a
  restarted agent does not forget them before its first heartbeat).

Identities are revoked by id, not by serial: enrollment gives every
certificate a new id, so an agent enrolled again is a new server and the old
certificate stays refused.

Two configuration servers sharing one store: a revocation made on one reaches
the other within `refresh_seconds` (each re-reads the revoked ids at most that
often, so the check costs one small query per interval, not one per RPC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

from siterecovery.common import errors, pki
from siterecovery.common.logging import get_logger
from siterecovery.controller.store.base import ServerRecord, Store

log = get_logger(__name__)

REFRESH_SECONDS = 2.0


class Revocations:
    def __init__(self, store: Store, *, refresh_seconds: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._refresh = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # (read at, ids, the same sorted), replaced whole: every RPC asks, and a fresh copy is
        # used without the lock, which only a read (or `add`) takes.
        self._state: tuple[float | None, frozenset[str], list[str]] = (None, frozenset(), [])

    def ids(self) -> frozenset[str]:
        return self._current()[1]

    def sorted_ids(self) -> list[str]:
        """The same ids, sorted (as heartbeat responses list them); do not change the list."""
        return self._current()[2]

    def _current(self) -> tuple[float | None, frozenset[str], list[str]]:
        state = self._state
        if state[0] is not None and self._clock() - state[0] < self._refresh:
            return state
        with self._lock:
            now = self._clock()
            if self._state[0] is None or now - self._state[0] >= self._refresh:
                ids = frozenset(self._store.revoked_server_ids()) | frozenset(self._store.revoked_operator_ids())
                self._state = (now, ids, sorted(ids))
            return self._state

    def is_revoked(self, identity: pki.Identity, _cert_pem: bytes) -> bool:
        return identity.id in self.ids()

    def add(self, identity_id: str) -> None:
        """Refuse `identity_id` at once here (the store already says so)."""
        with self._lock:
            read_at, ids, _ = self._state
            ids = ids | {identity_id}
            self._state = (read_at, ids, sorted(ids))


def resolve_any_server(store: Store, ref: str) -> ServerRecord:
    """A server of any role by id or host name (revoked ones included)."""
    if not ref:
        raise errors.InvalidInput("name a server by id or host name", code="server-required")
    servers = store.list_servers()
    by_id = [s for s in servers if s.id == ref]
    if by_id:
        return by_id[0]
    found = [s for s in servers if s.hostname == ref and s.revoked_at is None]
    if len(found) == 1:
        return found[0]
    if found:
        raise errors.Conflict(
            f"{len(found)} servers are called {ref!r}",
            hint="name it by id: " + ", ".join(f"{s.id} ({s.role})" for s in found),
            code="server-ambiguous",
        )
    raise errors.NotFound(f"no server {ref!r}", hint="`srctl servers list` shows them", code="server-not-found")


def remove_server(store: Store, revocations: Revocations, ref: str, *, now: datetime) -> ServerRecord:
    """Revoke a server that no replication pair uses; the pairs must go first."""
    server = resolve_any_server(store, ref)
    if server.revoked_at is not None:
        return server
    in_use = store.list_pairs(server_id=server.id)
    if in_use:
        machines = sorted({p.machine_id for p in in_use})
        raise errors.PreconditionFailed(
            f"{server.role} {server.hostname} ({server.id}) still serves {len(in_use)} replicated disk(s)",
            hint="disable their replication first (`srctl replication disable MACHINE`); machines: "
            + ", ".join(machines),
            code="server-in-use",
        )
    revoked = store.revoke_server(server.id, now=now)
    revocations.add(server.id)
    log.info("server removed; its certificate is revoked", server=server.id, role=server.role,
             hostname=server.hostname)
    return revoked
