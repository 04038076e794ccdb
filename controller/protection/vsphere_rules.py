"""The failback rules of DESIGN §1 for an on-premises site run by vSphere, checked on the stored inventory.

`check_vsphere_failback` reads only the discovery document of one endpoint
(`vcenter_inventories`, see `providers/vsphere/model.py`), never a live
session: the configuration server runs it synchronously when a reprotect to
on-premises is asked for, before anything changes, and a refusal is a
`PreconditionFailed` whose message names what is wrong and whose hint says
what to do. When every rule passes it returns where failback goes.

The rules are checked in this order, so the first refusal is the one the
others depend on:

1. what was asked (a physical server fails back only to a new VM);
2. what the inventory must hold: the master target VM and its host (a host
   this endpoint does not know, e.g. a standalone ESXi host, must be added and
   discovered first), and for the original VM, the VM (gone: `--target new`)
   and its host;
3. the target VM itself: no snapshots;
4. the hosts: no ESXi free edition (it has no write API), and a Linux master
   target with `disk.EnableUUID=TRUE`;
5. where the disks are written: the datastore mounted on the master target's
   host;
6. whether the account may do it: the failback privileges
   (`privileges.FAILBACK_*`) on those datastores and hosts, and for a new
   VM `VirtualMachine.Inventory.Create` on its datacenter's VM folder (where
   vSphere checks it), as discovery computed them for the endpoint's account.

Error codes shared with the local provider's `site_steps.onprem_preflight`
(`physical-failback`, `original-vm-missing`, `vm-has-snapshots`,
`datastore-unreachable`) mean the same rule; the others are `vsphere-*`.

The inventory is as fresh as the last discovery: a snapshot taken since then
is not seen until the endpoint is discovered again, so a job that acts later
should run the check again on a fresh discovery first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from siterecovery.common import errors
from siterecovery.controller.protection import rules
from siterecovery.controller.providers.vsphere.facts import is_free_edition
from siterecovery.controller.providers.vsphere.model import Datastore, Host, Inventory, VirtualMachine
from siterecovery.controller.providers.vsphere.privileges import (
    FAILBACK_DATASTORE_PRIVILEGES,
    FAILBACK_FOLDER_PRIVILEGES,
    FAILBACK_HOST_PRIVILEGES,
    missing,
)

Kind = Literal["vm", "physical"]
Target = Literal["original", "new"]


def check_vsphere_failback(
    inventory: dict[str, Any],
    *,
    vm_uuid: str | None,
    kind: Kind,
    target: Target,
    master_target_vm_uuid: str,
    datastore: str | None,
    endpoint_name: str = "",
) -> dict[str, Any]:
    """Check every failback rule against one endpoint's discovery document; return the decision.

    `vm_uuid` is the original VM's instance or BIOS UUID (or its moid);
    `master_target_vm_uuid` the master target VM's. `datastore` (name or id)
    is where a new VM goes, by default the master target's own datastore; for
    the original VM the disks stay where they are and it is not used.
    `endpoint_name` is the endpoint's name in `srctl vcenter`, for the hints.

    Returns {"target", "endpoint", "vm": {"id", "name"} or None for a new VM,
    "host": {"id", "name"} (where the failed-back VM runs),
    "datastore": {"id", "name"} (where its disks are, or go),
    "master_target": {"vm": {...}, "host": {...}}}.
    Raises PreconditionFailed (the first broken rule) or InvalidInput (bad arguments).
    """
    verdicts, decision = vsphere_failback_rules(
        inventory, vm_uuid=vm_uuid, kind=kind, target=target, master_target_vm_uuid=master_target_vm_uuid,
        datastore=datastore, endpoint_name=endpoint_name,
    )
    rules.raise_first(verdicts)
    assert decision is not None
    return decision


def vsphere_failback_rules(
    inventory: dict[str, Any],
    *,
    vm_uuid: str | None,
    kind: Kind,
    target: Target,
    master_target_vm_uuid: str,
    datastore: str | None,
    endpoint_name: str = "",
) -> tuple[list[rules.Verdict], dict[str, Any] | None]:
    """Every rule's verdict, in the order above, and the decision when none failed.

    A rule whose premise failed (the master target VM is not in the inventory,
    the original VM is gone) is skipped with the reason; the first failure is
    the refusal `check_vsphere_failback` raises.
    """
    if kind not in ("vm", "physical"):
        raise errors.InvalidInput(f"unknown machine kind {kind!r}", hint="use vm or physical")
    if target not in ("original", "new"):
        raise errors.InvalidInput(f"unknown failback target {target!r}", hint="use original or new")
    if not master_target_vm_uuid:
        raise errors.InvalidInput(
            "no master target VM given", hint="choose the master target to fail back through"
        )
    inv = Inventory.from_dict(inventory or {})
    name = endpoint_name or "ENDPOINT"
    where = inv.endpoint or name
    verdicts: list[rules.Verdict] = []

    # 1. What was asked.
    def asked() -> str:
        if kind == "physical" and target == "original":
            raise errors.PreconditionFailed(
                "a physical server fails back only to a new VM; failback to physical is not supported",
                hint="reprotect with --target new: it fails back to a new VM on the master target's host and datastore",
                code="physical-failback",
            )
        return f"failback to the {target} VM of a {'physical server' if kind == 'physical' else 'VM'}"

    verdicts.append(rules.check("physical servers fail back to a new VM", asked))

    # 2. What the inventory must hold.
    mt = find_vm(inv, master_target_vm_uuid)
    mt_host = inv.host(mt.host) if mt is not None and mt.host else None

    def master_target_known() -> str:
        if mt is None or mt_host is None:
            raise errors.PreconditionFailed(
                f"master target VM {master_target_vm_uuid} is not in the inventory of {where}"
                + ("" if mt is None else f" (its host {mt.host} is not)")
                + "; if it runs on a standalone ESXi host, that host has not been added and discovered",
                hint=f"add its ESXi host (`srctl vcenter add`) or its vCenter, run `srctl vcenter discover {name}`, "
                "then retry with that endpoint",
                code="vsphere-host-not-discovered",
            )
        return f"master target VM {mt.name} on host {mt_host.name} is in the inventory of {where}"

    verdicts.append(rules.check("master target VM and host discovered", master_target_known))
    vm: VirtualMachine | None = None
    vm_host: Host | None = None
    original_rules = ("original VM exists", "original VM's host discovered", "original VM has no snapshots")
    if target != "original":
        verdicts += [rules.skipped(r, "not needed: failback to a new VM") for r in original_rules]
    else:
        vm = find_vm(inv, vm_uuid) if vm_uuid else None

        def exists() -> str:
            if vm is None:
                raise errors.PreconditionFailed(
                    f"the original VM {vm_uuid or '(none recorded)'} no longer exists on {where} "
                    "(as of its last discovery)",
                    hint="reprotect with --target new to fail back to a new VM on the master target's host and "
                    f"datastore (or, if the VM was moved to a host {where} does not manage, add and discover that "
                    "host first)",
                    code="original-vm-missing",
                )
            return f"VM {vm.name} exists on {where}"

        verdicts.append(rules.check(original_rules[0], exists))
        if vm is None:
            verdicts += [rules.skipped(r, "not checked: the original VM is missing") for r in original_rules[1:]]
        else:
            vm_host = inv.host(vm.host) if vm.host else None

            def host_known() -> str:
                if vm_host is None:
                    raise errors.PreconditionFailed(
                        f"the host {vm.host or '(none)'} of VM {vm.name} is not in the inventory of {where}",
                        hint=f"add that ESXi host (`srctl vcenter add`), run `srctl vcenter discover {name}`, then retry",
                        code="vsphere-host-not-discovered",
                    )
                return f"VM {vm.name} runs on host {vm_host.name}"

            verdicts.append(rules.check(original_rules[1], host_known))

            # 3. The target VM itself.
            def no_snapshots() -> str:
                if vm.snapshots:
                    count = len(vm.snapshots)
                    names = ", ".join(s.name for s in vm.snapshots)
                    raise errors.PreconditionFailed(
                        f"VM {vm.name} has {count} snapshot{'s' if count != 1 else ''} ({names})",
                        hint="delete them, then run reprotect again",
                        code="vm-has-snapshots",
                    )
                return f"VM {vm.name} has no snapshots"

            verdicts.append(rules.check(original_rules[2], no_snapshots))

    # 4. The hosts.
    def licensed() -> str:
        for host, role in (
            (mt_host, "the master target's host"),
            (vm_host, f"the host of VM {vm.name if vm else ''}"),
        ):
            if host is not None and is_free_edition(host.edition):
                raise errors.PreconditionFailed(
                    f"{role} {host.name} runs the free ESXi edition ({host.edition}); it cannot be a failback "
                    "target (its API is read-only)",
                    hint="assign a vSphere licence to that host, or use a master target on a licensed host "
                    "(or --target new), then retry",
                    code="vsphere-free-esxi",
                )
        return "no host involved runs the free ESXi edition"

    verdicts.append(rules.check("no free ESXi edition", licensed))
    if mt is None or mt_host is None:
        missing_mt = "not checked: the master target VM is not in the inventory"
        verdicts += [rules.skipped(r, missing_mt) for r in
                     ("disk.EnableUUID on a Linux master target", "datastore reachable", "account privileges")]
        return verdicts, None

    def enable_uuid() -> str:
        if _is_linux(mt) and mt.enable_uuid is not True:
            state = "not set" if mt.enable_uuid is None else "FALSE"
            raise errors.PreconditionFailed(
                f"master target VM {mt.name} has disk.EnableUUID {state}; a Linux master target cannot identify "
                "the disks attached to it without it",
                hint=f"set disk.EnableUUID=TRUE in the advanced settings of VM {mt.name} (Edit Settings > VM Options "
                f"> Advanced > Configuration Parameters), power-cycle it, run `srctl vcenter discover {name}`, "
                "then retry",
                code="vsphere-enable-uuid",
            )
        return f"master target VM {mt.name}: " + ("disk.EnableUUID=TRUE" if _is_linux(mt) else "Windows, not needed")

    verdicts.append(rules.check("disk.EnableUUID on a Linux master target", enable_uuid))
    if target == "original" and (vm is None or vm_host is None):
        verdicts += [rules.skipped(r, "not checked: the original VM or its host is missing")
                     for r in ("datastore reachable", "account privileges")]
        return verdicts, None

    # 5. Where the disks are written.
    stores: list[Datastore] = []

    def reachable() -> str:
        if vm is not None:
            stores.extend(_datastores_of(inv, vm))
            unreachable = [d for d in stores if mt_host.id not in d.hosts]
            if unreachable:
                raise errors.PreconditionFailed(
                    f"datastore {', '.join(d.name for d in unreachable)} of VM {vm.name} is not mounted on "
                    f"{mt_host.name}, the host of master target {mt.name}",
                    hint=f"use a master target on a host that mounts {unreachable[0].name}, or reprotect with "
                    "--target new",
                    code="datastore-unreachable",
                )
            return f"datastore {', '.join(d.name for d in stores)} of VM {vm.name} is mounted on {mt_host.name}"
        stores.append(_new_vm_datastore(inv, mt, mt_host, datastore))
        return f"the new VM goes on datastore {stores[0].name} of host {mt_host.name}"

    verdict = rules.check("datastore reachable", reachable)
    verdicts.append(verdict)
    if verdict.status != "ok":
        verdicts.append(rules.skipped("account privileges", "not checked: no datastore to check them on"))
        return verdicts, None
    run_host = vm_host if vm is not None else mt_host
    assert run_host is not None

    # 6. What the account may do.
    def privileges() -> str:
        hosts = [mt_host] + ([vm_host] if vm_host is not None and vm_host.id != mt_host.id else [])
        gaps = [(f"datastore {d.name}", missing(d.privileges, FAILBACK_DATASTORE_PRIVILEGES)) for d in stores]
        gaps += [(f"host {h.name}", missing(h.privileges, FAILBACK_HOST_PRIVILEGES)) for h in hosts]
        folders = []
        if vm is None:  # a new VM is created in its datacenter's VM folder
            dc = inv.datacenter(mt_host.datacenter)
            if dc is None or not dc.vm_folder:
                raise errors.PreconditionFailed(
                    f"the VM folder of host {mt_host.name}'s datacenter is not in the inventory of {where}",
                    hint=f"run `srctl vcenter discover {name}` (inventories discovered by older versions lack it), "
                    "then retry",
                    code="vsphere-inventory-stale",
                )
            folders.append(f"the VM folder of datacenter {dc.name}")
            gaps.append((folders[-1], missing(dc.vm_folder_privileges, FAILBACK_FOLDER_PRIVILEGES)))
        gaps = [(entity, lacking) for entity, lacking in gaps if lacking]
        account = inv.user or "the account"
        if gaps:
            raise errors.PreconditionFailed(
                f"account {account} on {where} lacks "
                + "; ".join(f"{', '.join(lacking)} on {entity}" for entity, lacking in gaps),
                hint="update the vCenter credentials with an account that has the needed privileges "
                f"(`srctl vcenter update-credentials {name}`), run `srctl vcenter discover {name}`, then retry",
                code="vsphere-missing-privileges",
            )
        return f"account {account} has the failback privileges on " + ", ".join(
            [f"datastore {d.name}" for d in stores] + [f"host {h.name}" for h in hosts] + folders)

    verdicts.append(rules.check("account privileges", privileges))
    if any(v.status == "failed" for v in verdicts):
        return verdicts, None
    return verdicts, {
        "target": target,
        "endpoint": inv.endpoint,
        "vm": _ref(vm) if vm is not None else None,
        "host": _ref(run_host),
        "datastore": _ref(stores[0]),
        "master_target": {"vm": _ref(mt), "host": _ref(mt_host)},
    }


def _ref(item: VirtualMachine | Host | Datastore) -> dict[str, str]:
    return {"id": item.id, "name": item.name}


def find_vm(inv: Inventory, key: str | None) -> VirtualMachine | None:
    """The VM whose moid, instance UUID or BIOS UUID is `key` (UUIDs compared case-insensitively)."""
    if not key:
        return None
    wanted = key.strip().lower()
    return next(
        (v for v in inv.vms if v.id == key or wanted in (v.instance_uuid.lower(), v.bios_uuid.lower())),
        None,
    )


def _is_linux(vm: VirtualMachine) -> bool:
    """A master target is Linux unless its guest id says Windows (vSphere's ids start with "win")."""
    return not vm.guest_id.lower().startswith("win")


def _datastores_of(inv: Inventory, vm: VirtualMachine) -> list[Datastore]:
    """The datastores holding the VM's disks, in disk order, each once."""
    found: list[Datastore] = []
    for disk in vm.disks:
        ds = inv.datastore(disk.datastore) or inv.datastore(_bracket_name(disk.path))
        if ds is None:
            raise errors.PreconditionFailed(
                f"datastore of disk {disk.label or disk.path} of VM {vm.name} is not in the inventory of "
                f"{inv.endpoint}",
                hint="rediscover the endpoint (`srctl vcenter discover`), then retry",
                code="vsphere-datastore-not-discovered",
            )
        if ds not in found:
            found.append(ds)
    if not found:
        raise errors.PreconditionFailed(
            f"VM {vm.name} has no disks on a datastore",
            hint="reprotect with --target new",
            code="vsphere-vm-without-disks",
        )
    return found


def _new_vm_datastore(inv: Inventory, mt: VirtualMachine, host: Host, wanted: str | None) -> Datastore:
    """The datastore a new VM goes on: the one asked for, else the master target's first disk's."""
    if wanted:
        ds = inv.datastore(wanted)
        if ds is None:
            raise errors.PreconditionFailed(
                f"datastore {wanted} is not in the inventory of {inv.endpoint}",
                hint=f"choose one of the datastores of host {host.name}: {_names(inv, host.datastores)}",
                code="datastore-unreachable",
            )
    else:
        candidates = _datastores_of(inv, mt) if mt.disks else []
        ds = next((d for d in candidates if host.id in d.hosts), None)
        if ds is None:
            raise errors.PreconditionFailed(
                f"master target {mt.name} has no disk on a datastore of its host {host.name}",
                hint=f"choose the datastore with --datastore: {_names(inv, host.datastores)}",
                code="datastore-unreachable",
            )
    if host.id not in ds.hosts:
        raise errors.PreconditionFailed(
            f"datastore {ds.name} is not mounted on {host.name}, the host of master target {mt.name}",
            hint=f"choose a datastore that host mounts ({_names(inv, host.datastores)}), or a master target on a "
            f"host that mounts {ds.name}",
            code="datastore-unreachable",
        )
    return ds


def _names(inv: Inventory, ids: Iterable[str]) -> str:
    names = [d.name for d in (inv.datastore(i) for i in ids) if d is not None]
    return ", ".join(sorted(names)) or "none"


def _bracket_name(path: str) -> str:
    """The datastore name in a datastore path: `[LocalDS_0] dir/x.vmdk` → `LocalDS_0`."""
    return path[1 : path.index("]")] if path.startswith("[") and "]" in path else ""
