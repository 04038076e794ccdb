"""The cloud side of the workflows: one interface, two providers (`local` for the lab, `azure`).

What the workflow steps (site_steps.py) ask of the cloud: recover a machine's
disks at a point, create its VM from them, power it off and on, delete it with
everything that was made for it. Where a machine's cloud is comes from its
forward route (`item.details["forward"]`): a route with `azure_site` ends in
page blobs of that site's storage account, any other ends at a master target
of the local provider.

**Azure.** The replica of each disk is a page blob the process server writes;
a recovery point is a snapshot of it (common/azure/points.py). Recovering
copies the chosen snapshot into a blob of its own (server-side; a step waits
for the copy by returning to the job engine, never by sleeping), because the
replica keeps changing while replication runs and Azure imports a managed disk
only from a blob that stays put. Creating the VM imports each copy as a managed
disk, makes one NIC in the site's subnet (a test failover's in the site's
`test_subnet`, so it cannot meet production) and the VM on them, OS disk first.
Before any of these is created its resource id is recorded in the protected
machine's document, so nothing exists in Azure that the store does not name;
deleting the VM deletes exactly what was recorded (VM, disks, NICs, copies),
and a delete of something already gone is not an error.

"latest" on Azure is the failover's final point when the source could still
take one. When it could not (the site is down), it is the replica blob itself,
copied once the process server reports the paused pair idle (or is silent):
everything the process server had applied, which the failover's final-point
step let it drain from its spool first; a snapshot could be a crash-consistent
interval older. A test failover leaves replication running, so its "latest"
is the newest snapshot.

The VM's UUID, by which its agent is recognised when it registers, is the
Azure `vmId`; the SMBIOS UUID a guest reads may show the first three fields
byte-swapped, so both forms match (`uuid_forms`).
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from siterecovery.common import errors
from siterecovery.common.azure import points as blob_points
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import health, replication
from siterecovery.controller.azure_sites import site_of
from siterecovery.controller.jobs.engine import StepContext, Waiting
from siterecovery.controller.protection.environment import utcnow
from siterecovery.controller.providers.azure.compute import (
    AzureCompute,
    VmSpec,
    resource_group_of,
    resource_name,
)
from siterecovery.controller.store.base import PairRecord, ProtectedItemRecord, Store

LOCAL, AZURE = "local", "azure"
DEFAULT_VM_SIZE = "Standard_D2s_v3"


@dataclass(frozen=True)
class CloudVm:
    """A VM in the cloud and everything made for it, as the protected machine's document keeps it."""

    name: str
    uuid: str
    provider: str
    resources: dict[str, Any] = field(default_factory=dict)


def uuid_forms(value: str) -> set[str]:
    """`value` and its mixed-endian twin (first three fields byte-swapped), lower case.

    SMBIOS stores the first three UUID fields little-endian and readers differ in
    how they print them, so an Azure VM's `vmId` may come back swapped from the guest.
    """
    try:
        parsed = uuidlib.UUID(value)
    except ValueError:
        return {value.lower()} if value else set()
    return {str(parsed), str(uuidlib.UUID(bytes_le=parsed.bytes))}


class CloudSite(Protocol):
    provider: str

    def check_name_free(self, name: str) -> None:
        """Conflict `vm-exists` when a VM of that name is there that this workflow did not make."""

    def recover(self, ctx: StepContext, name: str, pairs: Sequence[PairRecord], points: dict[str, str],
                record: Callable[[dict], None], *, test: bool) -> dict[str, str]:
        """Disk name → what `create_vm` builds the disk from, each at `points[pair id]` ("latest" or a tag).
        `record(resources)` is called with what is about to be created, before it is."""

    def discard_recovered(self, name: str, resources: dict) -> None: ...

    def create_vm(self, ctx: StepContext, item: ProtectedItemRecord, name: str, disks: dict[str, str],
                  record: Callable[[dict], None], *, test: bool) -> CloudVm: ...

    def power_off(self, vm: dict) -> None: ...

    def power_on(self, vm: dict) -> None: ...

    def delete_vm(self, ctx: StepContext, vm: dict) -> list[str]:
        """Delete the VM and everything recorded with it; returns what was deleted."""


# --- local ---------------------------------------------------------------------------------


class LocalCloud:
    """The lab's cloud: a directory site; disks recovered by the pairs' master target (`Materialize`)."""

    provider = LOCAL

    def __init__(self, env: Any) -> None:
        self.env = env
        self.site = env.local_sites().cloud

    def check_name_free(self, name: str) -> None:
        if self.site.get_vm(name) is not None:
            raise errors.Conflict(
                f"the cloud already has a VM {name}",
                hint="an earlier (test) failover left it: `srctl machine delete-cloud-vm` or `srctl machine "
                "test-cleanup` removes it; then try again", code="vm-exists",
            )

    def recover(self, ctx, name, pairs, points, record, *, test):
        from siterecovery.controller.protection.steps import materialize, remove_stale

        disks = {}
        for index, pair in enumerate(pairs):
            output = self.site.vm_dir(name) / f"{pair.disk_name}.img"
            remove_stale(output)  # left by an earlier run of this step that did not finish
            ctx.progress(index / len(pairs), f"recovering {pair.disk_name} at {points[pair.id]}")
            recovered = materialize(self.env, ctx, pair, points[pair.id], output)
            disks[pair.disk_name] = recovered.path
            points[pair.id] = recovered.point
        return disks

    def discard_recovered(self, name, resources):
        if self.site.get_vm(name) is None:  # disks only: the VM was never defined
            shutil.rmtree(self.site.vm_dir(name), ignore_errors=True)

    def create_vm(self, ctx, item, name, disks, record, *, test):
        self.site.define_vm(name, {disk: Path(path) for disk, path in disks.items()},
                            network="isolated" if test else "production")
        vm = self.site.power_on(name, self.env.launch())
        return CloudVm(vm.name, vm.uuid, LOCAL)

    def power_off(self, vm):
        self.site.power_off(vm["vm"])

    def power_on(self, vm):
        self.site.power_on(vm["vm"], self.env.launch())

    def delete_vm(self, ctx, vm):
        return [vm["vm"]] if vm.get("vm") and self.site.delete_vm(vm["vm"]) else []


# --- Azure ---------------------------------------------------------------------------------


_AZURE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def azure_name(*parts: str) -> str:
    """A resource name from parts: letters, digits, `_.-` only, at most 80 characters."""
    return _AZURE_NAME.sub("-", "-".join(p for p in parts if p))[:80].rstrip(".-")


def copy_name(blob_name: str, tag: str, *, test: bool) -> str:
    """Where a point of `blob_name` is copied for a (test) failover: one blob per point and purpose,
    so a test failover's clean-up never deletes a failover's copy."""
    stem = blob_name.removesuffix(".vhd")
    return f"{stem}-{'test' if test else 'failover'}-{urllib.parse.quote(tag, safe='')}.vhd"


@dataclass
class AzureCloud:
    """A machine's cloud in one Azure site (its forward route names it)."""

    provider = AZURE
    store: Store
    site_id: str
    # (site record) -> AzureCompute / the site's blob container; env.azure builds them.
    clients: Any
    # The protected machine: every resource made for it carries tag sr-machine=<id>, and only
    # resources that do are adopted or deleted (a VM of the same name someone else made is not).
    item_id: str = ""
    vm_size: str = DEFAULT_VM_SIZE
    heartbeat_interval: float = 10.0
    clock: Callable[[], Any] = utcnow

    def _record(self):
        return self.store.get_azure_site(self.site_id)

    def compute(self, *, test: bool = False) -> AzureCompute:
        record = self._record()
        if not test:
            return self.clients.compute(record)
        site = site_of(record)
        if not site.test_subnet:
            raise errors.PreconditionFailed(
                f"Azure site {record.name} has no test subnet: a test VM would share the production network",
                hint=f"create an isolated subnet in {site.vnet} and register the site with `srctl azure add … "
                "--test-subnet SUBNET`; a planned failover needs none", code="azure-test-subnet-missing",
            )
        return self.clients.compute(record, subnet=site.test_subnet)

    def container(self) -> Any:
        return self.clients.container(self._record())

    def check_name_free(self, name: str) -> None:
        """Nothing to read here: creating adopts only resources tagged for this machine and refuses any
        other of the same name (`azure-not-ours`) before it changes anything."""

    def recover(self, ctx, name, pairs, points, record, *, test):
        container = self.container()
        chosen: list[tuple[PairRecord, blob_points.BlobPoint, str]] = []
        for pair in pairs:
            blob = pair.target_options["blob_name"]
            if points[pair.id] in ("", "latest") and not test:
                point = self._paused_blob(ctx, pair)
            else:  # a test failover leaves replication running: its "latest" is the newest snapshot
                point = _blob_point(blob_points.list_points(container, blob), points[pair.id], pair)
            chosen.append((pair, point, copy_name(blob, point.tag_id, test=test)))
            points[pair.id] = "latest" if not point.snapshot else point.tag_id
        record({"copies": [dest for _, _, dest in chosen]})
        disks, waiting = {}, []
        for index, (pair, point, dest) in enumerate(chosen):
            ctx.progress(index / len(chosen), f"copying point {point.tag_id} of {pair.disk_name} to blob {dest}")
            disks[pair.disk_name] = blob_points.copy_to_blob(container, point, dest)
            status, copied, total, reason = blob_points.copy_progress(container, dest)
            if status == "pending":
                waiting.append((dest, copied, total))
            elif status != "success":
                blob_points.delete_blob(container, dest)
                raise errors.Unavailable(
                    f"copying point {point.tag_id} into blob {dest} ended {status}: {reason or 'no reason given'}",
                    hint="the copy was deleted; run the workflow again", code="azure-copy-failed",
                )
        if waiting:
            copied = sum(c for _, c, _ in waiting)
            total = sum(t for _, _, t in waiting)
            raise Waiting(f"copying {len(waiting)} point(s) into blobs: {copied} of {total} bytes",
                          delay=2.0, progress=min(copied / max(total, 1), 0.99))
        return disks

    def _paused_blob(self, ctx: StepContext, pair: PairRecord) -> blob_points.BlobPoint:
        """The replica blob itself, as a point, once nothing writes to it: "latest" with everything the
        process server applied (a snapshot may be minutes older). The pairs are paused by now; the
        process server says so with its next heartbeat, or it is silent (then it writes nothing)."""
        status = replication.end_status(self.store, pair)
        server = self.store.get_server(pair.process_server_id)
        silent = health.heartbeat_age(server.last_heartbeat_at, self.clock()) > 3 * self.heartbeat_interval
        if not silent and (status is None or status.state != rpb.PAIR_STATE_PAUSED):
            raise Waiting(f"waiting for the process server to stop writing the blob of {pair.disk_name}",
                          delay=min(2.0, self.heartbeat_interval))
        return blob_points.BlobPoint(
            blob_name=pair.target_options["blob_name"], snapshot="", tag_id=f"latest-{ctx.job.id[:8]}", kind="",
            captured_at=self.clock(), disk_size=pair.disk_size_bytes,
        )

    def discard_recovered(self, name, resources):
        container = self.container()
        for dest in resources.get("copies", []):
            blob_points.delete_blob(container, dest)

    def create_vm(self, ctx, item, name, disks, record, *, test):
        azure = self.compute(test=test)
        group_id = azure.site.resource_group_id
        disk_names = {disk: azure_name(name, disk) for disk in disks}
        nic = azure_name(name, "nic0")
        record({
            "vm_id": f"{group_id}/providers/Microsoft.Compute/virtualMachines/{name}",
            "disk_ids": [f"{group_id}/providers/Microsoft.Compute/disks/{d}" for d in disk_names.values()],
            "nic_ids": [f"{group_id}/providers/Microsoft.Network/networkInterfaces/{nic}"],
        })
        owner = self._owner()
        tags = {"sr-managed": "true", "sr-job": ctx.job.id, **owner}
        os_type = _os_type(self.store, item)
        disk_ids = []
        for index, (disk, uri) in enumerate(disks.items()):
            ctx.progress(0.1 + 0.5 * index / len(disks), f"importing disk {disk_names[disk]} from {uri}")
            info = azure.ensure_disk_from_blob(disk_names[disk], uri, os_type=os_type if index == 0 else "",
                                               tags=tags, owner=owner)
            disk_ids.append(info.id)
        ctx.progress(0.7, f"creating network interface {nic} in subnet {azure.site.subnet}")
        nic_info = azure.ensure_nic(nic, tags=tags, owner=owner)
        ctx.progress(0.8, f"creating VM {name} ({self.vm_size})")
        vm = azure.ensure_vm(VmSpec(name=name, size=self.vm_size, nic_id=nic_info.id, os_type=os_type,
                                    os_disk_id=disk_ids[0], data_disk_ids=tuple(disk_ids[1:]), tags=tags),
                             owner=owner)
        return CloudVm(vm.name, vm.vm_uuid, AZURE, {"vm_id": vm.id, "disk_ids": disk_ids, "nic_ids": [nic_info.id],
                                                     "private_ip": nic_info.private_ip})

    def power_off(self, vm):
        azure = self.compute()
        azure.power_off(vm["vm"])
        azure.deallocate(vm["vm"])

    def power_on(self, vm):
        self.compute().start(vm["vm"])

    def _owner(self) -> dict[str, str]:
        return {"sr-machine": self.item_id}

    def delete_vm(self, ctx, vm):
        """Delete what was recorded, each only if its tags say it was made for this machine (an id is
        recorded before the resource is created, so a name someone else uses may be among them)."""
        azure, owner = self.compute(), self._owner()
        deleted, left = [], []
        if vm.get("vm"):
            ctx.progress(0.1, f"deleting VM {vm['vm']}")
            if azure.delete_vm(vm["vm"], owner=owner) is not None:
                deleted.append(vm.get("vm_id") or vm["vm"])
        for disk_id in vm.get("disk_ids", []):
            ctx.progress(0.4, f"deleting disk {disk_id}")
            ours = azure.delete_disk(resource_name(disk_id), resource_group_of(disk_id), owner=owner)
            (deleted if ours else left).append(disk_id)
        for nic_id in vm.get("nic_ids", []):
            ctx.progress(0.7, f"deleting network interface {nic_id}")
            ours = azure.delete_nic(resource_name(nic_id), resource_group_of(nic_id), owner=owner)
            (deleted if ours else left).append(nic_id)
        if left:
            ctx.progress(0.8, "left alone, not made for this machine: " + ", ".join(left))
        if vm.get("copies"):
            container = self.container()
            for dest in vm["copies"]:
                blob_points.delete_blob(container, dest)
                deleted.append(f"{container.container_name}/{dest}")
        return deleted


def _blob_point(available: list[blob_points.BlobPoint], wanted: str, pair: PairRecord) -> blob_points.BlobPoint:
    """The snapshot for a resolved point: a tag id, or "latest" (the newest snapshot)."""
    quoted = urllib.parse.quote(wanted, safe="")
    if wanted in ("", "latest"):
        if available:
            return available[-1]
    else:
        for point in available:
            if point.tag_id in (wanted, quoted):
                return point
    raise errors.NotFound(
        f"{pair.disk_name} has no recovery point {wanted} in blob {pair.target_options.get('blob_name')}",
        hint="`srctl recovery-points list` shows the points there are (a new pair takes its first once its "
        "initial sync is done)", code="point-not-found",
    )


def _os_type(store: Store, item: ProtectedItemRecord) -> str:
    machine_id = item.details.get("onprem", {}).get("machine_id") or item.machine_id
    try:
        server = store.get_server(store.get_machine(machine_id).server_id)
    except errors.NotFound:
        return "Linux"
    return "Windows" if "windows" in str(server.inventory.get("host", {}).get("os", "")).lower() else "Linux"


# --- which cloud --------------------------------------------------------------------------


def cloud_for(env: Any, store: Store, item: ProtectedItemRecord) -> CloudSite:
    """The cloud of a protected machine, from its forward route."""
    route = item.details.get("forward", {})
    if route.get("azure_site"):
        if env.azure is None:
            raise errors.PreconditionFailed(
                "this configuration server has no Azure access", code="provider-missing",
                hint="it is built in; a server started by a test without it cannot run Azure workflows",
            )
        return AzureCloud(store, route["azure_site"], env.azure, item.id,
                          vm_size=item.details.get("cloud", {}).get("vm_size") or DEFAULT_VM_SIZE,
                          heartbeat_interval=env.heartbeat_interval, clock=env.clock)
    return LocalCloud(env)

