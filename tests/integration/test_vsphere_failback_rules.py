"""The vSphere failback rules (DESIGN §1), one test per rule, against real vcsim.

Every inventory here comes from the real discovery code run against the
simulator after the test set the situation up through pyvmomi (snapshots,
extraConfig, permissions, licence editions, datastores mounted on one host),
so the rules are checked against what discovery really records. Tests that
change the simulator make their own VMs and principals, so their order does
not matter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from siterecovery.common.errors import PreconditionFailed
from siterecovery.controller.protection.vsphere_rules import check_vsphere_failback, vsphere_failback_rules
from siterecovery.controller.providers.vsphere import operations, properties
from siterecovery.controller.providers.vsphere.discovery import discover
from siterecovery.controller.providers.vsphere.model import Inventory
from siterecovery.controller.providers.vsphere.privileges import (
    FAILBACK_DATASTORE_PRIVILEGES,
    FAILBACK_FOLDER_PRIVILEGES,
    FAILBACK_HOST_PRIVILEGES,
)
from siterecovery.controller.providers.vsphere.session import Session
from tests.integration.vcsim import Vcsim, running_vcsim

MT = "DC0_C0_RP0_VM0"  # the master target VM, on cluster host DC0_C0_H1, with disk.EnableUUID=TRUE
MT_HOST = "DC0_C0_H1"


@pytest.fixture(scope="module")
def vpx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("vpx", tmp_path_factory.mktemp("vpx")) as sim:
        yield sim


@pytest.fixture(scope="module")
def admin(vpx: Vcsim) -> Iterator[Session]:
    session = vpx.session()
    yield session
    session.close()


@pytest.fixture(scope="module")
def mt_uuid(admin: Session) -> str:
    """The master target: a Linux VM made ready for failback (disk.EnableUUID=TRUE)."""
    vm = discover(admin).vm(MT)
    assert vm is not None and vm.host == discover(admin).host(MT_HOST).id
    operations.set_extra_config(admin, vm.id, {"disk.EnableUUID": "TRUE"})
    return vm.bios_uuid


def _doc(session: Session) -> dict[str, Any]:
    """What the configuration server stores for the endpoint: the discovery document."""
    return discover(session).to_dict()


def _new_vm(admin: Session, name: str, host: str, datastore: str = "LocalDS_0") -> Inventory:
    """Create VM `name` on `host` with one disk on `datastore`; return the inventory after it."""
    inv = discover(admin)
    ds = inv.datastore(datastore)
    path = Path(ds.url) / name / "disk0.vmdk"
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = path.with_name("disk0-flat.vmdk")
    with flat.open("wb") as f:
        f.truncate(1 << 20)
    path.write_text(f'# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\nRW 2048 VMFS "{flat.name}"\n')
    operations.create_vm(
        admin,
        name=name,
        host_id=inv.host(host).id,
        datastore=datastore,
        disks=[f"[{datastore}] {name}/disk0.vmdk"],
    )
    return discover(admin)


def _refused(doc: dict[str, Any], **kwargs: Any) -> PreconditionFailed:
    """Run the check expecting a refusal; the stored document is left as it was."""
    before = copy.deepcopy(doc)
    with pytest.raises(PreconditionFailed) as err:
        check_vsphere_failback(doc, **kwargs)
    assert doc == before
    return err.value


def _add_role(am: Any, name: str, privileges: Sequence[str]) -> int:
    """A new role's id, read back from roleList: vcsim's AddAuthorizationRole answers 0 for every role."""
    am.AddAuthorizationRole(name=name, privIds=list(privileges))
    return next(r.roleId for r in am.roleList if r.name == name)


def _original(vm_uuid: str | None, mt_uuid: str) -> dict[str, Any]:
    return {
        "vm_uuid": vm_uuid,
        "kind": "vm",
        "target": "original",
        "master_target_vm_uuid": mt_uuid,
        "datastore": None,
    }


# --- the happy paths ----------------------------------------------------------------


def test_original_vm_fails_back_in_place_through_the_master_target(admin: Session, mt_uuid: str) -> None:
    inv = _new_vm(admin, "web01", "DC0_C0_H0")
    web01 = inv.vm("web01")
    decision = check_vsphere_failback(inv.to_dict(), **_original(web01.bios_uuid.upper(), mt_uuid))
    assert decision == {
        "target": "original",
        "endpoint": inv.endpoint,
        "vm": {"id": web01.id, "name": "web01"},
        "host": {"id": inv.host("DC0_C0_H0").id, "name": "DC0_C0_H0"},
        "datastore": {"id": inv.datastore("LocalDS_0").id, "name": "LocalDS_0"},
        "master_target": {
            "vm": {"id": inv.vm(MT).id, "name": MT},
            "host": {"id": inv.host(MT_HOST).id, "name": MT_HOST},
        },
    }
    # The instance UUID and the moid name the same VM.
    for key in (web01.instance_uuid, web01.id):
        assert check_vsphere_failback(inv.to_dict(), **_original(key, mt_uuid))["vm"]["id"] == web01.id


def test_new_vm_goes_on_the_master_targets_host_and_datastore(admin: Session, mt_uuid: str) -> None:
    inv = discover(admin)
    expected_host = {"id": inv.host(MT_HOST).id, "name": MT_HOST}
    expected_ds = {"id": inv.datastore("LocalDS_0").id, "name": "LocalDS_0"}
    for datastore in (None, "LocalDS_0"):
        decision = check_vsphere_failback(
            inv.to_dict(),
            vm_uuid=None,
            kind="vm",
            target="new",
            master_target_vm_uuid=mt_uuid,
            datastore=datastore,
        )
        assert decision["target"] == "new" and decision["vm"] is None
        assert decision["host"] == expected_host == decision["master_target"]["host"]
        assert decision["datastore"] == expected_ds


# --- one test per rule --------------------------------------------------------------


def test_rule_physical_server_fails_back_only_to_a_new_vm(admin: Session, mt_uuid: str) -> None:
    doc = _doc(admin)
    err = _refused(doc, **{**_original(None, mt_uuid), "kind": "physical"})
    assert err.code == "physical-failback"
    assert "physical server fails back only to a new VM" in err.message
    assert "--target new" in err.hint
    decision = check_vsphere_failback(
        doc, vm_uuid=None, kind="physical", target="new", master_target_vm_uuid=mt_uuid, datastore=None
    )
    assert decision["host"]["name"] == MT_HOST and decision["vm"] is None


def test_rule_original_vm_gone_means_target_new(admin: Session, mt_uuid: str) -> None:
    inv = _new_vm(admin, "gone01", "DC0_C0_H2")
    uuid = inv.vm("gone01").instance_uuid
    check_vsphere_failback(inv.to_dict(), **_original(uuid, mt_uuid))  # fine while it exists
    vm = operations.ref(admin, vim.VirtualMachine, inv.vm("gone01").id)
    operations.wait_for_task(admin, vm.Destroy_Task(), what="delete gone01")
    err = _refused(_doc(admin), **_original(uuid, mt_uuid))
    assert err.code == "original-vm-missing"
    assert f"the original VM {uuid} no longer exists" in err.message
    assert err.hint.startswith("reprotect with --target new")


def test_rule_vm_with_snapshots_is_refused_with_their_count(admin: Session, mt_uuid: str) -> None:
    inv = _new_vm(admin, "app01", "DC0_C0_H0")
    vm = operations.ref(admin, vim.VirtualMachine, inv.vm("app01").id)
    for name in ("before-patch", "after-patch"):
        task = vm.CreateSnapshot_Task(name=name, memory=False, quiesce=False)
        operations.wait_for_task(admin, task, what="snapshot")
    uuid = inv.vm("app01").bios_uuid
    err = _refused(_doc(admin), **_original(uuid, mt_uuid))
    assert err.code == "vm-has-snapshots"
    assert err.message.startswith("VM app01 has 2 snapshots")
    assert "before-patch" in err.message and "after-patch" in err.message
    assert err.hint == "delete them, then run reprotect again"
    # srctl doctor --machine sees every rule, not only the first refusal: the ones after it still ran.
    verdicts, decision = vsphere_failback_rules(_doc(admin), **_original(uuid, mt_uuid))
    assert decision is None
    assert [(v.rule, v.status) for v in verdicts] == [
        ("physical servers fail back to a new VM", "ok"), ("master target VM and host discovered", "ok"),
        ("original VM exists", "ok"), ("original VM's host discovered", "ok"),
        ("original VM has no snapshots", "failed"), ("no free ESXi edition", "ok"),
        ("disk.EnableUUID on a Linux master target", "ok"), ("datastore reachable", "ok"), ("account privileges", "ok"),
    ]
    assert verdicts[4].error is not None and verdicts[4].hint == err.hint and verdicts[4].code == err.code
    # Doing what the hint says is enough.
    operations.wait_for_task(admin, vm.RemoveAllSnapshots_Task(), what="delete snapshots")
    assert check_vsphere_failback(_doc(admin), **_original(uuid, mt_uuid))["vm"]["name"] == "app01"


def test_rule_read_only_account_cannot_fail_back(vpx: Vcsim, admin: Session, mt_uuid: str) -> None:
    inv = _new_vm(admin, "ro01", "DC0_C0_H0")
    dc = operations.ref(admin, vim.Datacenter, inv.datacenters[0].id)
    Perm = vim.AuthorizationManager.Permission
    admin.content.authorizationManager.SetEntityPermissions(
        entity=dc, permission=[Perm(entity=dc, principal="ro-user", group=False, roleId=-2, propagate=True)]
    )
    with Session(vpx.endpoint("ro-user")) as ro:
        doc = _doc(ro)
    err = _refused(doc, **_original(inv.vm("ro01").bios_uuid, mt_uuid), endpoint_name="vc1")
    assert err.code == "vsphere-missing-privileges"
    assert err.message.startswith(f"account ro-user on {inv.endpoint} lacks ")
    assert f"{', '.join(FAILBACK_DATASTORE_PRIVILEGES)} on datastore LocalDS_0" in err.message
    for host in (MT_HOST, "DC0_C0_H0"):  # the master target's host and the VM's
        assert f"{', '.join(FAILBACK_HOST_PRIVILEGES)} on host {host}" in err.message
    assert err.hint.startswith(
        "update the vCenter credentials with an account that has the needed privileges"
    )
    assert "srctl vcenter update-credentials vc1" in err.hint and err.hint.endswith("then retry")
    # A new VM needs them too, on the master target's host and datastore.
    err = _refused(doc, vm_uuid=None, kind="vm", target="new", master_target_vm_uuid=mt_uuid, datastore=None)
    assert err.code == "vsphere-missing-privileges" and "DC0_C0_H0" not in err.message
    assert "VirtualMachine.Inventory.Create on the VM folder of datacenter DC0" in err.message
    # Failing back into the original VM creates none: the folder is not asked for.
    assert "VM folder" not in _refused(doc, **_original(inv.vm("ro01").bios_uuid, mt_uuid)).message


def test_rule_a_new_vm_needs_inventory_create_on_the_folder_not_the_host(
    vpx: Vcsim, admin: Session, mt_uuid: str
) -> None:
    """vSphere checks VirtualMachine.Inventory.Create on the folder the VM goes into."""
    am = admin.content.authorizationManager
    on_host = _add_role(am, "failback-host-only", [*FAILBACK_HOST_PRIVILEGES, *FAILBACK_FOLDER_PRIVILEGES])
    storage = _add_role(am, "failback-storage-only", FAILBACK_DATASTORE_PRIVILEGES)
    create = _add_role(am, "failback-create-only", FAILBACK_FOLDER_PRIVILEGES)
    inv = discover(admin)
    dc = operations.ref(admin, vim.Datacenter, inv.datacenters[0].id)
    folder = properties.read_one(admin, dc, ["vmFolder"])["vmFolder"]
    host = operations.ref(admin, vim.HostSystem, inv.host(MT_HOST).id)
    ds = operations.ref(admin, vim.Datastore, inv.datastore("LocalDS_0").id)
    Perm = vim.AuthorizationManager.Permission
    user = "host-user"
    for entity, role in ((dc, -2), (host, on_host), (ds, storage)):
        am.SetEntityPermissions(entity=entity, permission=[
            Perm(entity=entity, principal=user, group=False, roleId=role, propagate=True)])
    new_vm = {"vm_uuid": None, "kind": "vm", "target": "new", "master_target_vm_uuid": mt_uuid, "datastore": None}
    with Session(vpx.endpoint(user)) as session:
        doc = _doc(session)
    err = _refused(doc, **new_vm)
    assert err.code == "vsphere-missing-privileges"
    assert err.message.endswith("lacks VirtualMachine.Inventory.Create on the VM folder of datacenter DC0")
    am.SetEntityPermissions(entity=folder, permission=[
        Perm(entity=folder, principal=user, group=False, roleId=create, propagate=True)])
    with Session(vpx.endpoint(user)) as session:
        decision = check_vsphere_failback(_doc(session), **new_vm)
    assert decision["host"]["name"] == MT_HOST and decision["vm"] is None


def test_rule_free_esxi_cannot_be_a_failback_target(tmp_path: Path) -> None:
    with running_vcsim("vpx", tmp_path, edition="esx.hypervisor.free") as free:
        with free.session() as session:
            doc = _doc(session)
    inv = Inventory.from_dict(doc)
    mt = inv.vm(MT)
    assert inv.host(MT_HOST).edition == "esx.hypervisor.free"  # what discovery recorded
    err = _refused(
        doc, vm_uuid=None, kind="vm", target="new", master_target_vm_uuid=mt.instance_uuid, datastore=None
    )
    assert err.code == "vsphere-free-esxi"
    assert f"the master target's host {MT_HOST} runs the free ESXi edition" in err.message
    assert "cannot be a failback target" in err.message
    assert "licence" in err.hint


def test_rule_linux_master_target_needs_enable_uuid(admin: Session) -> None:
    inv = discover(admin)
    mt = inv.vm("DC0_H0_VM1")
    assert mt.enable_uuid is None and not mt.guest_id.startswith("win")
    new = {
        "vm_uuid": None,
        "kind": "vm",
        "target": "new",
        "master_target_vm_uuid": mt.bios_uuid,
        "datastore": None,
    }
    err = _refused(inv.to_dict(), **new, endpoint_name="vc1")
    assert err.code == "vsphere-enable-uuid"
    assert err.message.startswith("master target VM DC0_H0_VM1 has disk.EnableUUID not set")
    assert "set disk.EnableUUID=TRUE in the advanced settings of VM DC0_H0_VM1" in err.hint
    assert "power-cycle it" in err.hint
    operations.set_extra_config(admin, mt.id, {"disk.EnableUUID": "FALSE"})
    assert "disk.EnableUUID FALSE" in _refused(_doc(admin), **new).message
    operations.set_extra_config(admin, mt.id, {"disk.EnableUUID": "TRUE"})
    assert check_vsphere_failback(_doc(admin), **new)["host"]["name"] == "DC0_H0"


def test_rule_original_vms_datastore_must_be_mounted_on_the_master_targets_host(
    vpx: Vcsim, admin: Session, mt_uuid: str
) -> None:
    inv = discover(admin)
    h0 = inv.host("DC0_H0")
    local_dir = vpx.workdir / "only-on-h0"
    local_dir.mkdir()
    row = properties.read_one(
        admin, operations.ref(admin, vim.HostSystem, h0.id), ["configManager.datastoreSystem"]
    )
    row["configManager.datastoreSystem"].CreateLocalDatastore(name="OnlyH0", path=str(local_dir))
    inv = _new_vm(admin, "db01", "DC0_H0", datastore="OnlyH0")
    assert inv.datastore("OnlyH0").hosts == (h0.id,)
    db01 = inv.vm("db01").bios_uuid
    err = _refused(inv.to_dict(), **_original(db01, mt_uuid))
    assert err.code == "datastore-unreachable"
    assert (
        f"datastore OnlyH0 of VM db01 is not mounted on {MT_HOST}, the host of master target {MT}"
        in err.message
    )
    assert err.hint == "use a master target on a host that mounts OnlyH0, or reprotect with --target new"
    # A new VM cannot be put there by that master target either ...
    err = _refused(
        inv.to_dict(),
        vm_uuid=db01,
        kind="vm",
        target="new",
        master_target_vm_uuid=mt_uuid,
        datastore="OnlyH0",
    )
    assert err.code == "datastore-unreachable" and "LocalDS_0" in err.hint
    # ... and a master target on the host that mounts it is fine.
    h0_mt = inv.vm("DC0_H0_VM0")
    operations.set_extra_config(admin, h0_mt.id, {"disk.EnableUUID": "TRUE"})
    decision = check_vsphere_failback(_doc(admin), **_original(db01, h0_mt.bios_uuid))
    assert decision["datastore"]["name"] == "OnlyH0" and decision["master_target"]["host"]["name"] == "DC0_H0"


def test_rule_standalone_esxi_host_must_be_discovered_first(tmp_path: Path, admin: Session) -> None:
    with running_vcsim("esx", tmp_path, username="root", password="esx-secret") as esx:
        with esx.session("root", "esx-secret") as session:
            standalone = discover(session)
            mt = standalone.vms[0]
            operations.set_extra_config(session, mt.id, {"disk.EnableUUID": "TRUE"})
            discovered = _doc(session)
    new = {
        "vm_uuid": None,
        "kind": "vm",
        "target": "new",
        "master_target_vm_uuid": mt.bios_uuid,
        "datastore": None,
    }
    # The vCenter's inventory does not know the standalone host the master target runs on.
    err = _refused(_doc(admin), **new, endpoint_name="esx1")
    assert err.code == "vsphere-host-not-discovered"
    assert f"master target VM {mt.bios_uuid} is not in the inventory of" in err.message
    assert "standalone ESXi host" in err.message
    assert "srctl vcenter add" in err.hint and "srctl vcenter discover esx1" in err.hint
    # Once that host is added and discovered, its inventory answers.
    decision = check_vsphere_failback(discovered, **new)
    assert decision["host"]["name"] == standalone.hosts[0].name
    assert decision["datastore"]["name"] == standalone.datastores[0].name
