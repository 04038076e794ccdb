"""One contract for every Store implementation; runs on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from siterecovery.common.errors import Conflict, InvalidInput, NotFound, Unavailable
from siterecovery.controller.heartbeats import HeartbeatWriter
from siterecovery.controller.jobs import states
from siterecovery.controller.store import (
    Heartbeat,
    MachineRecord,
    OperatorRecord,
    ServerRecord,
    SqlStore,
    Store,
    open_store,
)
from siterecovery.controller.store.schema import metadata
from siterecovery.controller.store.sql import head_revision

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
LEASE = 30.0

INVENTORY = {
    "host": {"hostname": "web-01", "os": "Ubuntu 24.04", "cpu_count": 8, "memory_bytes": 2**34},
    "disks": [
        {"identity": "scsi-0:0", "path": "/dev/sda", "size_bytes": 107374182400, "name": "système"},
    ],
    "directories": [{"path": "/var/lib/sr", "free_bytes": 5_000_000_000, "total_bytes": 10**10}],
    "data_endpoint": "10.0.0.5:7443",
    "flags": {"secure_boot": True, "tpm": None, "ratio": 0.25},
}


def server(sid: str = "srv-1", role: str = "source", hostname: str = "web-01", **kw) -> ServerRecord:
    values = {
        "id": sid,
        "role": role,
        "hostname": hostname,
        "cert_serial": "0a1b2c",
        "cert_fingerprint": "sha256:" + "ab" * 32,
        "enrolled_at": T0,
    }
    values.update(kw)
    return ServerRecord(**values)


def running_job(store: Store, steps=("a", "b", "c"), params=None, now=T0):
    job = store.create_job(kind="demo", target="vm-1", step_names=steps, params=params or {}, now=now)
    assert store.set_job_status(job.id, expected={"pending"}, new="running", now=now)
    return store.get_job(job.id)


# --- servers --------------------------------------------------------------------------


def test_add_and_get_server_round_trips_every_field(store: Store) -> None:
    record = server(
        inventory=INVENTORY,
        problems=[{"code": "disk-low", "severity": "warning", "message": "5 GB free"}],
        last_heartbeat_at=T0 + timedelta(seconds=5),
        registered_at=T0 + timedelta(seconds=1),
    )
    store.add_server(record)
    got = store.get_server("srv-1")
    assert got == record
    assert got.enrolled_at.tzinfo is not None and got.enrolled_at.utcoffset() == timedelta(0)


def test_add_server_twice_is_a_conflict(store: Store) -> None:
    store.add_server(server())
    with pytest.raises(Conflict):
        store.add_server(server(hostname="other"))
    assert store.get_server("srv-1").hostname == "web-01"


def test_unknown_server_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_server("nope")
    with pytest.raises(NotFound):
        store.register_server("nope", hostname="h", inventory={}, now=T0)
    with pytest.raises(NotFound):
        store.record_heartbeat("nope", problems=[], directories=None, now=T0)
    with pytest.raises(NotFound):
        store.revoke_server("nope", now=T0)


def test_bad_server_input_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.add_server(server(role="configuration-server"))
    with pytest.raises(InvalidInput):
        store.add_server(server(enrolled_at=datetime(2026, 1, 1)))  # naive
    with pytest.raises(InvalidInput):
        store.add_server(server(inventory={"when": T0}))  # not JSON
    with pytest.raises(InvalidInput):
        store.add_server(server(inventory={1: "int key"}))
    with pytest.raises(InvalidInput):
        store.list_servers(role="nobody")
    assert store.list_servers() == []


def test_times_in_other_zones_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    store.add_server(server(enrolled_at=T0.astimezone(plus_two)))
    got = store.get_server("srv-1").enrolled_at
    assert got == T0 and got.utcoffset() == timedelta(0)


def test_list_servers_orders_by_role_then_hostname_and_filters(store: Store) -> None:
    store.add_server(server("s3", "source", "zeta"))
    store.add_server(server("m1", "master-target", "mt-b"))
    store.add_server(server("s1", "source", "alpha"))
    store.add_server(server("p1", "process-server", "ps"))
    store.add_server(server("m2", "master-target", "mt-a"))
    listed = [(s.role, s.hostname) for s in store.list_servers()]
    assert listed == [
        ("master-target", "mt-a"),
        ("master-target", "mt-b"),
        ("process-server", "ps"),
        ("source", "alpha"),
        ("source", "zeta"),
    ]
    assert [s.id for s in store.list_servers(role="source")] == ["s1", "s3"]


def test_register_server_replaces_inventory_and_stamps_times(store: Store) -> None:
    store.add_server(server(inventory={"old": True}))
    now = T0 + timedelta(minutes=3)
    got = store.register_server("srv-1", hostname="web-01.example", inventory=INVENTORY, now=now)
    assert got.hostname == "web-01.example"
    assert got.inventory == INVENTORY
    assert got.registered_at == now and got.last_heartbeat_at == now
    assert store.get_server("srv-1") == got


def test_heartbeat_updates_problems_and_optionally_directories(store: Store) -> None:
    store.add_server(server())
    store.register_server("srv-1", hostname="web-01", inventory=INVENTORY, now=T0)
    problems = [{"code": "clock-skew", "severity": "error", "message": "clock is 40 s ahead"}]
    t1 = T0 + timedelta(seconds=30)
    got = store.record_heartbeat("srv-1", problems=problems, directories=None, now=t1)
    assert got.last_heartbeat_at == t1
    assert got.problems == problems
    assert got.inventory == INVENTORY  # untouched without directories
    assert got.registered_at == T0

    dirs = [{"path": "/var/lib/sr", "free_bytes": 1, "total_bytes": 2}]
    t2 = t1 + timedelta(seconds=30)
    got = store.record_heartbeat("srv-1", problems=[], directories=dirs, now=t2)
    assert got.last_heartbeat_at == t2
    assert got.problems == []
    assert got.inventory == {**INVENTORY, "directories": dirs}
    assert store.get_server("srv-1") == got


def test_heartbeats_in_one_transaction_update_only_servers_of_their_role(store: Store) -> None:
    store.add_server(server())
    store.register_server("srv-1", hostname="web-01", inventory=INVENTORY, now=T0)
    store.add_server(server("ps-1", role="process-server", hostname="ps-01"))
    problems = [{"code": "low-free-space", "severity": "SEVERITY_WARNING", "message": "9 % free"}]
    dirs = [{"path": "/var/lib/sr", "free_bytes": 1, "total_bytes": 2, "note": None}]
    t1 = T0 + timedelta(seconds=10)
    beats = [
        Heartbeat("srv-1", "source", problems=problems, directories=dirs, now=t1),
        Heartbeat("ps-1", "source", problems=[], directories=None, now=t1),  # wrong role
        Heartbeat("nope", "source", problems=[], directories=None, now=t1),  # unknown
        Heartbeat("ps-1", "process-server", problems=[], directories=None, now=t1),
    ]
    assert store.record_heartbeats(beats) == [True, False, False, True]
    got = store.get_server("srv-1")
    assert got.last_heartbeat_at == t1 and got.problems == problems
    assert got.inventory == {**INVENTORY, "directories": dirs}  # only the directories replaced
    assert got.registered_at == T0
    assert store.get_server("ps-1").last_heartbeat_at == t1
    assert store.get_server("ps-1").inventory == {}

    t2 = t1 + timedelta(seconds=10)
    assert store.record_heartbeats([Heartbeat("srv-1", "source", problems=[], directories=None, now=t2)]) == [True]
    got = store.get_server("srv-1")
    assert got.last_heartbeat_at == t2 and got.problems == []
    assert got.inventory == {**INVENTORY, "directories": dirs}  # untouched without directories
    assert store.record_heartbeats([]) == []


def test_a_bad_heartbeat_fails_its_group_and_writes_nothing(store: Store) -> None:
    store.add_server(server())
    good = Heartbeat("srv-1", "source", problems=[], directories=None, now=T0 + timedelta(seconds=10))
    bad = Heartbeat("srv-1", "source", problems=[{"x": float("nan")}], directories=None, now=T0)
    with pytest.raises(InvalidInput):
        store.record_heartbeats([good, bad])
    assert store.get_server("srv-1").last_heartbeat_at is None


def test_a_heartbeat_group_the_database_fails_is_rolled_back_and_unavailable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The group runs on the driver's cursor (store/heartbeat_sql.py): a driver error after the
    # UPDATE must still roll the transaction back and reach the caller as Unavailable, and the
    # store must go on. The counters' read is made to fail in the database itself: on SQLite
    # a missing table; on PostgreSQL the connection is cut, so it cannot even roll back. On
    # PostgreSQL a one-row group is one statement (the update, then the counters): it is cut
    # after its update has run.
    assert isinstance(store, SqlStore)
    store.add_server(server())
    pg = store.engine.dialect.name == "postgresql"
    failing = "SELECT pg_terminate_backend(pg_backend_pid())" if pg else "SELECT name, value FROM no_such_table"
    with monkeypatch.context() as patched:
        patched.setattr(store._heartbeat_sql, "_counters_sql", failing)
        if pg:
            alone = store._heartbeat_sql._alone_sql
            assert alone is not None
            patched.setattr(store._heartbeat_sql, "_alone_sql", alone + (
                " UNION ALL SELECT NULL, CASE WHEN pg_terminate_backend(pg_backend_pid()) THEN 0 END"
                " FROM (SELECT count(*) FROM updated) AS after_the_update"
            ))
        with pytest.raises(Unavailable):
            store.record_heartbeats([Heartbeat("srv-1", "source", problems=[], directories=None, now=T0)])
    assert store.get_server("srv-1").last_heartbeat_at is None
    later = T0 + timedelta(seconds=10)
    for _ in range(3):  # every pooled connection the failure touched works again
        assert store.record_heartbeats([Heartbeat("srv-1", "source", problems=[], directories=None, now=later)])
    assert store.get_server("srv-1").last_heartbeat_at == later


def test_a_heartbeat_group_on_a_dropped_connection_is_written_again_by_the_writer(store: Store) -> None:
    # Groups reuse one connection kept out of the pool, unpinged (store/heartbeat_sql.py).
    # When the database dropped it meanwhile (PostgreSQL restarted; here its backend is
    # terminated, or SQLite's handle closed), the next group fails on it and the writer
    # writes that heartbeat again on a connection from the pool: the agent sees nothing.
    assert isinstance(store, SqlStore)
    store.add_server(server())
    writer = HeartbeatWriter(store)
    assert writer.record(Heartbeat("srv-1", "source", problems=[], directories=None, now=T0))[0]

    def drop_parked() -> object:
        parked = store._heartbeat_sql._parked
        assert parked is not None
        if store.engine.dialect.name == "postgresql":
            pid = parked.driver_connection.info.backend_pid
            with store.engine.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        else:
            parked.driver_connection.close()
        return parked

    parked = drop_parked()
    later = T0 + timedelta(seconds=10)
    assert writer.record(Heartbeat("srv-1", "source", problems=[], directories=None, now=later))[0]
    assert store.get_server("srv-1").last_heartbeat_at == later
    assert store._heartbeat_sql._parked is not parked
    if store.engine.dialect.name == "postgresql":
        drop_parked()  # without the writer, the group's own failure: Unavailable, nothing written
        with pytest.raises(Unavailable):
            store.record_heartbeats([Heartbeat("srv-1", "source", problems=[], directories=None, now=T0)])
        assert store.get_server("srv-1").last_heartbeat_at == later


def test_heartbeat_connections_go_back_to_the_pool_as_they_came_out(store: Store) -> None:
    # The group's connection runs in autocommit mode while the writer has it (PostgreSQL:
    # store/heartbeat_sql.py); the store's other transactions rely on the driver's implicit
    # BEGIN, so one that came back in autocommit mode would commit statement by statement.
    assert isinstance(store, SqlStore)
    store.add_server(server())
    sql = store._heartbeat_sql
    beat = Heartbeat("srv-1", "source", problems=[], directories=None, now=T0)
    pg = store.engine.dialect.name == "postgresql"

    def parked_driver() -> object:
        assert store.record_heartbeats([beat]) == [True]
        assert sql._parked is not None
        return sql._parked.driver_connection

    driver = parked_driver()
    sql.release()  # returned whole
    if pg:
        assert driver.autocommit is False
    driver = parked_driver()
    with pytest.MonkeyPatch.context() as patched:  # a group that fails in the database, connection intact
        patched.setattr(sql, "_counters_sql", "SELECT name, value FROM no_such_table")
        if pg:
            patched.setattr(sql, "_alone_sql", "SELECT name, value FROM no_such_table WHERE %(b_id)s <> ''")
        with pytest.raises((sa.exc.DBAPIError, Unavailable)):  # SQLite: OperationalError, so Unavailable
            store.record_heartbeats([beat])
    assert sql._parked is None
    if pg:
        assert driver.autocommit is False and not driver.closed
    assert store.record_heartbeats([beat]) == [True]


def test_revoke_server_keeps_the_first_revocation_time(store: Store) -> None:
    store.add_server(server())
    first = store.revoke_server("srv-1", now=T0 + timedelta(hours=1))
    assert first.revoked_at == T0 + timedelta(hours=1)
    again = store.revoke_server("srv-1", now=T0 + timedelta(hours=2))
    assert again.revoked_at == T0 + timedelta(hours=1)
    assert store.get_server("srv-1").revoked_at == T0 + timedelta(hours=1)


def test_revoked_server_ids_lists_exactly_the_revoked(store: Store) -> None:
    store.add_server(server())
    store.add_server(server("srv-2"))
    assert store.revoked_server_ids() == []
    store.revoke_server("srv-2", now=T0)
    assert store.revoked_server_ids() == ["srv-2"]



# --- operators ----------------------------------------------------------------------------


def operator(name: str = "alice", identity_id: str = "op-alice-1", role: str = "reader", issued_at=T0) -> OperatorRecord:
    return OperatorRecord(
        identity_id=identity_id, name=name, role=role, cert_serial="0f", issued_at=issued_at,
        expires_at=issued_at + timedelta(days=365),
    )


def test_operators_one_current_certificate_per_name_and_revocation(store: Store) -> None:
    store.add_operator(operator())
    store.add_operator(operator("bob", "op-bob-1", "admin"))
    with pytest.raises(Conflict):
        store.add_operator(operator(identity_id="op-alice-2"))
    with pytest.raises(InvalidInput):
        store.add_operator(operator("carol", "op-carol-1", role="source"))
    assert [(o.name, o.role) for o in store.list_operators()] == [("alice", "reader"), ("bob", "admin")]
    assert store.list_operators()[0] == operator()

    revoked = store.revoke_operator("alice", now=T0 + timedelta(hours=1))
    assert revoked.revoked_at == T0 + timedelta(hours=1) and revoked.identity_id == "op-alice-1"
    assert store.revoked_operator_ids() == ["op-alice-1"]
    assert [o.name for o in store.list_operators()] == ["bob"]
    with pytest.raises(NotFound):
        store.revoke_operator("alice", now=T0)

    store.add_operator(operator(identity_id="op-alice-2", issued_at=T0 + timedelta(hours=2)))  # a new identity
    assert [o.identity_id for o in store.list_operators(include_revoked=True) if o.name == "alice"] == [
        "op-alice-1", "op-alice-2",
    ]
    assert store.revoked_operator_ids() == ["op-alice-1"]

# --- machines -----------------------------------------------------------------------------


def test_upsert_machine_inserts_then_replaces(store: Store) -> None:
    store.add_server(server())
    machine = MachineRecord(
        id="m-1",
        server_id="srv-1",
        hostname="web-01",
        os="Windows Server 2022",
        addresses=["10.0.0.5", "fe80::1"],
        disks=[{"identity": "d0", "path": r"\\.\PhysicalDrive0", "size_bytes": 2**40, "name": "C"}],
        updated_at=T0,
    )
    store.upsert_machine(machine)
    assert store.get_machine("m-1") == machine
    changed = MachineRecord(
        id="m-1",
        server_id="srv-1",
        hostname="web-01b",
        os="Windows Server 2025",
        addresses=[],
        disks=[],
        updated_at=T0 + timedelta(days=1),
    )
    store.upsert_machine(changed)
    assert store.get_machine("m-1") == changed
    assert store.list_machines() == [changed]


def test_machines_list_by_hostname_and_need_their_server(store: Store) -> None:
    store.add_server(server())
    for mid, host in [("m-2", "zulu"), ("m-1", "alpha"), ("m-3", "mike")]:
        store.upsert_machine(MachineRecord(id=mid, server_id="srv-1", hostname=host, os="linux"))
    assert [m.hostname for m in store.list_machines()] == ["alpha", "mike", "zulu"]
    assert store.get_machine("m-1").updated_at is None
    with pytest.raises(NotFound):
        store.upsert_machine(MachineRecord(id="m-9", server_id="ghost", hostname="x", os="linux"))
    with pytest.raises(NotFound):
        store.get_machine("m-9")


# --- jobs: creation and listing ------------------------------------------------------------------


def test_create_job_makes_a_pending_job_with_pending_steps(store: Store) -> None:
    params = {"vm": "web-01", "disks": [1, 2], "nested": {"ok": True, "ratio": 1.5, "none": None}}
    job = store.create_job(
        kind="enable-protection", target="m-1", step_names=["a", "b"], params=params, now=T0
    )
    assert uuid.UUID(job.id).version == 4
    assert (job.kind, job.target, job.status) == ("enable-protection", "m-1", "pending")
    assert job.created_at == job.updated_at == T0
    assert job.params == params
    assert job.version == 1
    assert [(s.index, s.name, s.status, s.attempt, s.lease_owner) for s in job.steps] == [
        (0, "a", "pending", 0, ""),
        (1, "b", "pending", 0, ""),
    ]
    assert store.get_job(job.id) == job
    with pytest.raises(NotFound):
        store.get_job(str(uuid.uuid4()))


def test_list_jobs_newest_first_with_filter_and_limit(store: Store) -> None:
    ids = [
        store.create_job(
            kind="k", target=f"t{i}", step_names=["s"], params={}, now=T0 + timedelta(minutes=i)
        ).id
        for i in range(4)
    ]
    assert [j.id for j in store.list_jobs()] == ids[::-1]
    assert [j.id for j in store.list_jobs(limit=2)] == [ids[3], ids[2]]
    store.set_job_status(ids[1], expected={"pending"}, new="cancelled", now=T0)
    assert [j.id for j in store.list_jobs(statuses={"cancelled"})] == [ids[1]]
    assert [j.id for j in store.list_jobs(statuses=["pending"])] == [ids[3], ids[2], ids[0]]
    assert all(len(j.steps) == 1 for j in store.list_jobs())
    with pytest.raises(InvalidInput):
        store.list_jobs(statuses={"done"})
    with pytest.raises(InvalidInput):
        store.list_jobs(limit=0)


# --- jobs: status compare-and-set ----------------------------------------------------------------------


def test_set_job_status_is_compare_and_set(store: Store) -> None:
    job = store.create_job(kind="k", target="t", step_names=["s"], params={}, now=T0)
    t1 = T0 + timedelta(seconds=1)
    assert store.set_job_status(job.id, expected={"pending"}, new="running", now=t1)
    got = store.get_job(job.id)
    assert (got.status, got.version, got.updated_at) == ("running", 2, t1)
    # Someone else already moved it: the CAS refuses and changes nothing.
    assert not store.set_job_status(job.id, expected={"pending"}, new="cancelled", now=t1)
    assert store.get_job(job.id) == got
    assert store.set_job_status(
        job.id,
        expected={"running"},
        new="compensating",
        now=t1,
        error_code="disk-gone",
        error_message="step 's' failed: disk gone",
    )
    got = store.get_job(job.id)
    assert (got.status, got.error_code, got.error_message, got.version) == (
        "compensating",
        "disk-gone",
        "step 's' failed: disk gone",
        3,
    )
    # Error fields survive a later transition that does not set them.
    assert store.set_job_status(job.id, expected={"compensating"}, new="compensated", now=t1)
    assert store.get_job(job.id).error_code == "disk-gone"


def test_set_job_status_checks_the_transition_table(store: Store) -> None:
    job = store.create_job(kind="k", target="t", step_names=[], params={}, now=T0)
    with pytest.raises(InvalidInput):
        store.set_job_status(job.id, expected={"pending"}, new="succeeded", now=T0)
    with pytest.raises(InvalidInput):
        store.set_job_status(job.id, expected={"succeeded"}, new="running", now=T0)
    with pytest.raises(InvalidInput):
        store.set_job_status(job.id, expected={"pending"}, new="exploded", now=T0)
    with pytest.raises(InvalidInput):
        store.set_job_status(job.id, expected=set(), new="running", now=T0)
    assert store.get_job(job.id).version == 1
    with pytest.raises(NotFound):
        store.set_job_status(str(uuid.uuid4()), expected={"pending"}, new="running", now=T0)


# --- jobs: steps, leases, compare-and-set ------------------------------------------------------------------------------


def test_claim_takes_the_next_pending_step_with_a_lease(store: Store) -> None:
    job = store.create_job(kind="k", target="t", step_names=["a", "b"], params={}, now=T0)
    assert store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0) is None  # pending job
    job = running_job(store)
    step = store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    assert step is not None
    assert (step.status, step.attempt, step.lease_owner) == ("running", 1, "r1")
    assert step.lease_expires_at == T0 + timedelta(seconds=LEASE)
    assert store.get_job(job.id).steps[0] == step
    # Held by r1: nobody else (nor r1 again) can claim it while the lease lives.
    assert store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=T0) is None
    assert store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0) is None
    # Steps run in order: step 1 is not claimable while step 0 is not done.
    assert store.claim_step(job.id, 1, owner="r2", lease_seconds=LEASE, now=T0) is None
    with pytest.raises(NotFound):
        store.claim_step(job.id, 7, owner="r1", lease_seconds=LEASE, now=T0)
    with pytest.raises(NotFound):
        store.claim_step(str(uuid.uuid4()), 0, owner="r1", lease_seconds=LEASE, now=T0)


def test_an_expired_lease_can_be_claimed_again(store: Store) -> None:
    job = running_job(store)
    assert store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    just_before = T0 + timedelta(seconds=LEASE) - timedelta(microseconds=1)
    assert store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=just_before) is None
    later = T0 + timedelta(seconds=LEASE)
    step = store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=later)
    assert step is not None
    assert (step.status, step.attempt, step.lease_owner) == ("running", 2, "r2")
    # The old owner is locked out of everything.
    assert not store.update_step(job.id, 0, owner="r1", now=later, status="succeeded")
    assert not store.renew_lease(job.id, 0, owner="r1", lease_seconds=LEASE, now=later)
    assert store.get_job(job.id).steps[0] == step


def test_two_owners_racing_for_one_step_exactly_one_wins(store: Store) -> None:
    job = running_job(store)
    owners = [f"r{i}" for i in range(8)]
    barrier = threading.Barrier(len(owners))
    results: dict[str, object] = {}

    def claim(owner: str) -> None:
        barrier.wait(timeout=10)
        results[owner] = store.claim_step(job.id, 0, owner=owner, lease_seconds=LEASE, now=T0)

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [o for o, step in results.items() if step is not None]
    assert len(results) == len(owners)
    assert len(winners) == 1
    step = store.get_job(job.id).steps[0]
    assert (step.lease_owner, step.attempt) == (winners[0], 1)


def test_update_step_only_by_the_lease_owner(store: Store) -> None:
    job = running_job(store)
    store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    t1 = T0 + timedelta(seconds=1)
    assert not store.update_step(job.id, 0, owner="r2", now=t1, progress=0.5)
    assert store.update_step(job.id, 0, owner="r1", now=t1, progress=0.5, message="copying")
    step = store.get_job(job.id).steps[0]
    assert (step.progress, step.message, step.status) == (0.5, "copying", "running")
    with pytest.raises(InvalidInput):
        store.update_step(job.id, 0, owner="r1", now=t1, progress=1.5)
    with pytest.raises(InvalidInput):
        store.update_step(job.id, 0, owner="r1", now=t1, status="compensated")  # not from running
    with pytest.raises(InvalidInput):
        store.update_step(job.id, 0, owner="r1", now=t1, status="bogus")
    output = {"vm_ref": "vm-42", "sizes": [1, 2.5], "label": "données"}
    assert store.update_step(job.id, 0, owner="r1", now=t1, status="succeeded", progress=1.0, output=output)
    step = store.get_job(job.id).steps[0]
    assert (step.status, step.lease_owner, step.lease_expires_at) == ("succeeded", "", None)
    assert step.output == output
    # Released: the former owner can no longer write, nor renew.
    assert not store.update_step(job.id, 0, owner="r1", now=t1, message="late")
    assert not store.renew_lease(job.id, 0, owner="r1", lease_seconds=LEASE, now=t1)
    # The next step is now claimable.
    assert store.claim_step(job.id, 1, owner="r2", lease_seconds=LEASE, now=t1) is not None


def test_renew_lease_extends_only_for_the_owner(store: Store) -> None:
    job = running_job(store)
    store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    t1 = T0 + timedelta(seconds=20)
    assert store.renew_lease(job.id, 0, owner="r1", lease_seconds=LEASE, now=t1)
    assert not store.renew_lease(job.id, 0, owner="r2", lease_seconds=LEASE, now=t1)
    assert store.get_job(job.id).steps[0].lease_expires_at == t1 + timedelta(seconds=LEASE)
    # Past the original expiry the renewed lease still protects the step.
    t2 = T0 + timedelta(seconds=LEASE + 1)
    assert store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=t2) is None


def test_every_change_bumps_the_job_version_and_refusals_do_not(store: Store) -> None:
    job = store.create_job(kind="k", target="t", step_names=["a"], params={}, now=T0)
    versions = [store.get_job(job.id).version]

    def changed() -> bool:
        versions.append(store.get_job(job.id).version)
        return versions[-1] == versions[-2] + 1

    assert store.set_job_status(job.id, expected={"pending"}, new="running", now=T0) and changed()
    assert store.claim_step(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0) and changed()
    assert store.update_step(job.id, 0, owner="r1", now=T0, progress=0.3) and changed()
    assert store.renew_lease(job.id, 0, owner="r1", lease_seconds=LEASE, now=T0) and changed()
    assert not store.update_step(job.id, 0, owner="r2", now=T0, progress=0.9)
    assert store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=T0) is None
    assert not store.set_job_status(job.id, expected={"pending"}, new="cancelled", now=T0)
    assert not changed() and versions[-1] == versions[-2]
    assert store.update_step(job.id, 0, owner="r1", now=T0, status="succeeded") and changed()
    assert store.set_job_status(job.id, expected={"running"}, new="succeeded", now=T0) and changed()
    assert versions[-1] == 7


def test_compensation_claims_succeeded_steps_from_the_last_one_back(store: Store) -> None:
    job = running_job(store)
    for i in range(2):
        store.claim_step(job.id, i, owner="r1", lease_seconds=LEASE, now=T0)
        store.update_step(job.id, i, owner="r1", now=T0, status="succeeded", output={"i": i})
    store.claim_step(job.id, 2, owner="r1", lease_seconds=LEASE, now=T0)
    store.update_step(job.id, 2, owner="r1", now=T0, status="failed", error_code="boom", message="no")
    assert store.set_job_status(job.id, expected={"running"}, new="compensating", now=T0)

    assert store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=T0) is None  # not next
    step = store.claim_step(job.id, 1, owner="r2", lease_seconds=LEASE, now=T0)
    assert step is not None
    assert (step.status, step.attempt, step.output) == ("compensating", 2, {"i": 1})
    assert store.update_step(job.id, 1, owner="r2", now=T0, status="compensated")
    step = store.claim_step(job.id, 0, owner="r2", lease_seconds=LEASE, now=T0)
    assert step is not None and step.status == "compensating"
    assert store.update_step(job.id, 0, owner="r2", now=T0, status="compensated")
    assert [s.status for s in store.get_job(job.id).steps] == [
        "compensated",
        "compensated",
        "failed",
    ]
    assert store.runnable_job_ids(now=T0) == [job.id]  # to settle "compensated"


def test_runnable_jobs(store: Store) -> None:
    pending = store.create_job(kind="k", target="t", step_names=["a"], params={}, now=T0)
    held = running_job(store, steps=["a"], now=T0 + timedelta(seconds=1))
    store.claim_step(held.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    done = running_job(store, steps=["a"], now=T0 + timedelta(seconds=2))
    store.claim_step(done.id, 0, owner="r1", lease_seconds=LEASE, now=T0)
    store.update_step(done.id, 0, owner="r1", now=T0, status="succeeded")
    finished = store.create_job(kind="k", target="t", step_names=["a"], params={}, now=T0)
    store.set_job_status(finished.id, expected={"pending"}, new="cancelled", now=T0)

    # pending (to start) and done (to settle), oldest first; held waits on its lease.
    assert store.runnable_job_ids(now=T0) == [pending.id, done.id]
    expired = T0 + timedelta(seconds=LEASE)
    assert store.runnable_job_ids(now=expired) == [pending.id, held.id, done.id]


# --- migrations ----------------------------------------------------------------------------


def test_fresh_database_is_at_head_and_migrating_again_is_a_no_op(store_url: str) -> None:
    first = open_store(store_url)
    try:
        assert isinstance(first, SqlStore)
        assert first.schema_revision() == head_revision() == "0009"
        first.add_server(server())
        first.migrate()
    finally:
        first.close()
    second = open_store(store_url)
    try:
        assert second.schema_revision() == "0009"
        assert second.get_server("srv-1") == server()
    finally:
        second.close()


def test_migrated_schema_matches_the_table_definitions(store: Store) -> None:
    assert isinstance(store, SqlStore)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
        tables = set(sa.inspect(conn).get_table_names())
    assert {"servers", "machines", "jobs", "steps", "alembic_version"} <= tables


def test_step_status_and_job_tables_agree_with_the_states_module() -> None:
    # Not backend-specific, but it is the contract the store enforces.
    assert set(states.JOB_TRANSITIONS) == set(states.JOB_STATUSES)
    assert set(states.STEP_TRANSITIONS) == set(states.STEP_STATUSES)
    for table in states.TRANSITIONS.values():
        for targets in table.values():
            assert targets <= set(table)
