"""The vSphere provider against real vcsim, as a vCenter (VPX) and as a standalone ESXi host.

One simulator per mode serves the whole module; tests that change it make
their own objects (VMs, datastores, permissions for their own principals) so
they do not depend on one another's order.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVmomi import vim

from siterecovery.common.errors import (
    InvalidInput,
    NotFound,
    PreconditionFailed,
    Unauthenticated,
    Unavailable,
)
from siterecovery.controller.jobs.engine import RetryPolicy
from siterecovery.controller.providers.vsphere import facts, operations, properties
from siterecovery.controller.providers.vsphere.discovery import discover
from siterecovery.controller.providers.vsphere.model import Inventory
from siterecovery.controller.providers.vsphere.privileges import (
    FAILBACK_DATASTORE_PRIVILEGES,
    FAILBACK_HOST_PRIVILEGES,
)
from siterecovery.controller.providers.vsphere.session import Endpoint, Session, Trust
from tests.integration.vcsim import Vcsim, running_vcsim


@pytest.fixture(scope="module")
def vpx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("vpx", tmp_path_factory.mktemp("vpx")) as sim:
        yield sim


@pytest.fixture(scope="module")
def esx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("esx", tmp_path_factory.mktemp("esx"), username="root", password="esx-secret") as sim:
        yield sim


@pytest.fixture(scope="module")
def admin(vpx: Vcsim) -> Iterator[Session]:
    session = vpx.session()
    yield session
    session.close()


@pytest.fixture(scope="module")
def inventory(admin: Session) -> Inventory:
    return discover(admin)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _id(inv: Inventory, kind: str, name: str) -> str:
    item = {"host": inv.host, "datastore": inv.datastore, "vm": inv.vm}[kind](name)
    assert item is not None, f"{kind} {name} not discovered"
    return item.id


def _write_vmdk(datastore_dir: Path, relative: str, size: int = 1 << 20) -> None:
    """What a master target leaves on a datastore: a descriptor and its flat extent."""
    path = datastore_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = path.with_name(path.stem + "-flat.vmdk")
    with flat.open("wb") as f:
        f.truncate(size)
    path.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\n'
        f'RW {size // 512} VMFS "{flat.name}"\nddb.adapterType = "lsilogic"\n'
    )


# --- sessions and trust -------------------------------------------------------------


def test_login_with_ca_file_reports_vcenter_and_user(vpx: Vcsim) -> None:
    with Session(vpx.endpoint("alice@vsphere.local")) as session:
        assert session.is_vcenter
        assert session.user == "alice@vsphere.local"
        assert session.logins == 1


def test_pinned_thumbprint_is_accepted_and_a_wrong_one_refused(vpx: Vcsim) -> None:
    with Session(vpx.endpoint(thumbprint=vpx.thumbprint)) as session:
        assert session.is_vcenter
    wrong = "00" * 20
    with pytest.raises(Unauthenticated) as err:
        Session(vpx.endpoint(thumbprint=wrong), retry=RetryPolicy(max_attempts=1)).open()
    assert err.value.code == "vsphere-untrusted-certificate"


def test_self_signed_certificate_is_refused_without_explicit_trust(vpx: Vcsim) -> None:
    endpoint = Endpoint(host=vpx.host, port=vpx.port, username="admin", password="x", trust=Trust())
    with pytest.raises(Unauthenticated) as err:
        Session(endpoint).open()
    assert err.value.code == "vsphere-untrusted-certificate"
    # The hint names the thumbprint it presented, to check and pin.
    assert f"--thumbprint {vpx.thumbprint.upper()}" in err.value.hint


def test_insecure_trust_connects(vpx: Vcsim) -> None:
    with Session(vpx.endpoint(insecure=True)) as session:
        assert session.user == "admin"


def test_wrong_password_is_refused_by_a_standalone_host(esx: Vcsim) -> None:
    with pytest.raises(Unauthenticated) as err:
        Session(esx.endpoint("root", "wrong")).open()
    assert err.value.code == "vsphere-invalid-login"
    assert "wrong" not in str(err.value)
    with Session(esx.endpoint("root", "esx-secret")) as session:
        assert not session.is_vcenter


def test_session_logs_in_again_after_it_was_terminated(vpx: Vcsim) -> None:
    with Session(vpx.endpoint()) as session:
        session.content.sessionManager.Logout()  # as if the server had expired it
        session.keepalive()
        assert session.logins == 2
        assert properties.collect(session, vim.Datacenter, ["name"])[0]["name"] == "DC0"


def test_unreachable_endpoint_is_retried_then_unavailable() -> None:
    endpoint = Endpoint(
        host="127.0.0.1", port=_free_port(), username="u", password="p", trust=Trust(insecure=True)
    )
    session = Session(endpoint, retry=RetryPolicy(max_attempts=2, initial_backoff=0.0, max_backoff=0.0))
    with pytest.raises(Unavailable) as err:
        session.open()
    assert err.value.retryable


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "", "username": "u", "password": "p"},
        {"host": "vc/x", "username": "u", "password": "p"},
        {"host": "vc", "username": "", "password": "p"},
        {"host": "vc", "username": "u", "password": ""},
        {"host": "vc", "username": "u", "password": "p", "port": 0},
    ],
)
def test_bad_endpoints_are_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        Endpoint(**kwargs)


def test_trust_takes_one_way_and_a_well_formed_thumbprint() -> None:
    with pytest.raises(InvalidInput):
        Trust(ca_file="/x", insecure=True)
    with pytest.raises(InvalidInput):
        Trust(thumbprint="zz:11")
    assert Trust(thumbprint="AB" * 32).describe() == "thumbprint"


def test_password_is_not_in_repr() -> None:
    endpoint = Endpoint(host="vc", username="u", password="hunter2")
    assert "hunter2" not in repr(endpoint)


# --- discovery ----------------------------------------------------------------------


def test_vcenter_discovery_finds_the_whole_inventory(inventory: Inventory) -> None:
    assert inventory.api_type == "VirtualCenter"
    assert [d.name for d in inventory.datacenters] == ["DC0"]
    assert [c.name for c in inventory.clusters] == ["DC0_C0"]
    hosts = {h.name: h for h in inventory.hosts}
    assert len(hosts) == 4
    clustered = [h for h in hosts.values() if h.cluster]
    assert len(clustered) == 3 and all(h.cluster == inventory.clusters[0].id for h in clustered)
    for host in hosts.values():
        assert host.product == "VMware ESXi" and host.version and host.build
        assert host.edition == "eval"
        assert host.datacenter == inventory.datacenters[0].id
    ds = inventory.datastore("LocalDS_0")
    assert ds is not None and ds.capacity > ds.free_space > 0 and ds.accessible
    assert set(ds.hosts) == {h.id for h in hosts.values()}
    assert ds.url and Path(ds.url).is_dir()  # vcsim datastores are real directories


def test_vcenter_discovery_reads_vm_identity_disks_and_nics(inventory: Inventory) -> None:
    assert len(inventory.vms) == 4
    for vm in inventory.vms:
        assert vm.instance_uuid and vm.bios_uuid and vm.instance_uuid != vm.bios_uuid
        assert vm.power_state == "poweredOn"
        assert inventory.host(vm.host) is not None
        assert vm.disks and vm.disks[0].path.startswith("[LocalDS_0] ") and vm.disks[0].path.endswith(".vmdk")
        assert vm.disks[0].capacity > 0 and vm.disks[0].controller == "pvscsi"
        assert vm.disks[0].datastore == _id(inventory, "datastore", "LocalDS_0")
        assert vm.nics and vm.nics[0].mac
        assert vm.snapshots == () and vm.enable_uuid is None


def test_admin_account_has_every_failback_privilege(inventory: Inventory) -> None:
    for ds in inventory.datastores:
        assert set(FAILBACK_DATASTORE_PRIVILEGES) <= set(ds.privileges)
    for host in inventory.hosts:
        assert set(FAILBACK_HOST_PRIVILEGES) <= set(host.privileges)


def test_inventory_round_trips_through_json(inventory: Inventory) -> None:
    import json

    again = Inventory.from_dict(json.loads(json.dumps(inventory.to_dict())))
    assert again == inventory


def test_standalone_host_discovery(esx: Vcsim) -> None:
    with Session(esx.endpoint("root", "esx-secret")) as session:
        inv = discover(session)
    assert inv.api_type == "HostAgent"
    assert inv.clusters == ()
    assert len(inv.hosts) == 1 and inv.hosts[0].edition == "eval"
    assert len(inv.vms) == 2 and all(vm.host == inv.hosts[0].id for vm in inv.vms)
    assert inv.datastores[0].hosts == (inv.hosts[0].id,)
    assert set(FAILBACK_HOST_PRIVILEGES) <= set(inv.hosts[0].privileges)


# --- preflight facts ----------------------------------------------------------------


def test_snapshots_are_reported_and_left_alone(admin: Session, inventory: Inventory) -> None:
    vm_id = _id(inventory, "vm", "DC0_C0_RP0_VM1")
    other = _id(inventory, "vm", "DC0_C0_RP0_VM0")
    task = operations.ref(admin, vim.VirtualMachine, vm_id).CreateSnapshot_Task(
        name="before-patch", memory=False, quiesce=False
    )
    operations.wait_for_task(admin, task, what="snapshot")
    assert facts.has_snapshots(admin, vm_id)
    assert [s.name for s in facts.vm_snapshots(admin, vm_id)] == ["before-patch"]
    assert not facts.has_snapshots(admin, other)
    assert [s.name for s in discover(admin).vm(vm_id).snapshots] == ["before-patch"]


def test_read_only_account_lacks_failback_privileges(
    vpx: Vcsim, admin: Session, inventory: Inventory
) -> None:
    dc = operations.ref(admin, vim.Datacenter, inventory.datacenters[0].id)
    am = admin.content.authorizationManager
    am.SetEntityPermissions(
        entity=dc,
        permission=[
            vim.AuthorizationManager.Permission(
                entity=dc, principal="ro-user", group=False, roleId=-2, propagate=True
            )
        ],
    )
    ds = _id(inventory, "datastore", "LocalDS_0")
    host = _id(inventory, "host", "DC0_C0_H0")
    with Session(vpx.endpoint("ro-user")) as ro:
        assert facts.missing_datastore_privileges(ro, ds) == FAILBACK_DATASTORE_PRIVILEGES
        assert facts.missing_host_privileges(ro, host) == FAILBACK_HOST_PRIVILEGES
        seen = discover(ro)
        assert set(seen.datastore(ds).privileges) == {"System.Anonymous", "System.Read", "System.View"}
    assert facts.missing_datastore_privileges(admin, ds) == ()
    assert facts.missing_host_privileges(admin, host) == ()


def test_a_role_on_the_datastore_overrides_read_only_above_it(
    vpx: Vcsim, admin: Session, inventory: Inventory
) -> None:
    am = admin.content.authorizationManager
    role = am.AddAuthorizationRole(name="failback-storage", privIds=list(FAILBACK_DATASTORE_PRIVILEGES))
    dc = operations.ref(admin, vim.Datacenter, inventory.datacenters[0].id)
    ds_id = _id(inventory, "datastore", "LocalDS_0")
    ds = operations.ref(admin, vim.Datastore, ds_id)
    Perm = vim.AuthorizationManager.Permission
    am.SetEntityPermissions(
        entity=dc,
        permission=[Perm(entity=dc, principal="store-user", group=False, roleId=-2, propagate=True)],
    )
    am.SetEntityPermissions(
        entity=ds,
        permission=[Perm(entity=ds, principal="store-user", group=False, roleId=role, propagate=False)],
    )
    host = _id(inventory, "host", "DC0_H0")
    with Session(vpx.endpoint("store-user")) as user:
        assert facts.missing_datastore_privileges(user, ds_id) == ()
        assert facts.missing_host_privileges(user, host) == FAILBACK_HOST_PRIVILEGES


def test_free_esxi_edition_is_recognised(tmp_path: Path, esx: Vcsim) -> None:
    with Session(esx.endpoint("root", "esx-secret")) as session:
        assert not facts.host_is_free_edition(session, "ha-host")
    with running_vcsim("esx", tmp_path, edition="esx.hypervisor.free") as free:
        with free.session() as session:
            assert facts.host_edition(session, "ha-host") == "esx.hypervisor.free"
            assert facts.host_is_free_edition(session, "ha-host")
    assert facts.is_free_edition("esxBasic")
    assert not facts.is_free_edition("esx.enterprisePlus.cpuPackage")


def test_enable_uuid_on_the_master_target(admin: Session, inventory: Inventory) -> None:
    mt = _id(inventory, "vm", "DC0_H0_VM1")
    assert facts.lacks_enable_uuid(admin, mt)
    assert operations.set_extra_config(admin, mt, {"disk.EnableUUID": "TRUE"})
    assert not operations.set_extra_config(admin, mt, {"disk.EnableUUID": "TRUE"})
    assert operations.extra_config(admin, mt)["disk.EnableUUID"] == "TRUE"
    assert not facts.lacks_enable_uuid(admin, mt)


def test_datastore_reachability_from_a_host(admin: Session, inventory: Inventory, vpx: Vcsim) -> None:
    standalone = _id(inventory, "host", "DC0_H0")
    clustered = _id(inventory, "host", "DC0_C0_H0")
    shared = _id(inventory, "datastore", "LocalDS_0")
    assert facts.datastore_reachable(admin, shared, clustered)
    local_dir = vpx.workdir / "only-on-h0"
    local_dir.mkdir()
    row = properties.read_one(
        admin, operations.ref(admin, vim.HostSystem, standalone), ["configManager.datastoreSystem"]
    )
    local = row["configManager.datastoreSystem"].CreateLocalDatastore(name="OnlyH0", path=str(local_dir))
    assert facts.datastore_reachable(admin, local._moId, standalone)
    assert not facts.datastore_reachable(admin, local._moId, clustered)
    with pytest.raises(NotFound):
        facts.datastore_reachable(admin, "datastore-none", clustered)


def test_vm_existence_by_id_and_uuid(admin: Session, inventory: Inventory) -> None:
    vm = inventory.vm("DC0_H0_VM0")
    assert facts.vm_exists(admin, vm_id=vm.id) == vm.id
    assert facts.vm_exists(admin, instance_uuid=vm.instance_uuid) == vm.id
    assert facts.vm_exists(admin, bios_uuid=vm.bios_uuid) == vm.id
    assert facts.vm_exists(admin, vm_id="vm-999999") is None
    assert facts.vm_exists(admin, instance_uuid="00000000-0000-0000-0000-000000000000") is None


# --- operations ---------------------------------------------------------------------


def test_create_vm_from_master_target_disks_then_power_cycle(admin: Session, inventory: Inventory) -> None:
    ds = inventory.datastore("LocalDS_0")
    host = _id(inventory, "host", "DC0_C0_H1")
    _write_vmdk(Path(ds.url), "failback-web01/disk0.vmdk")
    _write_vmdk(Path(ds.url), "failback-web01/disk1.vmdk")
    disks = ["[LocalDS_0] failback-web01/disk0.vmdk", "[LocalDS_0] failback-web01/disk1.vmdk"]
    created = operations.create_vm(admin, name="web01", host_id=host, datastore="LocalDS_0", disks=disks)
    assert facts.vm_exists(admin, instance_uuid=created.instance_uuid) == created.id
    vm = discover(admin).vm(created.id)
    assert vm.host == host and [d.path for d in vm.disks] == disks
    assert {d.controller for d in vm.disks} == {"lsilogic"}
    assert vm.power_state == "poweredOff"
    assert operations.power_on(admin, created.id) and not operations.power_on(admin, created.id)
    assert operations.power_state(admin, created.id) == "poweredOn"
    assert operations.power_off(admin, created.id) and not operations.power_off(admin, created.id)
    assert operations.power_state(admin, created.id) == "poweredOff"
    with pytest.raises(PreconditionFailed) as err:
        operations.create_vm(admin, name="web01", host_id=host, datastore="LocalDS_0", disks=disks)
    assert err.value.code == "vsphere-vm-exists"


def test_create_vm_refuses_bad_input_and_changes_nothing(
    admin: Session, inventory: Inventory, vpx: Vcsim
) -> None:
    host = _id(inventory, "host", "DC0_C0_H2")
    before = len(properties.collect(admin, vim.VirtualMachine, ["name"]))
    good = ["[LocalDS_0] nothing/disk.vmdk"]
    for kwargs in (
        {"name": "bad/name", "disks": good},
        {"name": "ok", "disks": []},
        {"name": "ok", "disks": ["/etc/passwd"]},
        {"name": "ok", "disks": ["[LocalDS_0] ../x.vmdk"]},
        {"name": "ok", "disks": good, "controller": "floppy"},
    ):
        with pytest.raises(InvalidInput):
            operations.create_vm(admin, host_id=host, datastore="LocalDS_0", **kwargs)
    with pytest.raises(PreconditionFailed) as err:
        operations.create_vm(admin, name="ok", host_id=host, datastore="NoSuchDS", disks=good)
    assert err.value.code == "vsphere-datastore-unreachable"
    with pytest.raises(NotFound):
        operations.create_vm(admin, name="ok", host_id="host-none", datastore="LocalDS_0", disks=good)
    assert len(properties.collect(admin, vim.VirtualMachine, ["name"])) == before


def test_attach_and_detach_disks_on_the_master_target(admin: Session, inventory: Inventory) -> None:
    mt = _id(inventory, "vm", "DC0_C0_RP0_VM0")
    ds = inventory.datastore("LocalDS_0")
    _write_vmdk(Path(ds.url), "mt-pairs/pair1.vmdk")
    path = "[LocalDS_0] mt-pairs/pair1.vmdk"
    key = operations.attach_disk(admin, mt, path)
    assert operations.attach_disk(admin, mt, path) == key  # attaching twice changes nothing
    assert path in operations.attached_disks(admin, mt)
    assert operations.detach_disk(admin, mt, path)
    assert not operations.detach_disk(admin, mt, path)
    assert path not in operations.attached_disks(admin, mt)
    assert (Path(ds.url) / "mt-pairs" / "pair1-flat.vmdk").exists()  # detaching keeps the file
    with pytest.raises(NotFound):
        operations.attach_disk(admin, mt, "[LocalDS_0] mt-pairs/missing.vmdk")
    with pytest.raises(NotFound):
        operations.attach_disk(admin, "vm-none", path)


def test_a_vm_made_for_failback_can_be_removed_again(admin: Session, inventory: Inventory) -> None:
    """What a reprotect's undo does with the new VM it made: powered off or on, it goes."""
    host = _id(inventory, "host", "DC0_C0_H0")
    made = operations.create_vm(admin, name="app01-failback", host_id=host, datastore="LocalDS_0",
                                disks=["[LocalDS_0] app01-failback/disk0.vmdk"], new_disk_sizes=[8 * 1024 * 1024])
    operations.power_on(admin, made.id)
    operations.destroy_vm(admin, made.id)
    assert operations.find_vm(admin, "app01-failback") is None
