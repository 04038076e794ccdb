"""The replication part of the store contract: pairs, reports, tag requests."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.store import (
    ChangeCounters,
    Heartbeat,
    MachineRecord,
    PairRecord,
    ServerRecord,
    SqlStore,
    Store,
    TagRequestRecord,
    open_store,
)
from siterecovery.controller.store.base import (
    BARRIER_COMMITTED,
    BARRIER_WAIT,
    PairsSnapshot,
    RecordedHeartbeats,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _server(sid: str, role: str) -> ServerRecord:
    return ServerRecord(
        id=sid, role=role, hostname=sid, cert_serial="01", cert_fingerprint="sha256:00", enrolled_at=T0
    )


@pytest.fixture
def site(store: Store) -> Store:
    for sid, role in (("src-1", "source"), ("src-2", "source"), ("ps-1", "process-server"), ("mt-1", "master-target")):
        store.add_server(_server(sid, role))
    for sid in ("src-1", "src-2"):
        store.upsert_machine(MachineRecord(id=sid, server_id=sid, hostname=sid, os="Linux"))
    return store


def pair(pid: str = "pair-1", machine: str = "src-1", disk: str = "disk0", **kw) -> PairRecord:
    values = {
        "id": pid,
        "machine_id": machine,
        "source_server_id": machine,
        "disk_name": disk,
        "disk_identity": f"id-{machine}-{disk}",
        "disk_size_bytes": 10 * 2**30,
        "mode": "nbd",
        "process_server_id": "ps-1",
        "master_target_id": "mt-1",
        "target_path": f"/ds/{machine}/{disk}.img",
        "journal_dir": f"/ret/{pid}",
        "created_at": T0,
        "updated_at": T0,
        "policy": {"crash_consistent_interval_seconds": 300},
    }
    values.update(kw)
    return PairRecord(**values)


def test_create_get_and_list_pairs(site: Store) -> None:
    created = site.create_pair(pair())
    assert created == pair()
    assert site.get_pair("pair-1") == pair()
    site.create_pair(pair("pair-2", machine="src-2"))
    assert [p.id for p in site.list_pairs()] == ["pair-1", "pair-2"]
    assert [p.id for p in site.list_pairs(machine_id="src-2")] == ["pair-2"]
    assert [p.id for p in site.list_pairs(server_id="src-1")] == ["pair-1"]
    assert [p.id for p in site.list_pairs(server_id="ps-1")] == ["pair-1", "pair-2"]
    assert [p.id for p in site.list_pairs(server_id="mt-1")] == ["pair-1", "pair-2"]
    assert site.list_pairs(server_id="nobody") == []


def test_a_disk_has_at_most_one_pair(site: Store) -> None:
    site.create_pair(pair())
    with pytest.raises(Conflict) as same_disk:
        site.create_pair(pair("pair-9"))
    assert same_disk.value.code == "pair-exists"
    with pytest.raises(Conflict):
        site.create_pair(pair("pair-1", disk="disk1"))
    assert [p.id for p in site.list_pairs()] == ["pair-1"]


def test_pair_input_is_checked(site: Store) -> None:
    with pytest.raises(NotFound):
        site.create_pair(pair(machine="ghost"))
    with pytest.raises(NotFound):
        site.create_pair(pair(master_target_id="ghost"))
    with pytest.raises(InvalidInput):
        site.create_pair(pair(mode="telepathy"))
    with pytest.raises(InvalidInput):
        site.create_pair(pair(disk_size_bytes=0))
    assert site.list_pairs() == []
    with pytest.raises(NotFound):
        site.get_pair("pair-1")


def test_desired_state_and_delete(site: Store) -> None:
    site.create_pair(pair())
    later = T0 + timedelta(minutes=1)
    paused = site.set_pair_desired_state("pair-1", "paused", now=later)
    assert (paused.desired_state, paused.updated_at) == ("paused", later)
    with pytest.raises(InvalidInput):
        site.set_pair_desired_state("pair-1", "asleep", now=later)
    with pytest.raises(NotFound):
        site.set_pair_desired_state("pair-9", "paused", now=later)
    site.record_pair_reports("mt-1", "master-target", {"pair-1": {"lastSeq": "5"}}, now=later)
    site.add_tag_requests([TagRequestRecord("pair-1", "t1", "crash-consistent", T0, T0 + timedelta(hours=1))])
    site.delete_pair("pair-1")
    assert site.list_pairs() == []
    assert site.pair_reports("pair-1") == []
    with pytest.raises(NotFound):
        site.delete_pair("pair-1")


def test_reports_replace_per_agent_and_ignore_strangers(site: Store) -> None:
    site.create_pair(pair())
    site.create_pair(pair("pair-2", machine="src-2", process_server_id="ps-1"))
    site.record_pair_reports("src-1", "source", {"pair-1": {"state": "INITIAL_SYNC"}}, now=T0)
    site.record_pair_reports("mt-1", "master-target", {"pair-1": {"lastSeq": "1"}}, now=T0)
    later = T0 + timedelta(seconds=10)
    site.record_pair_reports("mt-1", "master-target", {"pair-1": {"lastSeq": "7"}}, now=later)
    # src-1 takes no part in pair-2, and pair-9 does not exist: both ignored.
    site.record_pair_reports("src-1", "source", {"pair-2": {"x": 1}, "pair-9": {"x": 1}}, now=later)
    reports = {r.server_id: r for r in site.pair_reports("pair-1")}
    assert set(reports) == {"src-1", "mt-1"}
    assert reports["mt-1"].status == {"lastSeq": "7"}
    assert reports["mt-1"].reported_at == later
    assert reports["src-1"].role == "source"
    assert site.pair_reports("pair-2") == []
    # Every pair's reports in one read, ordered by pair and server.
    site.record_pair_reports("ps-1", "process-server", {"pair-2": {"lastSeq": "3"}}, now=later)
    assert [(r.pair_id, r.server_id) for r in site.pair_reports()] == [
        ("pair-1", "mt-1"), ("pair-1", "src-1"), ("pair-2", "ps-1"),
    ]


def test_tag_requests_go_to_the_source_until_removed_or_expired(site: Store) -> None:
    site.create_pair(pair())
    site.create_pair(pair("pair-2", machine="src-2"))
    hour = timedelta(hours=1)
    site.add_tag_requests(
        [
            TagRequestRecord("pair-1", "g1", "multi-vm-consistent", T0, T0 + hour, group_id="grp"),
            TagRequestRecord("pair-2", "g1", "multi-vm-consistent", T0, T0 + hour, group_id="grp"),
            TagRequestRecord("pair-1", "t2", "crash-consistent", T0 + timedelta(seconds=1), T0 + timedelta(minutes=1)),
        ]
    )
    with pytest.raises(Conflict):
        site.add_tag_requests([TagRequestRecord("pair-1", "g1", "crash-consistent", T0, T0 + hour)])
    with pytest.raises(NotFound):
        site.add_tag_requests([TagRequestRecord("pair-9", "x", "crash-consistent", T0, T0 + hour)])
    assert [(r.pair_id, r.tag_id) for r in site.tag_requests(source_server_id="src-1", now=T0)] == [
        ("pair-1", "g1"),
        ("pair-1", "t2"),
    ]
    # Expired requests are not delivered, and removal sweeps them.
    after = T0 + timedelta(minutes=2)
    assert [r.tag_id for r in site.tag_requests(source_server_id="src-1", now=after)] == ["g1"]
    site.remove_tag_requests("pair-1", ["g1"], now=after)
    assert site.tag_requests(source_server_id="src-1", now=T0) == []
    assert [r.group_id for r in site.tag_requests(source_server_id="src-2", now=after)] == ["grp"]


def test_upgrade_from_0001_keeps_the_inventory(store_url: str) -> None:
    old = SqlStore(store_url)
    try:
        old.migrate("0001")
        old.add_server(_server("src-1", "source"))
    finally:
        old.close()
    upgraded = open_store(store_url)
    try:
        assert upgraded.get_server("src-1") == _server("src-1", "source")
        upgraded.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="h", os=""))
        upgraded.add_server(_server("ps-1", "process-server"))
        upgraded.add_server(_server("mt-1", "master-target"))
        assert upgraded.create_pair(replace(pair())) == pair()
    finally:
        upgraded.close()


def test_a_barrier_commits_once_every_source_holds(site: Store) -> None:
    site.create_pair(pair())
    site.create_pair(pair("pair-2", machine="src-2"))
    site.create_pair(pair("pair-3", machine="src-2", disk="disk1"))
    cut = T0 + timedelta(seconds=5)
    site.add_tag_requests(
        [
            TagRequestRecord(p, "mv1", "multi-vm-consistent", T0, cut + timedelta(seconds=30), group_id="g", cut_at=cut)
            for p in ("pair-1", "pair-2", "pair-3")
        ]
    )
    (delivered,) = site.tag_requests(source_server_id="src-1", now=T0)
    assert (delivered.cut_at, delivered.outcome, delivered.held_at) == (cut, "", None)
    assert site.hold_barrier("mv1", "src-1", now=cut) == ""
    assert site.hold_barrier("mv1", "src-1", now=cut) == ""  # asking again changes nothing
    assert site.hold_barrier("mv1", "src-2", now=cut) == "committed"  # holds both its pairs
    assert site.hold_barrier("mv1", "src-1", now=cut) == "committed"
    with pytest.raises(NotFound):
        site.hold_barrier("mv1", "ps-1", now=cut)
    with pytest.raises(NotFound):
        site.hold_barrier("nope", "src-1", now=cut)


def test_a_barrier_that_expires_before_everyone_holds_aborts_for_good(site: Store) -> None:
    site.create_pair(pair())
    site.create_pair(pair("pair-2", machine="src-2"))
    cut = T0 + timedelta(seconds=5)
    expires = cut + timedelta(seconds=10)
    site.add_tag_requests(
        [TagRequestRecord(p, "mv2", "multi-vm-consistent", T0, expires, cut_at=cut) for p in ("pair-1", "pair-2")]
    )
    assert site.hold_barrier("mv2", "src-1", now=cut) == ""
    assert site.hold_barrier("mv2", "src-2", now=expires) == "aborted"
    assert site.hold_barrier("mv2", "src-1", now=cut) == "aborted"


# --- change counters and snapshots (what heartbeat answers are built from) ------------------


def _counted(store: Store) -> tuple[int, int]:
    counters = store.change_counters()
    return counters.pairs, counters.tag_requests


def test_every_change_to_pairs_is_counted_with_it(site: Store) -> None:
    assert _counted(site) == (0, 0)
    site.create_pair(pair())
    assert _counted(site) == (1, 0)
    site.set_pair_desired_state("pair-1", "paused", now=T0)
    assert _counted(site) == (2, 0)
    with pytest.raises(NotFound):
        site.set_pair_desired_state("nope", "paused", now=T0)
    with pytest.raises(Conflict):
        site.create_pair(pair("pair-9"))
    assert _counted(site) == (2, 0), "a refused change counts nothing"
    site.add_tag_requests([TagRequestRecord("pair-1", "t1", "crash-consistent", T0, T0 + timedelta(minutes=10))])
    assert _counted(site) == (2, 1)
    site.delete_pair("pair-1")
    assert _counted(site) == (3, 2), "its tag requests went with it"


def test_a_data_endpoint_change_counts_only_for_a_server_a_pair_names(site: Store) -> None:
    site.register_server("ps-1", hostname="ps-1", inventory={"data_endpoint": "ps:1"}, now=T0)
    assert _counted(site) == (0, 0), "no pair names it yet"
    site.create_pair(pair())
    site.register_server("ps-1", hostname="ps-1", inventory={"data_endpoint": "ps:1", "disks": []}, now=T0)
    site.register_server("src-1", hostname="src-1", inventory={"data_endpoint": "src:1"}, now=T0)
    assert _counted(site) == (1, 0), "same endpoint, or a source's (assignments do not carry it)"
    site.register_server("ps-1", hostname="ps-1", inventory={"data_endpoint": "ps:2"}, now=T0)
    site.register_server("mt-1", hostname="mt-1", inventory={"data_endpoint": "mt:1"}, now=T0)
    assert _counted(site) == (3, 0)


def test_tag_request_removals_and_decisions_count_only_when_something_changed(site: Store) -> None:
    site.create_pair(pair())
    site.create_pair(pair("pair-2", machine="src-2"))
    later = T0 + timedelta(seconds=30)
    site.add_tag_requests([
        TagRequestRecord("pair-1", "b1", "multi-vm-consistent", T0, later, group_id="g", cut_at=T0),
        TagRequestRecord("pair-2", "b1", "multi-vm-consistent", T0, later, group_id="g", cut_at=T0),
    ])
    assert _counted(site) == (2, 1)
    site.remove_tag_requests("pair-1", ["unknown"], now=T0)
    assert _counted(site) == (2, 1), "nothing removed"
    assert site.hold_barrier("b1", "src-1", now=T0) == BARRIER_WAIT
    assert _counted(site) == (2, 1), "held, not decided: the answers do not change"
    assert site.hold_barrier("b1", "src-2", now=T0) == BARRIER_COMMITTED
    assert _counted(site) == (2, 2)
    site.remove_tag_requests("pair-1", ["b1"], now=T0)
    assert _counted(site) == (2, 3)
    site.remove_tag_requests("pair-2", [], now=later)  # expired
    assert _counted(site) == (2, 4)


def test_a_heartbeat_group_reads_the_counters_after_its_writes(site: Store) -> None:
    beat = Heartbeat("src-1", "source", problems=[], directories=None, now=T0)
    assert site.record_heartbeat_group([beat]) == RecordedHeartbeats([True], ChangeCounters(0, 0))
    site.create_pair(pair())
    site.add_tag_requests([TagRequestRecord("pair-1", "t1", "crash-consistent", T0, T0 + timedelta(minutes=10))])
    ghost = Heartbeat("ghost", "source", problems=[], directories=None, now=T0)
    assert site.record_heartbeat_group([beat, ghost]) == RecordedHeartbeats([True, False], ChangeCounters(1, 1))
    assert site.record_heartbeat_group([]) == RecordedHeartbeats([], ChangeCounters(1, 1))


def test_snapshots_hold_every_pair_endpoint_and_tag_request_with_their_counters(site: Store) -> None:
    empty = site.pairs_snapshot()
    assert empty == PairsSnapshot(ChangeCounters(0, 0), (), {})
    site.register_server("ps-1", hostname="ps-1", inventory={"data_endpoint": "ps:1"}, now=T0)
    site.create_pair(pair("pair-2", machine="src-2"))
    site.create_pair(pair())
    snapshot = site.pairs_snapshot()
    assert snapshot.counters == ChangeCounters(2, 0)
    assert list(snapshot.pairs) == site.list_pairs()
    assert snapshot.endpoints == {"ps-1": "ps:1", "mt-1": ""}

    expired = TagRequestRecord("pair-1", "old", "crash-consistent", T0 - timedelta(hours=1), T0 - timedelta(minutes=1))
    fresh = [
        TagRequestRecord("pair-2", "t2", "crash-consistent", T0 + timedelta(seconds=1), T0 + timedelta(minutes=10)),
        TagRequestRecord("pair-1", "t1", "crash-consistent", T0, T0 + timedelta(minutes=10)),
    ]
    site.add_tag_requests([expired, *fresh])
    tags = site.tag_requests_snapshot()
    assert tags.counters == ChangeCounters(2, 1)
    assert [(source, r.tag_id) for source, r in tags.requests] == [("src-1", "old"), ("src-1", "t1"), ("src-2", "t2")]
    assert [r for _, r in tags.requests if r.pair_id == "pair-1" and r.tag_id == "t1"] == site.tag_requests(
        source_server_id="src-1", now=T0
    )


def test_backups_leave_the_counters_out_and_a_restore_counts_itself(site: Store, tmp_path) -> None:
    site.create_pair(pair())
    revision, tables = site.export_tables()
    assert "change_counters" not in tables
    restored = open_store(f"sqlite:///{tmp_path}/restored.db")
    try:
        restored.import_tables(tables)
        assert _counted(restored) == (1, 1)
        assert restored.list_pairs() == site.list_pairs()
    finally:
        restored.close()
