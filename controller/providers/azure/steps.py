"""Job steps for Azure compute, and the job kinds they make.

Each step does one kind of thing through `AzureCompute`, whose operations are
idempotent, so a step may run twice (the engine's rule). Resource names come
from the job's params and nothing else, which is what makes the record of what
a job may have created complete:

- before a step creates anything it reports progress naming the full resource
  id it is about to create, so the store holds the id before Azure does;
- a step that fails cleans up what it created in that attempt (the engine does
  not compensate a failed step); when the clean-up fails too, the step's error
  names the ids left behind, and that message is stored with the step;
- a step that succeeded is compensated by deleting what its params name
  (deletes are no-ops for resources already gone), so a partial or repeated
  execute is undone all the same.

Job kinds (params shapes in each builder's docstring):

    azure-failover               copy-points → create-disks → create-nic → create-vm
    azure-shutdown-vm            power-off → deallocate          (nothing to compensate)
    azure-delete-vm              record-resources → delete-vm → delete-disks → delete-nics
    azure-deploy-process-server  create-nic (static IP) → create-vm (image + cloud-init)

Steps get their `AzureCompute` (and copy-points its blob container) from a
factory called with the step context, so wiring decides where the site's
settings and credential come from. Secrets never
enter params (params are stored as plain JSON): the process server's custom data,
which carries an enrollment passphrase, comes from a second factory at execute time.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from siterecovery.common import errors
from siterecovery.common.azure import points as blob_points
from siterecovery.common.azure.errors import call
from siterecovery.common.logging import get_logger
from siterecovery.controller.jobs.engine import JobKind, Step, StepContext
from siterecovery.controller.providers.azure.compute import (
    AzureCompute,
    ImageRef,
    VmSpec,
    resource_group_of,
    resource_name,
)

log = get_logger(__name__)

ComputeFactory = Callable[[StepContext], AzureCompute]
CustomDataFactory = Callable[[StepContext], bytes]
# The site's blob container (an azure.storage.blob ContainerClient), for copy-points.
StorageFactory = Callable[[StepContext], Any]

FAILOVER = "azure-failover"
SHUTDOWN = "azure-shutdown-vm"
DELETE = "azure-delete-vm"
DEPLOY_PROCESS_SERVER = "azure-deploy-process-server"


def _disk_id(azure: AzureCompute, name: str) -> str:
    return f"{azure.site.resource_group_id}/providers/Microsoft.Compute/disks/{name}"


def _nic_id(azure: AzureCompute, name: str) -> str:
    return f"{azure.site.resource_group_id}/providers/Microsoft.Network/networkInterfaces/{name}"


def _vm_id(azure: AzureCompute, name: str) -> str:
    return f"{azure.site.resource_group_id}/providers/Microsoft.Compute/virtualMachines/{name}"


def _tags(ctx: StepContext, extra: dict | None = None) -> dict[str, str]:
    return {"sr-managed": "true", "sr-job": ctx.job.id, **{k: str(v) for k, v in (extra or {}).items()}}


def _clean_up_after_failure(
    exc: errors.SiteRecoveryError, created: list[str], delete: Callable[[str], None]
) -> errors.SiteRecoveryError:
    """Delete what this attempt created; return the error to raise (naming what is left)."""
    left = []
    for resource_id in reversed(created):
        try:
            delete(resource_id)
        except errors.SiteRecoveryError as cleanup_error:
            log.warning("could not clean up after a failed step", resource=resource_id, error=str(cleanup_error))
            left.append(resource_id)
    if not left:
        return exc
    return type(exc)(
        f"{exc.message}; could not delete what this step created: {', '.join(left)}",
        hint=f"{exc.hint + '; ' if exc.hint else ''}delete those resources in Azure, then retry",
        code=exc.code,
    )


class AzureStep(Step):
    def __init__(self, compute_for: ComputeFactory) -> None:
        self.compute_for = compute_for


def copy_blob_name(point: dict) -> str:
    """Where a failover copies a point: `<blob without .vhd>-failover-<tag>.vhd` (one blob per point)."""
    stem = point["blob"].removesuffix(".vhd")
    return f"{stem}-failover-{urllib.parse.quote(point['tag_id'], safe='')}.vhd"


class CopyPoints(Step):
    """Copy each disk's chosen recovery point (a snapshot) into a blob of its own.

    Azure imports a managed disk from a blob, and the replica blob keeps
    changing while replication runs, so the chosen snapshot is copied first,
    server-side, within the storage account (points.copy_to_blob). Idempotent:
    a copy already made from the same snapshot is kept, one still running is
    waited for. Before a copy starts, the step's progress names the blob it is
    about to create; a copy that fails is deleted before the step fails.

    params["disks"][i]["point"] = {blob, tag_id} (the replica blob and the point's
    tag id), optional params["disks"][i]["copy_blob"] (default `copy_blob_name`).
    Disks with a `source_uri` instead are imported as they are. Output:
    {"source_uris": {disk name: copy URL}, "copies": [copy blob names]}.
    """

    name = "copy-points"

    def __init__(
        self,
        storage_for: StorageFactory | None,
        *,
        poll_seconds: float = 5.0,
        max_wait_seconds: float = 6 * 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.storage_for = storage_for
        self.poll_seconds = poll_seconds
        self.max_wait_seconds = max_wait_seconds
        self.sleep = sleep

    def _copies(self, ctx: StepContext) -> list[tuple[dict, str]]:
        return [(d, d.get("copy_blob") or copy_blob_name(d["point"])) for d in ctx.params["disks"] if d.get("point")]

    def execute(self, ctx: StepContext) -> dict:
        copies = self._copies(ctx)
        if not copies:
            return {"source_uris": {}, "copies": []}
        if self.storage_for is None:
            raise errors.PreconditionFailed(
                f"job {ctx.job.id} names recovery points, but this server has no storage access for Azure jobs",
                code="azure-storage-missing",
            )
        container = self.storage_for(ctx)
        uris: dict[str, str] = {}
        for index, (disk, dest) in enumerate(copies):
            point = disk["point"]
            chosen = self._find(container, point)
            where = f"{container.container_name}/{dest}"
            ctx.progress(index / len(copies), f"copying point {point['tag_id']} of {point['blob']} to blob {where}")
            started_here = not _exists(container, dest)
            try:
                uris[disk["name"]] = blob_points.copy_to_blob(container, chosen, dest)
                self._wait(ctx, container, dest, index, len(copies))
            except errors.SiteRecoveryError as exc:
                created = [dest] if started_here else []
                raise _clean_up_after_failure(exc, created, lambda name: delete_blob(container, name)) from exc
        ctx.progress(1.0, f"{len(copies)} point(s) copied: {', '.join(dest for _, dest in copies)}")
        return {"source_uris": uris, "copies": [dest for _, dest in copies]}

    def _find(self, container: Any, point: dict) -> blob_points.BlobPoint:
        tag = urllib.parse.quote(point["tag_id"], safe="")
        for found in blob_points.list_points(container, point["blob"]):
            if found.tag_id == tag:
                return found
        raise errors.NotFound(
            f"recovery point {point['tag_id']} of {point['blob']} does not exist (any more)",
            hint="it may have left the retention window; `srctl recovery-points list` shows the points there are",
            code="point-not-found",
        )

    def _wait(self, ctx: StepContext, container: Any, dest: str, index: int, count: int) -> None:
        waited = 0.0
        while True:
            status, copied, total, reason = blob_points.copy_progress(container, dest)
            if status == "success":
                return
            if status != "pending":
                raise errors.Unavailable(
                    f"copying into blob {dest} ended {status}: {reason or 'no reason given'}",
                    hint="the step is retried; if it fails again, check the storage account in the Azure portal",
                    code="azure-copy-failed",
                )
            if waited >= self.max_wait_seconds:
                raise errors.Unavailable(
                    f"copying into blob {dest} has not finished after {waited:.0f} s ({copied} of {total} bytes)",
                    hint="the copy goes on in Azure; retry the job later and it waits for it again",
                    code="azure-copy-slow",
                )
            share = copied / total if total else 0.0
            ctx.progress((index + share) / count, f"copying into blob {dest}: {copied} of {total} bytes")
            self.sleep(self.poll_seconds)
            waited += self.poll_seconds

    def compensate(self, ctx: StepContext) -> None:
        copies = self._copies(ctx)
        if not copies or self.storage_for is None:
            return
        container = self.storage_for(ctx)
        for _disk, dest in copies:
            ctx.progress(0.0, f"deleting blob {container.container_name}/{dest}")
            delete_blob(container, dest)


def _exists(container: Any, name: str) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    def probe() -> bool:
        try:
            container.get_blob_client(name).get_blob_properties()
            return True
        except ResourceNotFoundError:
            return False

    return call(f"read blob {name}", probe)


def delete_blob(container: Any, name: str) -> None:
    """Delete a blob (an unfinished copy is aborted by the delete); nothing to do when it is gone."""
    from azure.core.exceptions import ResourceNotFoundError

    def delete() -> None:
        try:
            container.get_blob_client(name).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            pass

    call(f"delete blob {name}", delete)


class CreateDisks(AzureStep):
    """Managed disks imported from page blobs.

    params["disks"]: [{name, source_uri, os_type?}], or {name, point, os_type?}
    for a disk whose recovery point copy-points copied (its URL is that step's output).
    """

    name = "create-disks"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        disks = ctx.params["disks"]
        copied = ctx.outputs.get("copy-points", {}).get("source_uris", {})
        ids, created = [], []
        try:
            for index, disk in enumerate(disks):
                disk_id = _disk_id(azure, disk["name"])
                source_uri = disk.get("source_uri") or copied.get(disk["name"])
                if not source_uri:
                    raise errors.InvalidInput(
                        f"disk {disk['name']} names neither a source blob nor a copied point", code="azure-disk-source"
                    )
                existed = azure.find_disk(disk["name"]) is not None
                ctx.progress(index / len(disks), f"creating disk {disk_id}")
                info = azure.ensure_disk_from_blob(
                    disk["name"], source_uri, os_type=disk.get("os_type", ""), tags=_tags(ctx)
                )
                if not existed:
                    created.append(info.id or disk_id)
                ids.append(info.id or disk_id)
        except errors.SiteRecoveryError as exc:
            raise _clean_up_after_failure(exc, created, lambda rid: azure.delete_disk(rid.rsplit("/", 1)[-1])) from exc
        ctx.progress(1.0, f"{len(ids)} disk(s) ready")
        return {"disk_ids": ids}

    def compensate(self, ctx: StepContext) -> None:
        azure = self.compute_for(ctx)
        for disk in reversed(ctx.params["disks"]):
            ctx.progress(0.0, f"deleting disk {_disk_id(azure, disk['name'])}")
            azure.delete_disk(disk["name"])


class CreateNic(AzureStep):
    """A NIC in the site's subnet. params["nic"]: {name, private_ip?}."""

    name = "create-nic"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        nic = ctx.params["nic"]
        nic_id = _nic_id(azure, nic["name"])
        existed = azure.find_nic(nic["name"]) is not None
        ctx.progress(0.0, f"creating network interface {nic_id}")
        try:
            info = azure.ensure_nic(nic["name"], private_ip=nic.get("private_ip", ""), tags=_tags(ctx))
        except errors.SiteRecoveryError as exc:
            created = [] if existed else [nic_id]
            raise _clean_up_after_failure(exc, created, lambda rid: azure.delete_nic(nic["name"])) from exc
        ctx.progress(1.0, f"network interface {info.name} has {info.private_ip or 'a dynamic address'}")
        return {"nic_id": info.id or nic_id, "private_ip": info.private_ip}

    def compensate(self, ctx: StepContext) -> None:
        azure = self.compute_for(ctx)
        name = ctx.params["nic"]["name"]
        ctx.progress(0.0, f"deleting network interface {_nic_id(azure, name)}")
        azure.delete_nic(name)


class CreateVm(AzureStep):
    """The VM, on the disks and NIC of earlier steps, or from an image with custom data.

    params["vm"]: {name, size, os_type?, tags?, image?: {publisher, offer, sku, version?},
    admin_username?, ssh_public_key?}.
    """

    name = "create-vm"

    def __init__(self, compute_for: ComputeFactory, custom_data_for: CustomDataFactory | None = None) -> None:
        super().__init__(compute_for)
        self.custom_data_for = custom_data_for

    def _spec(self, ctx: StepContext, azure: AzureCompute) -> VmSpec:
        vm = ctx.params["vm"]
        nic_id = ctx.outputs["create-nic"]["nic_id"]
        tags = _tags(ctx, vm.get("tags"))
        if "image" in vm:
            return VmSpec(
                name=vm["name"],
                size=vm["size"],
                nic_id=nic_id,
                image=ImageRef(**vm["image"]),
                admin_username=vm["admin_username"],
                ssh_public_key=vm["ssh_public_key"],
                custom_data=self.custom_data_for(ctx) if self.custom_data_for else b"",
                tags=tags,
            )
        disk_ids = ctx.outputs["create-disks"]["disk_ids"]
        return VmSpec(
            name=vm["name"],
            size=vm["size"],
            nic_id=nic_id,
            os_type=vm.get("os_type", "Linux"),
            os_disk_id=disk_ids[0],
            data_disk_ids=tuple(disk_ids[1:]),
            tags=tags,
        )

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        spec = self._spec(ctx, azure)
        vm_id = _vm_id(azure, spec.name)
        existed = azure.find_vm(spec.name) is not None
        ctx.progress(0.0, f"creating VM {vm_id}")
        try:
            info = azure.ensure_vm(spec)
        except errors.SiteRecoveryError as exc:
            created = [] if existed else [vm_id]
            raise _clean_up_after_failure(exc, created, lambda rid: azure.delete_vm(spec.name)) from exc
        ctx.progress(1.0, f"VM {info.name} is {info.provisioning_state}")
        return {"vm_id": info.id or vm_id}

    def compensate(self, ctx: StepContext) -> None:
        azure = self.compute_for(ctx)
        name = ctx.params["vm"]["name"]
        ctx.progress(0.0, f"deleting VM {_vm_id(azure, name)}")
        azure.delete_vm(name)


class PowerOffVm(AzureStep):
    """Shut the VM down (params["vm"]["name"]). Not undone: a VM left off is safe."""

    name = "power-off"

    def execute(self, ctx: StepContext) -> dict:
        info = self.compute_for(ctx).power_off(ctx.params["vm"]["name"])
        ctx.progress(1.0, f"VM {info.name} is {info.power_state}")
        return {"power_state": info.power_state}

    def compensate(self, ctx: StepContext) -> None:
        pass


class DeallocateVm(AzureStep):
    """Release the VM's compute; the disks stay. Not undone."""

    name = "deallocate"

    def execute(self, ctx: StepContext) -> dict:
        info = self.compute_for(ctx).deallocate(ctx.params["vm"]["name"])
        ctx.progress(1.0, f"VM {info.name} is {info.power_state}")
        return {"power_state": info.power_state}

    def compensate(self, ctx: StepContext) -> None:
        pass


class RecordVmResources(AzureStep):
    """Record the VM's disks and NICs before anything is deleted, so later steps (and people) know them.

    params: {vm: {name}, disk_ids?: [...], nic_ids?: [...]} - ids known from the
    failover, used when the VM is already gone.
    """

    name = "record-resources"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        vm = azure.find_vm(ctx.params["vm"]["name"])
        disk_ids = list(ctx.params.get("disk_ids", []))
        nic_ids = list(ctx.params.get("nic_ids", []))
        if vm is not None:
            disk_ids = _merge([vm.os_disk_id, *vm.data_disk_ids], disk_ids)
            nic_ids = _merge(vm.nic_ids, nic_ids)
        ctx.progress(1.0, f"to delete: {', '.join([*disk_ids, *nic_ids]) or 'only the VM'}")
        return {"vm_id": vm.id if vm else "", "disk_ids": disk_ids, "nic_ids": nic_ids}

    def compensate(self, ctx: StepContext) -> None:
        pass


def _merge(first: Iterable[str], second: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    for item in [*first, *second]:
        if item:
            seen.setdefault(item.lower(), item)
    return list(seen.values())


class DeleteVm(AzureStep):
    name = "delete-vm"

    def execute(self, ctx: StepContext) -> dict:
        gone = self.compute_for(ctx).delete_vm(ctx.params["vm"]["name"])
        return {"deleted": gone is not None}

    def compensate(self, ctx: StepContext) -> None:
        pass


class DeleteDisks(AzureStep):
    name = "delete-disks"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        ids = ctx.outputs["record-resources"]["disk_ids"]
        for index, disk_id in enumerate(ids):
            ctx.progress(index / len(ids), f"deleting disk {disk_id}")
            azure.delete_disk(resource_name(disk_id), resource_group_of(disk_id))
        return {"deleted": ids}

    def compensate(self, ctx: StepContext) -> None:
        pass


class DeleteNics(AzureStep):
    name = "delete-nics"

    def execute(self, ctx: StepContext) -> dict:
        azure = self.compute_for(ctx)
        ids = ctx.outputs["record-resources"]["nic_ids"]
        for index, nic_id in enumerate(ids):
            ctx.progress(index / len(ids), f"deleting network interface {nic_id}")
            azure.delete_nic(resource_name(nic_id), resource_group_of(nic_id))
        return {"deleted": ids}

    def compensate(self, ctx: StepContext) -> None:
        pass


# --- job kinds -------------------------------------------------------------------------


def failover_kind(compute_for: ComputeFactory, storage_for: StorageFactory | None = None, **copy: Any) -> JobKind:
    """Fail a machine over to Azure.

    params: {disks: [{name, source_uri | point: {blob, tag_id}, copy_blob?, os_type?}] (OS disk first),
             nic: {name, private_ip?}, vm: {name, size, os_type?, tags?}}
    `copy`: CopyPoints' pacing (poll_seconds, max_wait_seconds, sleep), for tests.
    """
    return JobKind(
        FAILOVER,
        [CopyPoints(storage_for, **copy), CreateDisks(compute_for), CreateNic(compute_for), CreateVm(compute_for)],
    )


def shutdown_kind(compute_for: ComputeFactory) -> JobKind:
    """Failback's first move in Azure: power off, then deallocate. params: {vm: {name}}."""
    return JobKind(SHUTDOWN, [PowerOffVm(compute_for), DeallocateVm(compute_for)])


def delete_kind(compute_for: ComputeFactory) -> JobKind:
    """After reprotect, on request: delete the VM, its disks and NICs. params: {vm: {name}, disk_ids?, nic_ids?}."""
    return JobKind(
        DELETE,
        [RecordVmResources(compute_for), DeleteVm(compute_for), DeleteDisks(compute_for), DeleteNics(compute_for)],
    )


def deploy_process_server_kind(compute_for: ComputeFactory, custom_data_for: CustomDataFactory) -> JobKind:
    """A process server VM in a subnet with a static IP, enrolled through cloud-init.

    params: {nic: {name, private_ip}, vm: {name, size, image: {...}, admin_username, ssh_public_key}}
    """
    return JobKind(DEPLOY_PROCESS_SERVER, [CreateNic(compute_for), CreateVm(compute_for, custom_data_for)])


# Where the default install command puts siterecovery on the VM (a venv: Ubuntu's own Python
# refuses pip installs, PEP 668); cloud-init looks for sr-process-server there first.
INSTALL_DIR = "/opt/siterecovery"


def process_server_cloud_init(*, config_server: str, passphrase: str, install_command: str) -> bytes:
    """cloud-init user data that installs the process server and enrolls it.

    The passphrase lands in a 0600 file read once by `--passphrase-file`. Azure
    keeps custom data with the VM model, readable by whoever may read the VM:
    rotate the passphrase (`srctl passphrase rotate`) after deploying.
    """
    for name, value in (("config_server", config_server), ("install_command", install_command)):
        if not value or "\n" in value:
            raise errors.InvalidInput(f"{name} must be one non-empty line", code="azure-cloud-init")
    if not passphrase or "\n" in passphrase.strip():
        raise errors.InvalidInput("the passphrase must be one non-empty line", code="azure-cloud-init")
    lines = [
        "#cloud-config",
        "write_files:",
        "  - path: /etc/siterecovery/passphrase",
        "    permissions: '0600'",
        "    content: |",
        f"      {passphrase.strip()}",
        "runcmd:",
        f"  - [sh, -c, {_yaml_quote(install_command)}]",
        "  - [sh, -c, "
        + _yaml_quote(
            f"PATH={INSTALL_DIR}/bin:$PATH sr-process-server --server "
            + config_server
            + " --passphrase-file /etc/siterecovery/passphrase --state-dir /var/lib/siterecovery/process-server"
            + " >/var/log/sr-process-server.log 2>&1 &"
        )
        + "]",
    ]
    return ("\n".join(lines) + "\n").encode()


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def kinds(
    compute_for: ComputeFactory, custom_data_for: CustomDataFactory, storage_for: StorageFactory | None = None
) -> list[JobKind]:
    """Every Azure job kind, to register with a runner."""
    return [
        failover_kind(compute_for, storage_for),
        shutdown_kind(compute_for),
        delete_kind(compute_for),
        deploy_process_server_kind(compute_for, custom_data_for),
    ]


