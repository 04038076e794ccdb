"""The revoked ids every RPC checks are read from the store at most every `refresh_seconds`."""

from __future__ import annotations

from datetime import UTC, datetime

from siterecovery.common import pki
from siterecovery.controller.revocation import Revocations
from siterecovery.controller.store import ServerRecord, open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    for sid in ("b-agent", "a-agent", "c-agent"):
        store.add_server(ServerRecord(id=sid, role="source", hostname=sid, cert_serial="1",
                                      cert_fingerprint="f", enrolled_at=T0))
    return store


def test_revoked_ids_are_read_again_only_after_the_refresh_interval(tmp_path) -> None:
    store = _store(tmp_path)
    clock = [100.0]
    revocations = Revocations(store, refresh_seconds=2.0, clock=lambda: clock[0])
    store.revoke_server("b-agent", now=T0)
    assert revocations.ids() == {"b-agent"}

    store.revoke_server("a-agent", now=T0)  # by another configuration server on the same store
    clock[0] += 1.9
    assert not revocations.is_revoked(pki.Identity(id="a-agent", role="source"), b"")
    clock[0] += 0.1
    assert revocations.is_revoked(pki.Identity(id="a-agent", role="source"), b"")
    assert revocations.sorted_ids() == ["a-agent", "b-agent"]
    store.close()


def test_a_revocation_made_here_counts_at_once_and_stays_sorted(tmp_path) -> None:
    store = _store(tmp_path)
    clock = [100.0]
    revocations = Revocations(store, refresh_seconds=2.0, clock=lambda: clock[0])
    store.revoke_server("c-agent", now=T0)
    assert revocations.sorted_ids() == ["c-agent"]

    store.revoke_server("a-agent", now=T0)
    revocations.add("a-agent")
    assert revocations.is_revoked(pki.Identity(id="a-agent", role="source"), b"")
    assert revocations.sorted_ids() == ["a-agent", "c-agent"]
    clock[0] += 5
    assert revocations.sorted_ids() == ["a-agent", "c-agent"]  # and the store agrees
    store.close()
