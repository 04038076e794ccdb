"""Heartbeats are group-committed (controller/heartbeats.py) and checked without a read."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.common import errors, pki
from siterecovery.controller import agents
from siterecovery.controller.heartbeats import HeartbeatWriter
from siterecovery.controller.store import ChangeCounters, Heartbeat, ServerRecord, open_store
from siterecovery.controller.store.sql import SqlStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class GroupedStore(SqlStore):
    """The real store, noting each group it is given; the first group waits for `release`."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.groups: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def record_heartbeat_group(self, beats):
        first = not self.groups
        self.groups.append([b.server_id for b in beats])
        if first:
            self.entered.set()
            assert self.release.wait(10)
        return super().record_heartbeat_group(beats)


@pytest.fixture
def store(tmp_path: Path) -> GroupedStore:
    store = GroupedStore(f"sqlite:///{tmp_path}/store.db")
    store.migrate()
    for sid in ("a", "b", "c", "d"):
        store.add_server(ServerRecord(id=sid, role="source", hostname=sid, cert_serial="1",
                                      cert_fingerprint="f", enrolled_at=T0))
    yield store
    store.close()


def beat(sid: str, seconds: int = 10, problems: list | None = None) -> Heartbeat:
    return Heartbeat(sid, "source", problems=problems or [], directories=None, now=T0 + timedelta(seconds=seconds))


def queued(writer: HeartbeatWriter, count: int) -> None:
    """Wait (bounded) until `count` heartbeats wait behind the group being written."""
    deadline = time.monotonic() + 10
    while len(writer._queue) < count:
        assert time.monotonic() < deadline, "the heartbeats never queued"
        time.sleep(0.001)


def in_threads(writer: HeartbeatWriter, beats: list[Heartbeat]) -> tuple[dict, list[threading.Thread]]:
    outcome: dict[str, object] = {}

    def run(b: Heartbeat) -> None:
        try:
            outcome[b.server_id] = writer.record(b)[0]
        except errors.SiteRecoveryError as exc:
            outcome[b.server_id] = exc

    threads = [threading.Thread(target=run, args=(b,)) for b in beats]
    for thread in threads:
        thread.start()
    return outcome, threads


def test_a_lone_heartbeat_is_written_at_once(store: GroupedStore) -> None:
    store.release.set()
    writer = HeartbeatWriter(store)
    assert writer.record(beat("a")) == (True, ChangeCounters())
    assert writer.record(beat("nope")) == (False, ChangeCounters())
    assert store.groups == [["a"], ["nope"]]
    assert store.get_server("a").last_heartbeat_at == T0 + timedelta(seconds=10)


def test_heartbeats_arriving_during_a_commit_share_the_next_one(store: GroupedStore) -> None:
    writer = HeartbeatWriter(store)
    first, first_threads = in_threads(writer, [beat("a")])
    assert store.entered.wait(10)
    rest, threads = in_threads(writer, [beat("b"), beat("c"), beat("d")])
    queued(writer, 3)
    store.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert first == {"a": True} and rest == {"b": True, "c": True, "d": True}
    assert store.groups[0] == ["a"] and sorted(store.groups[1]) == ["b", "c", "d"] and len(store.groups) == 2
    assert all(store.get_server(s).last_heartbeat_at == T0 + timedelta(seconds=10) for s in "abcd")


def test_a_bad_heartbeat_fails_only_its_own_caller(store: GroupedStore) -> None:
    writer = HeartbeatWriter(store, max_group=8)
    first, first_threads = in_threads(writer, [beat("a")])
    assert store.entered.wait(10)
    rest, threads = in_threads(writer, [beat("b"), beat("c", problems=[{"bad": float("nan")}]), beat("d")])
    queued(writer, 3)
    store.release.set()
    for thread in first_threads + threads:
        thread.join(10)
    assert rest["b"] is True and rest["d"] is True
    assert isinstance(rest["c"], errors.InvalidInput)
    assert store.get_server("c").last_heartbeat_at is None
    assert store.get_server("d").last_heartbeat_at == T0 + timedelta(seconds=10)


def test_an_unknown_or_miscast_agent_is_told_why(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    store.add_server(ServerRecord(id="ps-1", role=pki.PROCESS_SERVER, hostname="ps", cert_serial="1",
                                  cert_fingerprint="f", enrolled_at=T0))
    writer = HeartbeatWriter(store)
    with pytest.raises(errors.NotFound) as unknown:
        agents.heartbeat(store, pki.Identity(id="ghost", role=pki.SOURCE), problems=[], directories=None,
                         now=T0, writer=writer)
    assert unknown.value.code == "agent-unknown"
    with pytest.raises(errors.PermissionDenied) as miscast:
        agents.heartbeat(store, pki.Identity(id="ps-1", role=pki.SOURCE), problems=[], directories=None,
                         now=T0, writer=writer)
    assert miscast.value.code == "role-mismatch"
    assert store.get_server("ps-1").last_heartbeat_at is None
    agents.heartbeat(store, pki.Identity(id="ps-1", role=pki.PROCESS_SERVER), problems=[],
                     directories=[{"kind": "DIRECTORY_KIND_SPOOL", "path": "/spool"}], now=T0, writer=writer)
    assert store.get_server("ps-1").inventory == {"directories": [{"kind": "DIRECTORY_KIND_SPOOL", "path": "/spool"}]}
    store.close()


def test_a_queue_longer_than_a_group_is_written_in_turns_and_every_caller_answered(store: GroupedStore) -> None:
    writer = HeartbeatWriter(store, max_group=2)
    first, first_threads = in_threads(writer, [beat("a")])
    assert store.entered.wait(10)
    rest, threads = in_threads(writer, [beat("b"), beat("c"), beat("d")])
    queued(writer, 3)
    store.release.set()
    for thread in first_threads + threads:
        thread.join(10)
        assert not thread.is_alive()
    assert first == {"a": True} and rest == {"b": True, "c": True, "d": True}
    assert [len(group) for group in store.groups] == [1, 2, 1]
    assert sorted(sum(store.groups, [])) == ["a", "b", "c", "d"]
    assert writer.record(beat("a", seconds=20)) == (True, ChangeCounters())  # the turn was given back
