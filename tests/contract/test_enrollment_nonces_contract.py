"""The enrollment nonces part of the store contract: a nonce is accepted once, by any store on the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from siterecovery.controller.enrollment import NonceRegistry
from siterecovery.controller.store import Store, open_store

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
DAY = 86_400


def test_a_nonce_is_claimed_once_and_forgotten_after_the_window(store: Store) -> None:
    assert store.claim_enrollment_nonce("a" * 64, now=NOW, keep_seconds=DAY)
    assert not store.claim_enrollment_nonce("a" * 64, now=NOW + timedelta(hours=23), keep_seconds=DAY)
    assert store.claim_enrollment_nonce("b" * 64, now=NOW, keep_seconds=DAY)
    # A day later the first is gone (dropped as another one comes), so it could be claimed again;
    # by then the agent's certificate request has long expired its purpose.
    assert store.claim_enrollment_nonce("c" * 64, now=NOW + timedelta(days=1, seconds=1), keep_seconds=DAY)
    assert store.claim_enrollment_nonce("a" * 64, now=NOW + timedelta(days=1, seconds=2), keep_seconds=DAY)


def test_a_replay_is_refused_by_another_replica_and_after_a_restart(store_url: str) -> None:
    first = open_store(store_url)
    second = open_store(store_url)
    try:
        assert NonceRegistry(first, clock=lambda: NOW).claim(b"n" * 32)
        assert not NonceRegistry(second, clock=lambda: NOW).claim(b"n" * 32), "another replica"
        first.close()
        first = open_store(store_url)
        assert not NonceRegistry(first, clock=lambda: NOW).claim(b"n" * 32), "after a restart"
        assert NonceRegistry(first, clock=lambda: NOW).claim(b"m" * 32)
    finally:
        first.close()
        second.close()
