"""Heartbeat answers from the in-process copy (controller/assignments.py) are the store's answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common import pki
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import agents, replication
from siterecovery.controller.assignments import Assignments
from siterecovery.controller.heartbeats import HeartbeatWriter
from siterecovery.controller.store import ChangeCounters, MachineRecord, ServerRecord
from siterecovery.controller.store.sql import SqlStore

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
GiB = 2**30
SERVERS = ("src-1", "src-2", "ps-1", "mt-1", "nobody")


class CountingStore(SqlStore):
    """The real store, counting how often the copy is read."""

    reads = 0

    def pairs_snapshot(self):
        self.reads += 1
        return super().pairs_snapshot()

    def tag_requests_snapshot(self):
        self.reads += 1
        return super().tag_requests_snapshot()


def _server(sid: str, role: str, **inventory) -> ServerRecord:
    return ServerRecord(id=sid, role=role, hostname=f"host-{sid}", cert_serial="01", cert_fingerprint="sha256:00",
                        enrolled_at=T0, inventory=inventory)


@pytest.fixture
def store(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path}/store.db")
    store.migrate()
    for sid, host in (("src-1", "app01"), ("src-2", "db01")):
        store.add_server(_server(sid, "source"))
        store.upsert_machine(MachineRecord(id=sid, server_id=sid, hostname=host, os="Linux", disks=[
            {"identity": f"wwn-{sid}", "path": "/d/0", "size_bytes": str(GiB), "name": "disk0"}]))
    store.add_server(_server("ps-1", "process-server", data_endpoint="127.0.0.1:1001"))
    store.add_server(_server("mt-1", "master-target", data_endpoint="127.0.0.1:1002", directories=[
        {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds1", "free_bytes": str(20 * GiB)},
        {"kind": "DIRECTORY_KIND_RETENTION", "path": "/ret", "free_bytes": str(GiB)}]))
    yield store
    store.close()


def _same_as_the_store(store, copy: Assignments, now: datetime) -> None:
    counters = store.change_counters()
    for sid in SERVERS:
        assert copy.orders_for(sid, counters, now=now) == replication.orders_for(store, sid, now=now), sid


def test_answers_follow_every_change_at_the_next_heartbeat(store) -> None:
    copy = Assignments(store)
    _same_as_the_store(store, copy, T0)
    replication.enable(store, admin_pb2.EnableReplicationRequest(machine="app01", group="erp"), now=T0)
    replication.enable(store, admin_pb2.EnableReplicationRequest(machine="db01", group="erp"), now=T0)
    _same_as_the_store(store, copy, T0)
    tag_id, _ = replication.request_point(store, machine="", group="erp", kind=0, now=T0, heartbeat_interval=10)
    _same_as_the_store(store, copy, T0)
    (pair,) = store.list_pairs(machine_id="src-1")
    store.set_pair_desired_state(pair.id, "paused", now=T0)
    store.register_server("ps-1", hostname="host-ps-1", inventory={"data_endpoint": "10.0.0.9:1001"}, now=T0)
    _same_as_the_store(store, copy, T0)
    (request,) = copy.orders_for("src-1", store.change_counters(), now=T0)[1]
    assert request.tag_id == tag_id
    # A barrier that expires before every source holds aborts: no longer sent.
    expiry = T0 + timedelta(hours=1)
    src1 = pki.Identity(id="src-1", role=pki.SOURCE)
    assert replication.hold_barrier(store, src1, tag_id, now=expiry)[0] == rpb.BARRIER_OUTCOME_ABORT
    _same_as_the_store(store, copy, T0)
    assert copy.orders_for("src-1", store.change_counters(), now=T0)[1] == []
    store.delete_pair(pair.id)
    _same_as_the_store(store, copy, T0)


def test_expiry_is_each_answers_own_time(store) -> None:
    copy = Assignments(store)
    replication.enable(store, admin_pb2.EnableReplicationRequest(machine="app01"), now=T0)
    replication.request_point(store, machine="app01", group="", kind=0, now=T0)
    counters = store.change_counters()
    assert len(copy.orders_for("src-1", counters, now=T0)[1]) == 1
    reads = store.reads
    assert copy.orders_for("src-1", counters, now=T0 + timedelta(days=1))[1] == []
    assert store.reads == reads, "no read needed to drop an expired request"


def test_the_copy_is_read_once_per_change_and_again_when_old(store) -> None:
    now = [0.0]
    copy = Assignments(store, max_age_seconds=60, clock=lambda: now[0])
    replication.enable(store, admin_pb2.EnableReplicationRequest(machine="app01"), now=T0)
    counters = store.change_counters()
    for _ in range(5):
        copy.orders_for("src-1", counters, now=T0)
        copy.orders_for("nobody", counters, now=T0)
    assert store.reads == 2, "pairs once, tag requests once"
    copy.orders_for("src-1", ChangeCounters(pairs=0, tag_requests=0), now=T0)  # an older heartbeat's counters
    assert store.reads == 2, "a copy newer than the heartbeat serves it"
    now[0] = 61.0
    copy.orders_for("src-1", counters, now=T0)
    assert store.reads == 4, "older than max_age: read again (writers that do not count)"


def test_a_heartbeat_answer_holds_every_change_committed_before_it(store) -> None:
    """The counters come from the heartbeat's own commit, so a pair made just before is in its answer."""
    copy, writer = Assignments(store), HeartbeatWriter(store)
    src1 = pki.Identity(id="src-1", role=pki.SOURCE)
    counters = agents.heartbeat(store, src1, problems=[], directories=None, now=T0, writer=writer)
    assert copy.orders_for("src-1", counters, now=T0) == ([], [])
    replication.enable(store, admin_pb2.EnableReplicationRequest(machine="app01"), now=T0)
    counters = agents.heartbeat(store, src1, problems=[], directories=None, now=T0, writer=writer)
    (assignment,) = copy.orders_for("src-1", counters, now=T0)[0]
    assert assignment.process_server_endpoint == "127.0.0.1:1001"
    assert counters == ChangeCounters(pairs=1, tag_requests=0)
