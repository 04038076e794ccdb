"""The controller's replication rules: choosing what to replicate, and what reports add up to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.convert import to_dict
from siterecovery.controller.store import MachineRecord, PairReport, ServerRecord, open_store

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
GiB = 2**30


def _server(sid: str, role: str, **inventory) -> ServerRecord:
    return ServerRecord(
        id=sid, role=role, hostname=f"host-{sid}", cert_serial="01", cert_fingerprint="sha256:00",
        enrolled_at=T0, inventory=inventory,
    )


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    store.add_server(_server("src-1", "source"))
    store.upsert_machine(
        MachineRecord(
            id="src-1", server_id="src-1", hostname="app01", os="Linux",
            disks=[
                {"identity": "wwn-1", "path": "/d/0", "size_bytes": str(10 * GiB), "name": "disk0"},
                {"identity": "wwn-2", "path": "/d/1", "size_bytes": str(GiB), "name": "disk1"},
            ],
        )
    )
    store.add_server(_server("ps-1", "process-server", data_endpoint="127.0.0.1:1001"))
    store.add_server(
        _server(
            "mt-1", "master-target", data_endpoint="127.0.0.1:1002",
            directories=[
                {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds1", "free_bytes": str(20 * GiB)},
                {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds2", "free_bytes": str(GiB)},
                {"kind": "DIRECTORY_KIND_RETENTION", "path": "/ret", "free_bytes": str(GiB)},
            ],
        )
    )
    yield store
    store.close()


def _enable(store, **kw):
    return replication.enable(store, admin_pb2.EnableReplicationRequest(**kw), now=T0)


def test_enable_makes_one_pair_per_disk_under_the_datastore(store):
    pairs = _enable(store, machine="app01")
    assert {p.sync_kind for p in pairs} == {"full"}
    assert [p.disk_name for p in pairs] == ["disk0", "disk1"]
    assert pairs[0].target_path == "/ds1/app01-src-1/disk0.img"
    assert pairs[0].journal_dir == f"/ret/{pairs[0].id}"
    assert (pairs[0].process_server_id, pairs[0].master_target_id, pairs[0].mode) == ("ps-1", "mt-1", "nbd")
    assert pairs[0].policy == {**replication.DEFAULT_POLICY, "scan_interval_seconds": 300}
    (a,) = [x for x in replication.assignments_for(store, "ps-1") if x.pair_id == pairs[0].id]
    assert (a.process_server_endpoint, a.master_target_endpoint, a.disk_size_bytes) == (
        "127.0.0.1:1001", "127.0.0.1:1002", 10 * GiB,
    )
    assert a.desired_state == rpb.PAIR_DESIRED_STATE_REPLICATING and a.sync_kind == rpb.SYNC_KIND_FULL
    assert {x.pair_id for x in replication.assignments_for(store, "src-1")} == {p.id for p in pairs}


def test_the_scan_interval_reaches_the_agents(store):
    (pair,) = _enable(store, machine="app01", disks=["disk0"], mode=rpb.REPLICATION_MODE_SCAN, scan_interval_seconds=30)
    (a,) = replication.assignments_for(store, "src-1")
    assert (a.mode, a.scan_interval_seconds, a.policy.crash_consistent_interval_seconds) == (
        rpb.REPLICATION_MODE_SCAN, 30, 300,
    )


@pytest.mark.parametrize(
    ("kw", "error", "code"),
    [
        ({"machine": "nope"}, errors.NotFound, "machine-not-found"),
        ({"machine": "app01", "disks": ["disk9"]}, errors.NotFound, "disk-not-found"),
        ({"machine": "app01", "datastore": "/elsewhere"}, errors.NotFound, "datastore-not-found"),
        ({"machine": "app01", "datastore": "/ds2"}, errors.PreconditionFailed, "datastore-too-small"),
        ({"machine": "app01", "master_target": "mt-9"}, errors.NotFound, "master-target-not-found"),
        ({"machine": "app01", "group": "../etc"}, errors.InvalidInput, "name-invalid"),
        ({"machine": "app01", "policy": rpb.RecoveryPolicy(crash_consistent_interval_seconds=1)}, errors.InvalidInput, "policy-invalid"),
        ({"machine": "app01", "scan_interval_seconds": 2}, errors.InvalidInput, "policy-invalid"),
    ],
)
def test_enable_refuses_bad_requests_and_stores_nothing(store, kw, error, code):
    with pytest.raises(error) as caught:
        _enable(store, **kw)
    assert caught.value.code == code
    assert store.list_pairs() == []


def test_enable_twice_is_a_conflict(store):
    _enable(store, machine="app01", disks=["disk1"])
    with pytest.raises(errors.Conflict):
        _enable(store, machine="app01", disks=["disk1"])
    assert len(store.list_pairs()) == 1


def _report(pair_id, server_id, role, status: rpb.PairStatus, at=T0) -> PairReport:
    return PairReport(pair_id=pair_id, server_id=server_id, role=role, status=to_dict(status), reported_at=at)


def _stamp(when: datetime):
    status = rpb.PairStatus()
    status.oldest_pending_captured_at.FromDatetime(when)
    return status.oldest_pending_captured_at


def test_view_adds_up_sync_progress_rpo_and_backlogs(store):
    (pair,) = _enable(store, machine="app01", disks=["disk1"])
    now = T0 + timedelta(seconds=5)
    nothing = replication.view(pair, [], hostname="app01", heartbeat_interval=10, now=now)
    assert nothing.state == rpb.PAIR_STATE_INITIAL_SYNC and nothing.reason_code == "waiting-for-source"
    assert not nothing.rpo_known

    source = rpb.PairStatus(
        pair_id=pair.id, state=rpb.PAIR_STATE_INITIAL_SYNC, sync_done_bytes=GiB // 4, sync_total_bytes=GiB,
        backlog_bytes=4096, backlog_frames=1, last_seq=10, oldest_pending_captured_at=_stamp(T0 - timedelta(seconds=3)),
    )
    spool = rpb.PairStatus(pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, backlog_bytes=8192, backlog_frames=2,
                           oldest_pending_captured_at=_stamp(T0 - timedelta(seconds=7)), last_seq=9)
    reports = [_report(pair.id, "src-1", "source", source), _report(pair.id, "ps-1", "process-server", spool)]
    syncing = replication.view(pair, reports, hostname="app01", heartbeat_interval=10, now=now)
    assert syncing.state == rpb.PAIR_STATE_INITIAL_SYNC
    assert syncing.sync_progress == pytest.approx(0.25)
    # As of the reports (made at T0, 5 s ago): the spool's oldest write was 7 s old then.
    assert syncing.rpo_known and syncing.rpo_seconds == pytest.approx(7.0)
    # A process server silent for longer than 3 heartbeats: its oldest write counts from now.
    silent = [reports[0], _report(pair.id, "ps-1", "process-server", spool, at=T0 - timedelta(seconds=40))]
    later = replication.view(pair, silent, hostname="app01", heartbeat_interval=10, now=now)
    assert later.rpo_known and later.rpo_seconds == pytest.approx(12.0)
    assert (syncing.source_backlog_bytes, syncing.spool_backlog_frames, syncing.spooled_seq) == (4096, 2, 9)

    source.state = rpb.PAIR_STATE_REPLICATING
    source.ClearField("oldest_pending_captured_at")
    spool.ClearField("oldest_pending_captured_at")
    # The source is done, but the master target has not reported the pair: nothing to fail over to yet.
    sent = [_report(pair.id, "src-1", "source", source), _report(pair.id, "ps-1", "process-server", spool)]
    unheard = replication.view(pair, sent, hostname="app01", heartbeat_interval=10, now=now)
    assert (unheard.state, unheard.reason_code) == (rpb.PAIR_STATE_INITIAL_SYNC, "waiting-for-target")
    assert unheard.reason == "waiting for the master target to report"
    still_applying = rpb.PairStatus(pair_id=pair.id, state=rpb.PAIR_STATE_INITIAL_SYNC, last_seq=4)
    applying = replication.view(pair, [*sent, _report(pair.id, "mt-1", "master-target", still_applying)],
                                hostname="app01", heartbeat_interval=10, now=now)
    assert (applying.state, applying.reason_code) == (rpb.PAIR_STATE_INITIAL_SYNC, "")
    target = rpb.PairStatus(pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, last_seq=10,
                            points=[rpb.RecoveryPoint(tag_id="t1", seq=10)])
    reports = [
        _report(pair.id, "src-1", "source", source),
        _report(pair.id, "ps-1", "process-server", spool),
        _report(pair.id, "mt-1", "master-target", target),
    ]
    caught_up = replication.view(pair, reports, hostname="app01", heartbeat_interval=10, now=now)
    assert caught_up.state == rpb.PAIR_STATE_REPLICATING
    assert (caught_up.rpo_known, caught_up.rpo_seconds, caught_up.recovery_points) == (True, 0.0, 1)
    # A silent process server: writes may pile up there unseen, so the RPO is unknown.
    late = replication.view(pair, reports, hostname="app01", heartbeat_interval=10, now=T0 + timedelta(minutes=5))
    assert not late.rpo_known

    target.state, target.reason, target.reason_code = rpb.PAIR_STATE_PAUSED, "retention directory /ret is full", "retention-full"
    reports[2] = _report(pair.id, "mt-1", "master-target", target)
    paused = replication.view(pair, reports, hostname="app01", heartbeat_interval=10, now=now)
    assert (paused.state, paused.reason_code) == (rpb.PAIR_STATE_PAUSED, "retention-full")
    assert "master target: retention directory /ret is full" == paused.reason


def test_reports_are_kept_and_points_settle_tag_requests(store):
    (pair,) = _enable(store, machine="app01", disks=["disk1"])
    tag_id, pairs = replication.request_point(store, machine="app01", group="", kind=0, now=T0)
    assert [p.id for p in pairs] == [pair.id]
    (request,) = replication.tag_requests_for(store, "src-1", now=T0)
    assert (request.tag_id, request.kind) == (tag_id, rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)
    mt = pki.Identity(id="mt-1", role=pki.MASTER_TARGET)
    point = rpb.RecoveryPoint(tag_id=tag_id, seq=5, kind=rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)
    replication.record_reports(store, mt, [rpb.PairStatus(pair_id=pair.id, points=[point])], now=T0)
    assert replication.tag_requests_for(store, "src-1", now=T0) == []
    assert [p.tag_id for p in replication.points(store, pair)] == [tag_id]


def test_choose_point():
    points = [
        rpb.RecoveryPoint(tag_id="a", kind=rpb.RECOVERY_POINT_KIND_APP_CONSISTENT),
        rpb.RecoveryPoint(tag_id="b", kind=rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT),
    ]
    assert replication.choose_point(points, "latest") is None
    assert replication.choose_point(points, "latest-crash-consistent").tag_id == "b"
    assert replication.choose_point(points, "latest-app-consistent").tag_id == "a"
    assert replication.choose_point(points, "a").tag_id == "a"
    with pytest.raises(errors.NotFound):
        replication.choose_point(points, "latest-multi-vm-consistent")
    with pytest.raises(errors.NotFound):
        replication.choose_point(points, "zzz")


def test_a_group_point_is_a_barrier_that_commits_when_every_source_holds(store):
    store.add_server(_server("src-2", "source"))
    store.upsert_machine(
        MachineRecord(id="src-2", server_id="src-2", hostname="db01", os="Linux",
                      disks=[{"identity": "wwn-9", "path": "/d/0", "size_bytes": str(GiB), "name": "disk0"}])
    )
    _enable(store, machine="app01", disks=["disk1"], group="erp")
    _enable(store, machine="db01", group="erp")
    tag_id, pairs = replication.request_point(store, machine="", group="erp", kind=0, now=T0, heartbeat_interval=10)
    assert len(pairs) == 2
    (request,) = replication.tag_requests_for(store, "src-1", now=T0)
    assert request.kind == rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT and request.group_id == "erp"
    cut = request.cut_at.ToDatetime(tzinfo=UTC)
    assert cut == T0 + timedelta(seconds=21)
    src1, src2 = (pki.Identity(id=i, role=pki.SOURCE) for i in ("src-1", "src-2"))
    assert replication.hold_barrier(store, src1, tag_id, now=cut)[0] == rpb.BARRIER_OUTCOME_WAIT
    assert replication.hold_barrier(store, src2, tag_id, now=cut)[0] == rpb.BARRIER_OUTCOME_COMMIT
    assert replication.hold_barrier(store, src1, tag_id, now=cut)[0] == rpb.BARRIER_OUTCOME_COMMIT
    outcome, reason = replication.hold_barrier(store, src1, "unknown-tag", now=cut)
    assert outcome == rpb.BARRIER_OUTCOME_ABORT and "expired" in reason
    with pytest.raises(errors.InvalidInput):
        replication.request_point(store, machine="app01", group="erp", kind=0, now=T0)


def test_a_pause_by_the_master_target_is_shown_as_the_cause_not_its_echo(store):
    (pair,) = _enable(store, machine="app01", disks=["disk0"])
    full = rpb.PairStatus(state=rpb.PAIR_STATE_PAUSED, reason="retention directory full", reason_code="retention-full")
    echo = rpb.PairStatus(state=rpb.PAIR_STATE_ERROR, reason="master target refused", reason_code="retention-full")
    other = rpb.PairStatus(state=rpb.PAIR_STATE_ERROR, reason="disk unreadable", reason_code="disk-io")
    ok = rpb.PairStatus(state=rpb.PAIR_STATE_REPLICATING)
    state, reason, code = replication._state(pair, ok, echo, full)
    assert (state, code) == (rpb.PAIR_STATE_PAUSED, "retention-full") and reason.startswith("master target:")
    state, reason, code = replication._state(pair, other, echo, full)
    assert (state, code) == (rpb.PAIR_STATE_ERROR, "disk-io") and reason.startswith("source agent:")


# -- delta pairs --------------------------------------------------------------------------------


def _delta(store, **kw):
    return _enable(store, machine="app01", sync_kind=rpb.SYNC_KIND_DELTA, **kw)


def test_a_delta_pair_onto_an_existing_disk_file(store):
    # disk0 is 10 GiB and /ds2 has 1 GiB free: a delta pair's file is mostly there, space is not checked.
    (pair,) = _delta(store, disks=["disk0"], target_path="/ds2/vms/app01/app01-flat.vmdk")
    assert (pair.sync_kind, pair.target_path) == ("delta", "/ds2/vms/app01/app01-flat.vmdk")
    (a,) = replication.assignments_for(store, "mt-1")
    assert (a.sync_kind, a.target_path) == (rpb.SYNC_KIND_DELTA, "/ds2/vms/app01/app01-flat.vmdk")
    # Relative paths are inside the chosen datastore (or the first).
    (rel,) = _delta(store, disks=["disk1"], datastore="/ds2", target_path="old/disk1.img")
    assert rel.target_path == "/ds2/old/disk1.img"
    # An absolute path may lie in another datastore than the one new files go to.
    store.add_server(_server("src-2", "source"))
    store.upsert_machine(
        MachineRecord(id="src-2", server_id="src-2", hostname="db01", os="Linux",
                      disks=[{"identity": "wwn-9", "path": "/d/0", "size_bytes": str(GiB), "name": "disk0"}])
    )
    (other,) = replication.enable(store, admin_pb2.EnableReplicationRequest(
        machine="db01", sync_kind=rpb.SYNC_KIND_DELTA, datastore="/ds1", target_path="/ds2/db01/disk0.img"), now=T0)
    assert other.target_path == "/ds2/db01/disk0.img"


def test_a_delta_pair_keeps_the_default_layout_without_a_path(store):
    (pair,) = _delta(store, disks=["disk1"])
    assert (pair.sync_kind, pair.target_path) == ("delta", "/ds1/app01-src-1/disk1.img")
    (a,) = replication.assignments_for(store, "src-1")
    assert a.sync_kind == rpb.SYNC_KIND_DELTA
    view = replication.view(pair, [], hostname="app01", heartbeat_interval=10, now=T0)
    assert view.sync_kind == rpb.SYNC_KIND_DELTA


# -- forward protection to Azure ---------------------------------------------------------

SITE_SETTINGS = {
    "subscription_id": "11111111-2222-3333-4444-555555555555",
    "tenant_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    "client_id": "99999999-8888-7777-6666-555555555555",
    "resource_group": "rg-dr",
    "region": "westeurope",
    "vnet": "vnet-dr",
    "subnet": "workloads",
    "storage_account": "srdrstore",
    "container": "replicas",
}


@pytest.fixture
def azure_store(store):
    from siterecovery.controller.store import AzureSiteRecord

    store.add_azure_site(
        AzureSiteRecord(id="az-1", name="dr-west", settings=SITE_SETTINGS, secret="v1:x", created_at=T0, updated_at=T0)
    )
    return store


def test_enable_to_azure_makes_one_blob_per_disk_ended_by_the_process_server(azure_store):
    pairs = _enable(azure_store, machine="app01", azure_site="dr-west")
    assert [p.disk_name for p in pairs] == ["disk0", "disk1"]
    first = pairs[0]
    assert (first.target_kind, first.master_target_id, first.process_server_id, first.journal_dir) == (
        "azure-page-blob", "ps-1", "ps-1", "",
    )
    assert first.target_options == {
        "azure_site_id": "az-1", "azure_site": "dr-west", "storage_account": "srdrstore",
        "container": "replicas", "blob_name": "app01-src-1/disk0.vhd",
    }
    assert first.target_path == "https://srdrstore.blob.core.windows.net/replicas/app01-src-1/disk0.vhd"
    (a,) = [x for x in replication.assignments_for(azure_store, "ps-1") if x.pair_id == first.id]
    assert a.target_kind == rpb.TARGET_KIND_AZURE_PAGE_BLOB
    assert (a.azure_blob.site, a.azure_blob.storage_account, a.azure_blob.container, a.azure_blob.blob_name) == (
        "dr-west", "srdrstore", "replicas", "app01-src-1/disk0.vhd",
    )
    assert a.master_target_id == "ps-1"
    # A master target hears nothing of it.
    assert replication.assignments_for(azure_store, "mt-1") == []


def test_a_pair_to_a_master_target_says_so_in_its_assignment(store):
    _enable(store, machine="app01", disks=["disk1"])
    (a,) = replication.assignments_for(store, "mt-1")
    assert a.target_kind == rpb.TARGET_KIND_MASTER_TARGET and not a.HasField("azure_blob")


@pytest.mark.parametrize(
    ("kw", "error", "code"),
    [
        ({"disks": ["disk0"], "mode": rpb.REPLICATION_MODE_SCAN}, errors.InvalidInput, "sync-kind-invalid"),
        ({"disks": ["disk0"], "sync_kind": 7}, errors.InvalidInput, "sync-kind-invalid"),
        ({"disks": ["disk0"], "target_path": "/ds1/../etc/passwd"}, errors.InvalidInput, "path-traversal"),
        ({"disks": ["disk0"], "target_path": "../x.img"}, errors.InvalidInput, "path-traversal"),
        ({"disks": ["disk0"], "target_path": "/etc/passwd"}, errors.InvalidInput, "path-outside"),
        ({"disks": ["disk0"], "target_path": "/ds1"}, errors.InvalidInput, "path-outside"),
        ({"disks": ["disk0"], "target_path": "/ds10/x.img"}, errors.InvalidInput, "path-outside"),
        ({"disks": ["disk0"], "target_path": "/ds1/x\0.img"}, errors.InvalidInput, "path-invalid"),
        ({"target_path": "/ds1/x.img"}, errors.InvalidInput, "target-path-one-disk"),
    ],
)
def test_delta_requests_are_checked_before_anything_is_stored(store, kw, error, code):
    kw.setdefault("sync_kind", rpb.SYNC_KIND_DELTA)
    with pytest.raises(error) as caught:
        _enable(store, machine="app01", **kw)
    assert caught.value.code == code, caught.value
    assert caught.value.hint or code in ("path-invalid", "sync-kind-invalid")
    assert store.list_pairs() == []


def test_a_target_file_written_by_another_pair_is_a_conflict(store):
    (first,) = _enable(store, machine="app01", disks=["disk1"], target_path="/ds1/shared.img")
    with pytest.raises(errors.Conflict) as caught:
        _delta(store, disks=["disk0"], target_path="shared.img")
    assert caught.value.code == "target-in-use" and first.id in caught.value.message
    assert len(store.list_pairs()) == 1


def test_the_view_shows_what_the_delta_sync_did(store):
    (pair,) = _delta(store, disks=["disk1"])
    source = rpb.PairStatus(
        pair_id=pair.id, state=rpb.PAIR_STATE_INITIAL_SYNC, sync_done_bytes=GiB // 2, sync_total_bytes=GiB,
        sync_compared_bytes=GiB // 2, sync_differing_bytes=3 * 65536, sync_hash_bytes=8192 * 16,
        sync_sent_bytes=2 * 65536,
    )
    view = replication.view(pair, [_report(pair.id, "src-1", "source", source)], hostname="app01",
                            heartbeat_interval=10, now=T0)
    assert (view.sync_kind, view.sync_compared_bytes, view.sync_differing_bytes, view.sync_hash_bytes,
            view.sync_sent_bytes) == (rpb.SYNC_KIND_DELTA, GiB // 2, 3 * 65536, 8192 * 16, 2 * 65536)
    assert view.sync_progress == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kw", "error", "code"),
    [
        ({"azure_site": "nowhere"}, errors.NotFound, "azure-site-not-found"),
        ({"azure_site": "dr-west", "master_target": "mt-1"}, errors.InvalidInput, "azure-target-conflict"),
        ({"azure_site": "dr-west", "datastore": "/ds1"}, errors.InvalidInput, "azure-target-conflict"),
        ({"azure_site": "x" * 300}, errors.InvalidInput, "name-invalid"),
        ({"azure_site": "dr\x00west"}, errors.InvalidInput, "name-invalid"),
        ({"azure_site": "dr-west", "disks": ["../x"]}, errors.NotFound, "disk-not-found"),
    ],
)
def test_enable_to_azure_refuses_bad_requests_and_stores_nothing(azure_store, kw, error, code):
    with pytest.raises(error) as caught:
        _enable(azure_store, machine="app01", **kw)
    assert caught.value.code == code
    assert azure_store.list_pairs() == []


def test_enable_to_azure_refuses_a_disk_a_page_blob_cannot_hold_and_a_blob_in_use(azure_store):
    azure_store.upsert_machine(
        MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux", disks=[
            {"identity": "wwn-1", "path": "/d/0", "size_bytes": str(GiB + 100), "name": "odd"},
            {"identity": "wwn-2", "path": "/d/1", "size_bytes": str(GiB), "name": "disk1"},
        ])
    )
    with pytest.raises(errors.PreconditionFailed) as caught:
        _enable(azure_store, machine="app01", azure_site="dr-west")
    assert caught.value.code == "azure-disk-size" and azure_store.list_pairs() == []
    (pair,) = _enable(azure_store, machine="app01", azure_site="dr-west", disks=["disk1"])
    # The same machine's disk under a new identity would land on the same blob.
    azure_store.upsert_machine(
        MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux", disks=[
            {"identity": "wwn-3", "path": "/d/1", "size_bytes": str(GiB), "name": "disk1"},
        ])
    )
    with pytest.raises(errors.Conflict) as caught:
        _enable(azure_store, machine="app01", azure_site="dr-west")
    assert caught.value.code == "pair-exists" and pair.id in caught.value.message


URL = "https://srdrstore.blob.core.windows.net/replicas"


def test_a_delta_pair_to_azure_goes_onto_the_blob_an_earlier_pair_left(azure_store):
    (first,) = _enable(azure_store, machine="app01", azure_site="dr-west", disks=["disk1"])
    azure_store.delete_pair(first.id)  # `srctl replication disable`: the blob stays
    # The old pair's URL as it stored it: the same blob, and the same shape as a full pair's.
    (again,) = _delta(azure_store, azure_site="dr-west", disks=["disk1"], target_path=first.target_path)
    assert (again.sync_kind, again.target_kind, again.target_path) == ("delta", "azure-page-blob", first.target_path)
    assert again.target_options == first.target_options and again.id != first.id
    assert (again.master_target_id, again.journal_dir) == ("ps-1", "")
    (a,) = [x for x in replication.assignments_for(azure_store, "ps-1") if x.pair_id == again.id]
    assert a.sync_kind == rpb.SYNC_KIND_DELTA and a.target_kind == rpb.TARGET_KIND_AZURE_PAGE_BLOB
    assert a.azure_blob.blob_name == "app01-src-1/disk1.vhd"
    view = replication.view(again, [], hostname="app01", heartbeat_interval=10, now=T0)
    assert (view.sync_kind, view.target_path) == (rpb.SYNC_KIND_DELTA, first.target_path)
    azure_store.delete_pair(again.id)

    # A blob name inside the site's container; without a target path, the default layout.
    (named,) = _delta(azure_store, azure_site="dr-west", disks=["disk0"], target_path="older/app01-disk0.vhd")
    assert named.target_path == f"{URL}/older/app01-disk0.vhd"
    assert named.target_options["blob_name"] == "older/app01-disk0.vhd"
    (default,) = _delta(azure_store, azure_site="dr-west", disks=["disk1"])
    assert default.target_path == first.target_path and default.sync_kind == "delta"


@pytest.mark.parametrize(
    ("kw", "error", "code"),
    [
        # Another storage account, another container, another endpoint: not the site's blob.
        ({"target_path": "https://otherstore.blob.core.windows.net/replicas/app01-src-1/disk1.vhd"},
         errors.InvalidInput, "azure-blob-outside"),
        ({"target_path": "https://srdrstore.blob.core.windows.net/other/app01-src-1/disk1.vhd"},
         errors.InvalidInput, "azure-blob-outside"),
        ({"target_path": "http://srdrstore.blob.core.windows.net/replicas/app01-src-1/disk1.vhd"},
         errors.InvalidInput, "azure-blob-outside"),
        ({"target_path": "https://srdrstore.blob.core.windows.net.evil.example/replicas/x.vhd"},
         errors.InvalidInput, "azure-blob-outside"),
        # Traversal, in a URL or a name.
        ({"target_path": f"{URL}/../other/disk1.vhd"}, errors.InvalidInput, "path-traversal"),
        ({"target_path": "app01/../../x.vhd"}, errors.InvalidInput, "path-traversal"),
        ({"target_path": "../x.vhd"}, errors.InvalidInput, "path-traversal"),
        # Names the default layout would not make.
        ({"target_path": "/app01/disk1.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "app01//disk1.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "app01/disk1.img"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "app01/.hidden.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "app 01/disk1.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "app01/disk\x00.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": "a/" * 600 + "d.vhd"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": f"{URL}/"}, errors.InvalidInput, "azure-blob-name-invalid"),
        ({"target_path": f"{URL}/app01/disk1.vhd?sv=2024&sig=SECRET"}, errors.InvalidInput, "azure-blob-name-invalid"),
        # One blob names one disk; a delta sync needs nbd mode; the site's rules still hold.
        ({"target_path": "app01/disk1.vhd", "disks": []}, errors.InvalidInput, "target-path-one-disk"),
        ({"mode": rpb.REPLICATION_MODE_SCAN}, errors.InvalidInput, "sync-kind-invalid"),
        ({"target_path": "app01/disk1.vhd", "master_target": "mt-1"}, errors.InvalidInput, "azure-target-conflict"),
    ],
)
def test_a_delta_pair_to_azure_is_checked_before_anything_is_stored(azure_store, kw, error, code):
    request = {"azure_site": "dr-west", "disks": ["disk1"], "sync_kind": rpb.SYNC_KIND_DELTA, **kw}
    if not request["disks"]:
        del request["disks"]
    with pytest.raises(error) as caught:
        _enable(azure_store, machine="app01", **request)
    assert caught.value.code == code, caught.value
    assert caught.value.hint, caught.value
    assert "SECRET" not in str(caught.value)
    assert azure_store.list_pairs() == []


def test_a_blob_another_live_pair_writes_is_refused_by_url_and_by_name(azure_store):
    (live,) = _enable(azure_store, machine="app01", azure_site="dr-west", disks=["disk1"])
    for path in (live.target_path, "app01-src-1/disk1.vhd"):
        with pytest.raises(errors.Conflict) as caught:
            _delta(azure_store, azure_site="dr-west", disks=["disk0"], target_path=path)
        assert caught.value.code == "pair-exists" and live.id in caught.value.message
        assert "disable" in caught.value.hint
    assert [p.id for p in azure_store.list_pairs()] == [live.id]


def test_the_process_server_ends_an_azure_pair_its_report_is_the_targets(azure_store):
    (pair,) = _enable(azure_store, machine="app01", disks=["disk1"], azure_site="dr-west")
    tag_id, _ = replication.request_point(azure_store, machine="app01", group="", kind=0, now=T0)
    source = rpb.PairStatus(pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, last_seq=12)
    point = rpb.RecoveryPoint(tag_id=tag_id, seq=11, kind=rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)
    ps_status = rpb.PairStatus(pair_id=pair.id, state=rpb.PAIR_STATE_REPLICATING, last_seq=12, acked_seq=11,
                               points=[point], applied_bytes_total=GiB)
    replication.record_reports(azure_store, pki.Identity(id="src-1", role=pki.SOURCE), [source], now=T0)
    replication.record_reports(azure_store, pki.Identity(id="ps-1", role=pki.PROCESS_SERVER), [ps_status], now=T0)
    # The point settles the tag request, and is the pair's.
    assert replication.tag_requests_for(azure_store, "src-1", now=T0) == []
    assert [p.tag_id for p in replication.points(azure_store, pair)] == [tag_id]
    view = replication.view(pair, azure_store.pair_reports(pair.id), hostname="app01", heartbeat_interval=10, now=T0)
    assert (view.state, view.spooled_seq, view.applied_seq, view.recovery_points, view.applied_bytes_total) == (
        rpb.PAIR_STATE_REPLICATING, 12, 11, 1, GiB,
    )
    ps_status.state = rpb.PAIR_STATE_INITIAL_SYNC
    replication.record_reports(azure_store, pki.Identity(id="ps-1", role=pki.PROCESS_SERVER), [ps_status], now=T0)
    view = replication.view(pair, azure_store.pair_reports(pair.id), hostname="app01", heartbeat_interval=10, now=T0)
    assert view.state == rpb.PAIR_STATE_INITIAL_SYNC


def test_a_spools_points_do_not_settle_a_master_target_pairs_tag_requests(store):
    (pair,) = _enable(store, machine="app01", disks=["disk1"])
    tag_id, _ = replication.request_point(store, machine="app01", group="", kind=0, now=T0)
    fake = rpb.PairStatus(pair_id=pair.id, points=[rpb.RecoveryPoint(tag_id=tag_id, seq=1)])
    replication.record_reports(store, pki.Identity(id="ps-1", role=pki.PROCESS_SERVER), [fake], now=T0)
    assert [r.tag_id for r in replication.tag_requests_for(store, "src-1", now=T0)] == [tag_id]
    assert replication.points(store, pair) == []


def _reenrolled(store, machine_id: str, hostname: str = "app01") -> None:
    """The same machine's source agent enrolled again: a new identity, a new machine row, the same name."""
    store.add_server(_server(machine_id, "source"))
    store.upsert_machine(MachineRecord(
        id=machine_id, server_id=machine_id, hostname=hostname, os="Linux",
        disks=[{"identity": f"wwn-{machine_id}", "path": "/d/0", "size_bytes": str(GiB), "name": "disk0"}],
    ))


def test_a_removed_agents_machine_does_not_make_its_name_ambiguous(store):
    store.revoke_server("src-1", now=T0)  # `srctl servers remove` after a failback
    _reenrolled(store, "src-2")
    assert replication.resolve_machine(store, "app01").id == "src-2"
    assert replication.resolve_machine(store, "src-1").id == "src-1"  # its id still names the old one
    assert {p.machine_id for p in _enable(store, machine="app01")} == {"src-2"}


def test_two_live_machines_of_one_name_are_ambiguous_and_a_removed_one_alone_is_not_found(store):
    _reenrolled(store, "src-2")
    with pytest.raises(errors.Conflict) as ambiguous:
        replication.resolve_machine(store, "app01")
    assert ambiguous.value.code == "machine-ambiguous" and "src-1" in ambiguous.value.hint
    store.revoke_server("src-1", now=T0)
    store.revoke_server("src-2", now=T0)
    with pytest.raises(errors.NotFound) as gone:
        replication.resolve_machine(store, "app01")
    assert gone.value.code == "machine-not-found" and "removed" in gone.value.message
