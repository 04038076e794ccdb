"""controller/metrics.py: the store's view at scrape time, and job durations, on a real SQLite store."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from siterecovery.common.errors import PreconditionFailed
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.convert import to_dict
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, JobRunner, RetryPolicy, create_job
from siterecovery.controller.metrics import JobMetrics, StoreCollector
from siterecovery.controller.store import MachineRecord, PairRecord, ServerRecord, open_store

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
GiB = 2**30
INTERVAL = 10.0


def server(sid: str, role: str, **inventory) -> ServerRecord:
    return ServerRecord(id=sid, role=role, hostname=f"host-{sid}", cert_serial="01", cert_fingerprint="sha256:00",
                        enrolled_at=T0, inventory=inventory)


def stamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


@pytest.fixture
def store(tmp_path: Path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


def site(store) -> PairRecord:
    """app01 (disk0) replicating through ps-1 to mt-1, as replication.enable makes it."""
    store.add_server(server("src-1", "source"))
    store.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux",
                                       disks=[{"identity": "wwn-1", "path": "/d/0", "size_bytes": str(GiB), "name": "disk0"}]))
    store.add_server(server("ps-1", "process-server", data_endpoint="127.0.0.1:1001"))
    store.add_server(server("mt-1", "master-target", data_endpoint="127.0.0.1:1002", directories=[
        {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds1", "free_bytes": str(20 * GiB)},
        {"kind": "DIRECTORY_KIND_RETENTION", "path": "/ret", "free_bytes": str(GiB)},
    ]))
    (pair,) = replication.enable(store, admin_pb2.EnableReplicationRequest(
        machine="app01", policy=rpb.RecoveryPolicy(rpo_threshold_seconds=600)), now=T0)
    return pair


def collected(store, now: datetime) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, heartbeat_interval=INTERVAL, clock=lambda: now))
    return registry


def test_heartbeat_age_and_health_per_agent(store):
    site(store)
    store.record_heartbeat("src-1", problems=[], directories=None, now=T0)
    store.record_heartbeat("ps-1", problems=[], directories=None, now=T0 - timedelta(seconds=30))
    store.record_heartbeat("mt-1", problems=[{"code": "retention-low", "severity": "critical", "message": "m"}],
                           directories=None, now=T0)
    store.add_server(server("gone", "source"))
    store.revoke_server("gone", now=T0)
    registry = collected(store, T0 + timedelta(seconds=5))
    value = registry.get_sample_value

    def key(sid, role):
        return {"agent": sid, "role": role, "hostname": f"host-{sid}"}

    assert value("siterecovery_agent_heartbeat_age_seconds", key("src-1", "source")) == 5
    assert value("siterecovery_agent_heartbeat_age_seconds", key("ps-1", "process-server")) == 35
    assert value("siterecovery_agent_health", {**key("src-1", "source"), "health": "healthy"}) == 1
    assert value("siterecovery_agent_health", {**key("ps-1", "process-server"), "health": "warning"}) == 1
    assert value("siterecovery_agent_health", {**key("mt-1", "master-target"), "health": "critical"}) == 1
    assert value("siterecovery_agent_heartbeat_age_seconds", key("gone", "source")) is None  # revoked
    assert value("siterecovery_agent_heartbeat_interval_seconds") == INTERVAL


def test_rpo_and_bytes_per_pair_from_the_agents_reports(store):
    pair = site(store)
    now = T0 + timedelta(minutes=1)
    store.record_pair_reports("src-1", "source", {pair.id: to_dict(rpb.PairStatus(
        pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, backlog_bytes=8192,
        oldest_pending_captured_at=stamp(now - timedelta(seconds=42)), throughput_bytes_per_second=1e6,
        sync_done_bytes=GiB, sync_total_bytes=GiB))}, now=now)
    store.record_pair_reports("ps-1", "process-server", {pair.id: to_dict(rpb.PairStatus(
        pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, backlog_bytes=4096,
        oldest_pending_captured_at=stamp(now - timedelta(seconds=12))))}, now=now)
    store.record_pair_reports("mt-1", "master-target", {pair.id: to_dict(rpb.PairStatus(
        pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, applied_bytes_total=3 * GiB, journal_bytes=1 << 20,
        points=[rpb.RecoveryPoint(tag_id="t1", captured_at=stamp(now - timedelta(seconds=90)))],
        views=[rpb.OpenView(view_id="view-a", tag_id="t1", seq=7, opened_at=stamp(now - timedelta(hours=30))),
               rpb.OpenView(view_id="view-b", seq=9, opened_at=stamp(now - timedelta(minutes=5)))]))}, now=now)
    value = collected(store, now).get_sample_value
    key = {"pair": pair.id, "machine": "app01", "disk": "disk0"}
    # The oldest write still waiting anywhere: 42 s at the source.
    assert value("siterecovery_replication_rpo_seconds", key) == 42
    assert value("siterecovery_replication_rpo_known", key) == 1
    assert value("siterecovery_replication_rpo_threshold_seconds", key) == 600
    assert value("siterecovery_replication_state", {**key, "state": "replicating"}) == 1
    assert value("siterecovery_replication_applied_bytes_total", key) == 3 * GiB
    assert value("siterecovery_replication_throughput_bytes_per_second", key) == 1e6
    assert value("siterecovery_replication_source_backlog_bytes", key) == 8192
    assert value("siterecovery_replication_spool_backlog_bytes", key) == 4096
    assert value("siterecovery_replication_journal_bytes", key) == 1 << 20
    assert value("siterecovery_replication_recovery_points", key) == 1
    assert value("siterecovery_replication_latest_point_timestamp_seconds", key) == (now - timedelta(seconds=90)).timestamp()
    assert value("siterecovery_replication_sync_progress_ratio", key) == 1
    # Two point views open, the oldest for 30 h: each keeps the undo journal back to its point.
    assert value("siterecovery_replication_open_views", key) == 2
    assert value("siterecovery_replication_oldest_open_view_timestamp_seconds", key) == (
        now - timedelta(hours=30)).timestamp()
    assert value("siterecovery_replication_pair_info", {
        **key, "group": "", "process_server": "ps-1", "master_target": "mt-1", "mode": "nbd", "target_kind": "master-target",
    }) == 1


def test_an_unknown_rpo_is_absent_and_flagged(store):
    pair = site(store)  # nobody has reported yet
    value = collected(store, T0).get_sample_value
    key = {"pair": pair.id, "machine": "app01", "disk": "disk0"}
    assert value("siterecovery_replication_rpo_known", key) == 0
    assert value("siterecovery_replication_rpo_seconds", key) is None
    assert value("siterecovery_replication_state", {**key, "state": "initial-sync"}) == 1
    assert value("siterecovery_replication_open_views", key) == 0
    assert value("siterecovery_replication_oldest_open_view_timestamp_seconds", key) is None


def test_active_jobs_by_kind_and_status(store):
    create_job(store, JobKind("demo", [FunctionStep("a", lambda ctx: None)]), "x", now=T0)
    create_job(store, JobKind("demo", [FunctionStep("a", lambda ctx: None)]), "y", now=T0)
    assert collected(store, T0).get_sample_value("siterecovery_jobs", {"kind": "demo", "status": "pending"}) == 2


def test_job_and_step_durations(store):
    registry = CollectorRegistry()
    observer = JobMetrics(registry)

    def refuse(ctx):
        raise PreconditionFailed("no", code="no")

    good = JobKind("good", [FunctionStep("a", lambda ctx: None), FunctionStep("b", lambda ctx: None)])
    bad = JobKind("bad", [FunctionStep("a", lambda ctx: None), FunctionStep("b", refuse)])
    runner = JobRunner(store, "r1", [good, bad], RetryPolicy(max_attempts=1, initial_backoff=0, max_backoff=0),
                       lease_seconds=30, observer=observer)
    create_job(store, good, "x", now=T0)
    create_job(store, bad, "y", now=T0)
    runner.run_once(now=T0 + timedelta(seconds=90))
    value = registry.get_sample_value
    assert value("siterecovery_job_duration_seconds_count", {"kind": "good", "outcome": "succeeded"}) == 1
    assert value("siterecovery_job_duration_seconds_sum", {"kind": "good", "outcome": "succeeded"}) == 90
    assert value("siterecovery_job_duration_seconds_count", {"kind": "bad", "outcome": "compensated"}) == 1
    steps = {"kind": "good", "phase": "execute", "outcome": "succeeded"}
    assert value("siterecovery_job_step_duration_seconds_count", steps) == 2
    assert value("siterecovery_job_step_duration_seconds_count", {"kind": "bad", "phase": "execute", "outcome": "failed"}) == 1
    assert value("siterecovery_job_step_duration_seconds_count", {"kind": "bad", "phase": "compensate", "outcome": "succeeded"}) == 1


def renamed(value, old: str, new: str):
    """`value` with `old` replaced by `new` in every string, through dicts and lists."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, old, new) for v in value]
    return value


def test_a_scrape_stays_cheap_with_many_pairs_and_agents(store, tmp_path):
    """2,000 pairs (1,000 machines of two disks, each reported by three agents with a day of
    hourly points): a fixed handful of reads, and well under a second on a quiet machine."""
    machines, now = 1000, T0 + timedelta(seconds=5)
    # One machine through the store's API, then its rows copied a thousand times into an
    # empty store in one transaction (a thousand separate commits would take a minute).
    store.add_server(server("ps-1", "process-server"))
    store.add_server(server("mt-1", "master-target"))
    store.add_server(server("src-X", "source"))
    store.upsert_machine(MachineRecord(id="src-X", server_id="src-X", hostname="vmX", os="Linux"))
    for disk in ("disk0", "disk1"):
        pid = f"src-X-{disk}"
        store.create_pair(PairRecord(
            id=pid, machine_id="src-X", source_server_id="src-X", disk_name=disk, disk_identity=pid,
            disk_size_bytes=GiB, mode="nbd", process_server_id="ps-1", master_target_id="mt-1",
            target_path=f"/ds/{pid}.img", journal_dir=f"/ret/{pid}", created_at=T0, updated_at=T0,
            policy=dict(replication.DEFAULT_POLICY),
        ))
        status = to_dict(rpb.PairStatus(pair_id=pid, state=rpb.PAIR_STATE_REPLICATING,
                                        oldest_pending_captured_at=stamp(T0)))
        store.record_pair_reports("src-X", "source", {pid: status}, now=now)
        store.record_pair_reports("ps-1", "process-server", {pid: status}, now=now)
        store.record_pair_reports("mt-1", "master-target", {pid: to_dict(rpb.PairStatus(
            pair_id=pid, applied_bytes_total=GiB,
            points=[rpb.RecoveryPoint(tag_id=f"t{n}", captured_at=stamp(T0)) for n in range(24)]))}, now=now)
    _revision, seed = store.export_tables()
    tables: dict[str, list] = {}
    for name, rows in seed.items():
        for row in rows:
            if "src-X" not in repr(row):
                tables.setdefault(name, []).append(row)
                continue
            tables.setdefault(name, []).extend(renamed(row, "src-X", f"src-{n}") for n in range(machines))
            tables[name][-machines:] = [renamed(r, "vmX", f"vm{n}") for n, r in enumerate(tables[name][-machines:])]
    big = open_store(f"sqlite:///{tmp_path}/big.db")
    try:
        big.import_tables(tables)
        collector = StoreCollector(big, heartbeat_interval=INTERVAL, clock=lambda: now)
        started = time.perf_counter()
        families = {f.name: f for f in collector.collect()}
        elapsed = time.perf_counter() - started
    finally:
        big.close()
    assert len(families["siterecovery_replication_rpo_seconds"].samples) == 2 * machines
    assert all(s.value == 5 for s in families["siterecovery_replication_rpo_seconds"].samples)
    assert {s.value for s in families["siterecovery_replication_recovery_points"].samples} == {24}
    assert len(families["siterecovery_agent_health"].samples) == 3 * (machines + 2)
    # Generous for a loaded 2-core CI machine; about 1 s there when idle.
    assert elapsed < 10.0, f"a scrape of {2 * machines} pairs took {elapsed:.2f} s"
