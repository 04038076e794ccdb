"""The on-premises side of the protection workflows, one class per provider.

The workflow steps (site_steps.py) ask the on-premises site for the same few
things whatever runs it: which VM a protected machine is, whether failing back
to it is allowed (DESIGN §1), power it off and on, where the master target
writes its disks, and a new VM over disks the master target wrote. Two
providers answer:

- `local` (the lab): a directory per VM, `providers/local/site.py`;
- `vsphere`: a vCenter or standalone ESXi endpoint added with `srctl vcenter
  add`. A VM is found by its BIOS UUID (what the source agent reports as its
  machine UUID) in the endpoint's stored discovery; the failback rules run on
  that stored discovery when reprotect is asked for (a refusal changes
  nothing) and again on a fresh discovery when the job starts; power goes
  through `providers/vsphere/operations.py`.

How the master target reaches a vSphere VM's disks: it writes files on the
datastores its host mounts, each one of its datastore directories — the
directory the datastore's URL names (an NFS export mounted at the same path,
and vcsim's directories), or else one named like the datastore (e.g.
`/mnt/datastores/DS1`). A disk `[DS1] app01/app01.vmdk` is a descriptor whose
data is the flat extent `app01-flat.vmdk` beside it (ESXi's naming), which is
the file the failback pair writes. The configuration server never opens those
files itself: it only names them to the master target.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from siterecovery.common import errors
from siterecovery.common.pb import common_pb2
from siterecovery.controller import replication
from siterecovery.controller.protection import rules
from siterecovery.controller.protection.vsphere_rules import check_vsphere_failback, find_vm
from siterecovery.controller.providers.local.site import AgentLaunch, LocalSite
from siterecovery.controller.providers.vsphere import operations
from siterecovery.controller.providers.vsphere.discovery import discover
from siterecovery.controller.providers.vsphere.model import Inventory
from siterecovery.controller.providers.vsphere.session import Session
from siterecovery.controller.store.base import ProtectedItemRecord, ServerRecord, Store, VcenterRecord

# Read by the VM's agent through VMware Tools (`disk_generation_command`).
GUESTINFO_GENERATION = "guestinfo.siterecovery.disk-generation"
LOCAL = "local"
VSPHERE = "vsphere"
# Opens a logged-in session to a stored vCenter / ESXi endpoint (the daemon decrypts its password).
SessionFactory = Callable[[VcenterRecord], Session]


@dataclass(frozen=True)
class Found:
    """A protected machine's VM on-premises, as recorded in its details["onprem"]."""

    provider: str
    vm: str
    vm_uuid: str
    vcenter: str = ""  # the endpoint's id (vsphere)


def datastore_dirs(server: ServerRecord) -> list[str]:
    return [d.get("path", "") for d in replication.directories(server, common_pb2.DIRECTORY_KIND_DATASTORE)]


def inside(path: Path | PurePosixPath, roots: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(PurePosixPath(root)) for root in roots if root)


class OnpremSite(ABC):
    """`with site:` around a step's calls lets a provider keep one connection for all of them."""

    provider: str

    def __enter__(self) -> OnpremSite:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    def preflight(
        self, item: ProtectedItemRecord, wanted: str, master_target: ServerRecord, datastore: str, *, fresh: bool
    ) -> dict:
        """Every failback rule; PreconditionFailed names the broken one and its fix.

        Returns at least {"target": "original"|"new", "vm": the original VM's name or ""}.
        `fresh`: look at the site now (the job), not at what was last discovered (the request).
        """

    @abstractmethod
    def power_off(self, vm: str) -> bool:
        """Power the VM off; False when it was off or is gone (an unplanned failover goes on)."""

    @abstractmethod
    def power_on(self, vm: str) -> Found:
        """Power the VM on (no-op when on); its identity, for finding its agent."""

    @abstractmethod
    def is_running(self, vm: str) -> bool: ...

    @abstractmethod
    def original_targets(self, preflight: dict, disks: list[dict], master_target: ServerRecord) -> dict[str, str]:
        """The master target's path of each of the original VM's disks, by the protected disk's name."""

    @abstractmethod
    def before_overwrite(self, vm: str, generation: str) -> None:
        """The VM is about to have its disks rewritten by failback (it is off).

        `generation` (the job's id) is stamped where the VM's agent reads it at
        its next start, so it drops its old journals instead of replaying them
        onto the rewritten disks (agents/source/generation.py).
        """

    @abstractmethod
    def new_vm_targets(
        self, name: str, preflight: dict, disks: list[dict], master_target: ServerRecord
    ) -> dict[str, str]:
        """Make room for a new VM `name` and return the master target's path of each disk (files may not exist)."""

    @abstractmethod
    def discard_new_vm(self, name: str) -> None:
        """Remove what `new_vm_targets` made for `name` (a reprotect that did not finish)."""

    @abstractmethod
    def vm_exists(self, name: str) -> bool: ...

    @abstractmethod
    def define_vm(self, name: str, preflight: dict, targets: dict[str, str]) -> None:
        """Create the new VM over the disks the failback pairs wrote (no-op when it exists)."""


# --- local -------------------------------------------------------------------------------


class LocalOnprem(OnpremSite):
    provider = LOCAL

    def __init__(self, site: LocalSite, launch: Callable[[], AgentLaunch]) -> None:
        self.site = site
        self.launch = launch

    def find(self, vm_uuid: str) -> Found | None:
        vm = self.site.find_vm_by_uuid(vm_uuid) if vm_uuid else None
        return Found(LOCAL, vm.name, vm.uuid) if vm is not None else None

    def preflight(self, item, wanted, master_target, datastore, *, fresh):
        rules.raise_first(local_failback_rules(self.site, item, wanted, master_target))
        original = item.details.get("onprem", {}).get("vm", "")
        return {"target": wanted, "vm": original if wanted == "original" else ""}

    def power_off(self, vm):
        return self.site.power_off(vm) is not None

    def power_on(self, vm):
        on = self.site.power_on(vm, self.launch())
        return Found(LOCAL, on.name, on.uuid)

    def is_running(self, vm):
        return self.site.is_running(vm)

    def original_targets(self, preflight, disks, master_target):
        vm = self.site.get_vm(preflight["vm"])
        if vm is None:
            raise _original_missing(preflight["vm"])
        on_vm = {d.name: d for d in vm.disks}
        targets = {}
        for disk in disks:
            name = disk.get("name", "")
            if name not in on_vm:
                raise errors.PreconditionFailed(f"VM {vm.name} has no disk {name}", code="disk-not-found")
            targets[name] = str(on_vm[name].path)
        return targets

    def before_overwrite(self, vm, generation):
        self.site.discard_replication_state(vm)  # the lab's agents live in the VM's directory

    def new_vm_targets(self, name, preflight, disks, master_target):
        directory = self.site.vm_dir(name)
        roots = [str(Path(r).resolve()) for r in datastore_dirs(master_target)]
        if not inside(directory.parent.resolve(), roots):
            raise errors.PreconditionFailed(
                f"the on-premises site {self.site.root} is not a datastore of the master target",
                hint="choose the master target of the on-premises site", code="datastore-unreachable",
            )
        directory.mkdir(parents=True, exist_ok=True)
        targets = {}
        for disk in disks:
            path = directory / f"{disk.get('name')}.img"
            with open(path, "ab") as f:
                f.truncate(int(disk.get("size_bytes", 0)))
            targets[disk.get("name", "")] = str(path)
        return targets

    def discard_new_vm(self, name):
        if self.site.get_vm(name) is None:  # only disk files so far: the VM is defined at failback
            shutil.rmtree(self.site.vm_dir(name), ignore_errors=True)

    def vm_exists(self, name):
        return self.site.get_vm(name) is not None

    def define_vm(self, name, preflight, targets):
        self.site.define_vm(name, {disk: Path(path) for disk, path in targets.items()})


def local_failback_rules(
    site: LocalSite, item: ProtectedItemRecord, wanted: str, master_target: ServerRecord | None
) -> list[rules.Verdict]:
    """The local provider's failback rules, one verdict each, in the order they depend on each other."""
    original = item.details.get("onprem", {}).get("vm", "")
    physical = item.details.get("kind") == "physical"
    verdicts: list[rules.Verdict] = []

    def physical_rule() -> str:
        _refuse_physical(item, wanted)
        return f"{item.name} is a physical server: it fails back to a new VM" if physical else f"{item.name} is a VM"

    verdicts.append(rules.check("physical servers fail back to a new VM", physical_rule))
    vm = site.get_vm(original) if original else None
    names = ("original VM exists", "original VM has no snapshots", "original VM's datastore reachable")
    if wanted != "original":
        return verdicts + [rules.skipped(n, f"not needed: failback to a {wanted} VM") for n in names]
    if physical:
        return verdicts + [rules.skipped(n, "not needed: a physical server has no original VM") for n in names]

    def exists() -> str:
        if vm is None:
            raise _original_missing(original or item.name)
        return f"VM {vm.name} exists on-premises"

    verdicts.append(rules.check(names[0], exists))
    if vm is None:
        return verdicts + [rules.skipped(n, "not checked: the original VM is missing") for n in names[1:]]

    def no_snapshots() -> str:
        if vm.snapshots:
            raise _snapshots(vm.name, len(vm.snapshots))
        return f"VM {vm.name} has no snapshots"

    verdicts.append(rules.check(names[1], no_snapshots))
    if master_target is None:
        verdicts.append(rules.skipped(
            names[2], "not checked: no master target chosen yet (reprotect --master-target records it; "
            "`srctl doctor --machine M --master-target MT` checks one)"))
        return verdicts

    def datastore_reachable() -> str:
        roots = [str(Path(r).resolve()) for r in datastore_dirs(master_target)]
        outside = [d.name for d in vm.disks if not inside(d.path.resolve(), roots)]
        if outside:
            raise errors.PreconditionFailed(
                f"the datastore of VM {vm.name} (disks {', '.join(outside)}) is not reachable from "
                f"master target {master_target.hostname}",
                hint="choose a master target whose host mounts that datastore, or reprotect with --target new",
                code="datastore-unreachable",
            )
        return f"the disks of VM {vm.name} are on a datastore of master target {master_target.hostname}"

    verdicts.append(rules.check(names[2], datastore_reachable))
    return verdicts


# --- vSphere -----------------------------------------------------------------------------


class VsphereOnprem(OnpremSite):
    """One vCenter / ESXi endpoint. `vcenter` is its stored record; `open_session` logs in."""

    provider = VSPHERE

    def __init__(self, store: Store, vcenter: VcenterRecord, open_session: SessionFactory) -> None:
        self.store = store
        self.vcenter = vcenter
        self.open_session = open_session
        self._held: ExitStack | None = None
        self._held_session: Session | None = None

    def __enter__(self) -> VsphereOnprem:
        self._held = ExitStack()
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held, self._held_session = self._held, None, None
        if held is not None:
            held.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """One login per `with site:` (opened at its first use), else one per call."""
        if self._held is None:
            with self.open_session(self.vcenter) as session:
                yield session
            return
        if self._held_session is None:
            self._held_session = self._held.enter_context(self.open_session(self.vcenter))
        yield self._held_session

    # -- what is known ----------------------------------------------------------------------

    def stored(self) -> Inventory:
        try:
            return Inventory.from_dict(self.store.get_vcenter_inventory(self.vcenter.id).document)
        except errors.NotFound:
            raise errors.PreconditionFailed(
                f"{self.vcenter.name} has not been discovered yet",
                hint=f"`srctl vcenter discover {self.vcenter.name}`, then retry", code="vsphere-not-discovered",
            ) from None

    def live(self) -> Inventory:
        with self._session() as session:
            return discover(session)

    def find(self, vm_uuid: str) -> Found | None:
        vm = find_vm(self.stored(), vm_uuid)
        return Found(VSPHERE, vm.name, vm.bios_uuid, self.vcenter.id) if vm is not None else None

    # -- the rules ----------------------------------------------------------------------------

    def preflight(self, item, wanted, master_target, datastore, *, fresh):
        _refuse_physical(item, wanted)
        inventory = self.live() if fresh else self.stored()
        decision = check_vsphere_failback(
            inventory.to_dict(),
            vm_uuid=item.details.get("onprem", {}).get("vm_uuid") or None,
            kind="physical" if item.details.get("kind") == "physical" else "vm",
            target="original" if wanted == "original" else "new",
            master_target_vm_uuid=_machine_uuid(master_target),
            datastore=datastore or None,
            endpoint_name=self.vcenter.name,
        )
        ds = inventory.datastore(decision["datastore"]["id"])
        directory = _datastore_dir(ds.name, ds.url, master_target)  # the master target must reach it as files
        vm = decision["vm"]
        return {
            "target": decision["target"],
            "vm": vm["name"] if vm else "",
            "vm_id": vm["id"] if vm else "",
            "host": decision["host"]["id"],
            "datastore": ds.name,
            "datastore_dir": directory,
            "vcenter": self.vcenter.id,
        }

    # -- power ----------------------------------------------------------------------------------

    def _vm_id(self, session: Session, vm: str) -> str | None:
        return operations.find_vm(session, vm)

    def power_off(self, vm):
        with self._session() as session:
            vm_id = self._vm_id(session, vm)
            return vm_id is not None and operations.power_off(session, vm_id)

    def power_on(self, vm):
        with self._session() as session:
            vm_id = self._require(session, vm)
            operations.power_on(session, vm_id)
            return Found(VSPHERE, vm, operations.bios_uuid(session, vm_id), self.vcenter.id)

    def is_running(self, vm):
        with self._session() as session:
            vm_id = self._vm_id(session, vm)
            return vm_id is not None and operations.power_state(session, vm_id) == "poweredOn"

    def _require(self, session: Session, vm: str) -> str:
        vm_id = self._vm_id(session, vm)
        if vm_id is None:
            raise errors.NotFound(
                f"VM {vm} does not exist on {self.vcenter.name}", hint="rediscover the endpoint", code="vm-not-found"
            )
        return vm_id

    # -- disks ------------------------------------------------------------------------------------

    def original_targets(self, preflight, disks, master_target):
        inventory = self.stored()
        vm = inventory.vm(preflight["vm_id"]) or inventory.vm(preflight["vm"])
        if vm is None:
            raise _original_missing(preflight["vm"])
        ordered = sorted(vm.disks, key=lambda d: (d.controller_key, d.unit_number))
        if len(ordered) != len(disks):
            raise errors.PreconditionFailed(
                f"VM {vm.name} has {len(ordered)} disks, the machine in the cloud {len(disks)}",
                hint="the disks must match one to one to fail back to the original VM; reprotect with --target new",
                code="disk-layout-differs",
            )
        targets = {}
        for disk, vdisk in zip(disks, ordered, strict=True):
            size = int(disk.get("size_bytes", 0))
            if vdisk.capacity and size and vdisk.capacity != size:
                raise errors.PreconditionFailed(
                    f"disk {disk.get('name')} ({size} bytes) and {vdisk.label} of VM {vm.name} "
                    f"({vdisk.capacity} bytes) differ in size",
                    hint="reprotect with --target new", code="disk-layout-differs",
                )
            ds_name, relative = operations.parse_datastore_path(vdisk.path)
            ds = inventory.datastore(ds_name) or inventory.datastore(vdisk.datastore)
            directory = _datastore_dir(ds_name, ds.url if ds else "", master_target)
            targets[disk.get("name", "")] = str(PurePosixPath(directory) / flat_extent(relative))
        return targets

    def before_overwrite(self, vm, generation):
        with self._session() as session:
            operations.set_extra_config(session, self._require(session, vm), {GUESTINFO_GENERATION: generation})

    def new_vm_targets(self, name, preflight, disks, master_target):
        """Create the new VM now, powered off, with new thin disks; the master target writes their flat extents."""
        datastore = preflight["datastore"]
        files = [f"{name}/{d.get('name')}.vmdk" for d in disks]
        with self._session() as session:
            if operations.find_vm(session, name) is None:
                operations.create_vm(
                    session, name=name, host_id=preflight["host"], datastore=datastore,
                    disks=[f"[{datastore}] {f}" for f in files],
                    new_disk_sizes=[int(d.get("size_bytes", 0)) for d in disks],
                )
        directory = PurePosixPath(preflight["datastore_dir"])
        return {d.get("name", ""): str(directory / flat_extent(f)) for d, f in zip(disks, files, strict=True)}

    def discard_new_vm(self, name):
        with self._session() as session:
            vm_id = self._vm_id(session, name)
            if vm_id is not None:
                operations.destroy_vm(session, vm_id)

    def vm_exists(self, name):
        with self._session() as session:
            return self._vm_id(session, name) is not None

    def define_vm(self, name, preflight, targets):
        """The VM was made with its disks (`new_vm_targets`); that it is gone now is an error."""
        raise errors.NotFound(
            f"the new VM {name} is gone from {self.vcenter.name}",
            hint="run reprotect again: it makes the VM and copies its disks anew", code="vm-not-found",
        )


def flat_extent(relative: str) -> str:
    """The flat extent of a descriptor `dir/name.vmdk`: `dir/name-flat.vmdk` (ESXi's naming)."""
    path = PurePosixPath(relative)
    return str(path.with_name(path.stem + "-flat.vmdk"))


def _datastore_dir(name: str, url: str, master_target: ServerRecord) -> str:
    roots = datastore_dirs(master_target)
    local = url.removeprefix("ds://").removeprefix("file://").rstrip("/")
    for root in roots:
        if local and root.rstrip("/") == local:
            return root
    for root in roots:
        if PurePosixPath(root).name == name:
            return root
    raise errors.PreconditionFailed(
        f"master target {master_target.hostname} has no directory for datastore {name}",
        hint=f"mount {name} on the master target (at {local or 'a directory named ' + name}) and add it to its "
        "datastore_dirs, then restart it",
        code="datastore-unreachable",
    )


def _machine_uuid(server: ServerRecord) -> str:
    return server.inventory.get("host", {}).get("machine_uuid", "")


def _refuse_physical(item: ProtectedItemRecord, wanted: str) -> None:
    if item.details.get("kind") == "physical" and wanted == "original":
        raise errors.PreconditionFailed(
            f"{item.name} is a physical server; failback to physical is not supported",
            hint="reprotect with --target new: it fails back to a new VM on the master target's host and datastore",
            code="physical-failback",
        )


def _original_missing(name: str) -> errors.PreconditionFailed:
    return errors.PreconditionFailed(
        f"the original VM {name} no longer exists on-premises",
        hint="reprotect with --target new to fail back to a new VM",
        code="original-vm-missing",
    )


def _snapshots(name: str, count: int) -> errors.PreconditionFailed:
    return errors.PreconditionFailed(
        f"VM {name} has {count} snapshot{'s' if count != 1 else ''}",
        hint="delete them, then run reprotect again",
        code="vm-has-snapshots",
    )


# --- choosing --------------------------------------------------------------------------------


def identify(store: Store, local: LocalSite | None, vm_uuid: str) -> Found | None:
    """Which on-premises VM a machine with BIOS UUID `vm_uuid` is: local first, then each endpoint's discovery."""
    if not vm_uuid:
        return None
    if local is not None:
        vm = local.find_vm_by_uuid(vm_uuid)
        if vm is not None:
            return Found(LOCAL, vm.name, vm.uuid)
    for record in store.list_vcenters():
        try:
            inventory = Inventory.from_dict(store.get_vcenter_inventory(record.id).document)
        except errors.NotFound:
            continue
        vm = find_vm(inventory, vm_uuid)
        if vm is not None:
            return Found(VSPHERE, vm.name, vm.bios_uuid, record.id)
    return None


def site_for(env: Any, store: Store, onprem: dict[str, Any], vcenter: str = "") -> OnpremSite:
    """The on-premises site a machine's `details["onprem"]` (or an explicit endpoint) names."""
    endpoint = vcenter or (onprem.get("vcenter", "") if onprem.get("provider") == VSPHERE else "")
    if endpoint:
        if env.vsphere_session is None:
            raise errors.PreconditionFailed("this configuration server cannot reach vCenter", code="provider-missing")
        return VsphereOnprem(store, store.get_vcenter(endpoint), env.vsphere_session)
    return LocalOnprem(env.local_sites().onprem, env.launch)
