"""The protection part of the store contract: groups and their twins, plans, protected machines, signals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, create_job
from siterecovery.controller.store import (
    MachineRecord,
    ProtectedItemRecord,
    ProtectionGroupRecord,
    RecoveryPlanRecord,
    ServerRecord,
    Store,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def site(store: Store) -> Store:
    store.add_server(ServerRecord(id="src-1", role="source", hostname="app01", cert_serial="01",
                                  cert_fingerprint="sha256:00", enrolled_at=T0))
    store.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux"))
    store.add_protection_groups(
        ProtectionGroupRecord(id="pg-1", name="PG1", policy={"rpo_threshold_seconds": 900}, created_at=T0),
        ProtectionGroupRecord(id="pg-1f", name="PG1_Failback", policy={}, created_at=T0, failback_of="pg-1"),
    )
    return store


def item(**kw) -> ProtectedItemRecord:
    values = {"id": "item-1", "name": "app01", "machine_id": "src-1", "group_id": "pg-1", "state": "protected",
              "details": {"onprem": {"provider": "local"}}, "created_at": T0, "updated_at": T0}
    values.update(kw)
    return ProtectedItemRecord(**values)


def test_a_group_and_its_twin_are_made_and_removed_together(site: Store) -> None:
    assert [(g.name, g.failback_of) for g in site.list_protection_groups()] == [("PG1", ""), ("PG1_Failback", "pg-1")]
    assert site.get_protection_group("PG1").policy == {"rpo_threshold_seconds": 900}
    with pytest.raises(Conflict):
        site.add_protection_groups(
            ProtectionGroupRecord(id="pg-2", name="PG1", policy={}, created_at=T0),
            ProtectionGroupRecord(id="pg-2f", name="PG1_Failback2", policy={}, created_at=T0, failback_of="pg-2"),
        )
    assert {g.id for g in site.list_protection_groups()} == {"pg-1", "pg-1f"}  # nothing half-made
    with pytest.raises(InvalidInput):
        site.remove_protection_groups("PG1_Failback")
    site.remove_protection_groups("PG1")
    assert site.list_protection_groups() == []
    with pytest.raises(NotFound):
        site.get_protection_group("PG1")


def test_a_group_holding_a_machine_is_not_removed(site: Store) -> None:
    site.add_protected_item(item(group_id="pg-1f"))
    with pytest.raises(Conflict) as refused:
        site.remove_protection_groups("PG1")
    assert refused.value.code == "protection-group-in-use"
    assert len(site.list_protection_groups()) == 2


def test_protected_items_change_by_compare_and_set(site: Store) -> None:
    added = site.add_protected_item(item())
    assert added.version == 1
    with pytest.raises(Conflict):
        site.add_protected_item(item(id="item-2"))  # the machine is protected already
    moved = site.update_protected_item(
        "item-1", expected_version=1, now=T0 + timedelta(seconds=1), state="failing-over", group_id="pg-1f",
        details={"cloud": {"vm": "app01"}},
    )
    assert moved is not None and (moved.state, moved.group_id, moved.version) == ("failing-over", "pg-1f", 2)
    assert moved.details == {"cloud": {"vm": "app01"}} and moved.updated_at == T0 + timedelta(seconds=1)
    assert site.update_protected_item("item-1", expected_version=1, now=T0, state="protected") is None
    assert site.get_protected_item("item-1").state == "failing-over"
    with pytest.raises(NotFound):
        site.update_protected_item("item-9", expected_version=1, now=T0, state="protected")
    with pytest.raises(NotFound):
        site.update_protected_item("item-1", expected_version=2, now=T0, group_id="pg-nope")
    assert [i.id for i in site.list_protected_items(group_id="pg-1f")] == ["item-1"]
    assert site.list_protected_items(group_id="pg-1") == []
    site.remove_protected_item("item-1")
    assert site.list_protected_items() == []


def test_recovery_plans_are_replaced_only_at_the_version_read(site: Store) -> None:
    plan = RecoveryPlanRecord(id="rp-1", name="Plan1", definition={"groups": []}, created_at=T0, updated_at=T0)
    saved = site.save_recovery_plan(plan, expected_version=None)
    assert saved.version == 1
    with pytest.raises(Conflict):
        site.save_recovery_plan(plan, expected_version=None)
    changed = RecoveryPlanRecord(id="rp-1", name="Plan1", definition={"groups": [{"machines": ["item-1"]}]},
                                 created_at=T0, updated_at=T0 + timedelta(seconds=5))
    again = site.save_recovery_plan(changed, expected_version=1)
    assert again.version == 2 and again.definition["groups"][0]["machines"] == ["item-1"]
    with pytest.raises(Conflict):
        site.save_recovery_plan(changed, expected_version=1)
    assert [p.name for p in site.list_recovery_plans()] == ["Plan1"]
    site.remove_recovery_plan("Plan1")
    with pytest.raises(NotFound):
        site.get_recovery_plan("rp-1")


def test_a_job_signal_is_recorded_once(site: Store) -> None:
    kind = JobKind("demo", [FunctionStep("a", lambda ctx: None)])
    job = create_job(site, kind, "x", now=T0)
    assert site.job_signals(job.id) == set()
    assert site.signal_job(job.id, "continue-1", now=T0) is True
    assert site.signal_job(job.id, "continue-1", now=T0) is False
    assert site.job_signals(job.id) == {"continue-1"}
    with pytest.raises(NotFound):
        site.signal_job("no-such-job", "x", now=T0)


def test_release_leases_ends_only_the_owners_leases(site: Store) -> None:
    kind = JobKind("demo", [FunctionStep("a", lambda ctx: None)])
    job = create_job(site, kind, "x", now=T0)
    site.set_job_status(job.id, expected={"pending"}, new="running", now=T0)
    assert site.claim_step(job.id, 0, owner="cs-1", lease_seconds=60, now=T0) is not None
    assert site.release_leases("cs-2", now=T0) == 0
    assert site.get_job(job.id).steps[0].lease_expires_at == T0 + timedelta(seconds=60)
    assert site.release_leases("cs-1", now=T0 + timedelta(seconds=1)) == 1
    assert site.get_job(job.id).steps[0].lease_expires_at == T0 + timedelta(seconds=1)
