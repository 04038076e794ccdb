"""The vSphere operations failback needs, each idempotent.

- `create_vm`: a new VM on a host and datastore whose disks are existing VMDKs
  (the ones a master target wrote); the disks are attached, never created.
- `attach_disk` / `detach_disk`: on the master target VM; attaching a disk that
  is attached already, or detaching one that is not, changes nothing.
  Detaching keeps the file.
- `power_on` / `power_off`: nothing to do when the VM is in that state already.
- `extra_config` / `set_extra_config`: the VM's advanced settings.

We never create or delete a user's snapshots; `facts` reports them.
Tasks are waited for by polling their `info` through RetrievePropertiesEx
with a capped, growing interval and a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from siterecovery.common.errors import InvalidInput, NotFound, PreconditionFailed, Unavailable
from siterecovery.common.logging import get_logger
from siterecovery.controller.providers.vsphere import properties
from siterecovery.controller.providers.vsphere.faults import fault_text, translate
from siterecovery.controller.providers.vsphere.session import Session

log = get_logger(__name__)

SCSI_CONTROLLERS: dict[str, type] = {
    "lsilogic": vim.vm.device.VirtualLsiLogicController,
    "lsilogic-sas": vim.vm.device.VirtualLsiLogicSASController,
    "pvscsi": vim.vm.device.ParaVirtualSCSIController,
}
SCSI_RESERVED_UNIT = 7  # the controller's own unit on the bus
SCSI_UNITS = 16


@dataclass(frozen=True)
class CreatedVm:
    id: str
    instance_uuid: str
    bios_uuid: str


def ref(session: Session, kind: type, moid: str) -> Any:
    """A managed object reference bound to the session's current connection."""
    return kind(moid, session.stub)


def wait_for_task(session: Session, task: Any, *, what: str, timeout: float = 600.0) -> Any:
    """Wait until `task` succeeds (its result) or fails (its fault, translated)."""
    deadline = time.monotonic() + timeout
    interval = 0.05
    while True:
        info = properties.read_one(session, task, ["info"]).get("info")
        if info is not None and info.state == vim.TaskInfo.State.success:
            return info.result
        if info is not None and info.state == vim.TaskInfo.State.error:
            error = info.error
            raise (
                translate(error, what=what, endpoint=session.endpoint.address)
                if isinstance(error, Exception)
                else PreconditionFailed(f"{what} failed: {fault_text(error)}", code="vsphere-task")
            )
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"{what} did not finish within {timeout:.0f} s", hint="see the vSphere task list"
            )
        time.sleep(interval)
        interval = min(interval * 2, 2.0)


def parse_datastore_path(path: str) -> tuple[str, str]:
    """'[ds] dir/file.vmdk' → ('ds', 'dir/file.vmdk'), refusing anything else."""
    text = path.strip()
    if not text.startswith("[") or "]" not in text:
        raise InvalidInput(
            f"{path!r} is not a datastore path", hint="write it as '[datastore] folder/disk.vmdk'"
        )
    ds, rest = text[1:].split("]", 1)
    rest = rest.strip()
    if not ds or not rest.endswith(".vmdk") or ".." in rest.split("/"):
        raise InvalidInput(
            f"{path!r} does not name a .vmdk file on a datastore",
            hint="write it as '[datastore] folder/disk.vmdk'",
        )
    return ds, rest


def _vm_row(session: Session, vm_id: str, paths: Sequence[str]) -> dict[str, Any]:
    try:
        return properties.read_one(session, ref(session, vim.VirtualMachine, vm_id), paths)
    except NotFound as exc:
        raise NotFound(
            f"VM {vm_id} does not exist on {session.endpoint.address}",
            hint="rediscover the endpoint",
            code="vsphere-vm-not-found",
        ) from exc


def _datacenter(session: Session, entity: Any) -> Any:
    current = entity
    for _ in range(32):
        if isinstance(current, vim.Datacenter):
            return current
        parent = properties.read_one(session, current, ["parent"]).get("parent")
        if parent is None:
            break
        current = parent
    raise NotFound(f"{entity._moId} is in no datacenter", hint="rediscover the endpoint")


def find_vm(session: Session, name: str) -> str | None:
    """The id of the VM called `name`, or None."""
    for row in properties.collect(session, vim.VirtualMachine, ["name"]):
        if row.get("name") == name:
            return row["_id"]
    return None


def create_vm(
    session: Session,
    *,
    name: str,
    host_id: str,
    datastore: str,
    disks: Sequence[str],
    memory_mb: int = 1024,
    cpus: int = 1,
    guest_id: str = "otherGuest64",
    controller: str = "lsilogic",
    new_disk_sizes: Sequence[int] = (),
) -> CreatedVm:
    """Create VM `name` on host `host_id`, its files on `datastore`, with the existing VMDKs `disks`.

    With `new_disk_sizes` (bytes, one per disk) the disks are created instead, thin
    (a failback to a new VM: its master target then writes their flat extents).
    """
    if new_disk_sizes and (len(new_disk_sizes) != len(disks) or any(size <= 0 for size in new_disk_sizes)):
        raise InvalidInput("give one positive size per new disk")
    if not name or len(name) > 80 or any(c in name for c in "/\\%[]"):
        raise InvalidInput(
            f"{name!r} is not a usable VM name", hint="use up to 80 characters without / \\ % [ ]"
        )
    if controller not in SCSI_CONTROLLERS:
        raise InvalidInput(
            f"unknown controller type {controller!r}", hint=f"use one of {', '.join(SCSI_CONTROLLERS)}"
        )
    if not 0 < len(disks) < SCSI_UNITS:
        raise InvalidInput(f"a VM here takes 1 to {SCSI_UNITS - 1} disks, not {len(disks)}")
    if memory_mb < 4 or cpus < 1:
        raise InvalidInput("memory must be at least 4 MB and the VM needs at least one CPU")
    for path in disks:
        parse_datastore_path(path)
    host = ref(session, vim.HostSystem, host_id)
    try:
        host_row = properties.read_one(session, host, ["parent", "datastore"])
    except NotFound:
        host_row = {}
    if "parent" not in host_row:
        raise NotFound(
            f"host {host_id} does not exist on {session.endpoint.address}", hint="rediscover the endpoint"
        )
    ds_rows = properties.read(session, host_row.get("datastore") or [], ["name"])
    if datastore not in {r.get("name") for r in ds_rows}:
        raise PreconditionFailed(
            f"datastore {datastore!r} is not mounted on host {host_id}",
            hint="pick a datastore the host mounts",
            code="vsphere-datastore-unreachable",
        )
    existing = find_vm(session, name)
    if existing is not None:
        raise PreconditionFailed(
            f"a VM called {name!r} exists already ({existing})",
            hint="pick another name, or use that VM",
            code="vsphere-vm-exists",
        )
    pool = properties.read_one(session, host_row["parent"], ["resourcePool"]).get("resourcePool")
    dc = _datacenter(session, host)
    folder = properties.read_one(session, dc, ["vmFolder"])["vmFolder"]

    controller_key = -100
    changes = [
        vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            device=SCSI_CONTROLLERS[controller](
                key=controller_key,
                busNumber=0,
                sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing,
            ),
        )
    ]
    units = [u for u in range(SCSI_UNITS) if u != SCSI_RESERVED_UNIT]
    for i, path in enumerate(disks):
        size = new_disk_sizes[i] if new_disk_sizes else 0
        changes.append(_disk_spec(path, controller_key, units[i], key=-(i + 1), new_size=size))
    spec = vim.vm.ConfigSpec(
        name=name,
        memoryMB=memory_mb,
        numCPUs=cpus,
        guestId=guest_id,
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
        deviceChange=changes,
    )

    def run(content: Any) -> Any:
        f = vim.Folder(folder._moId, content.rootFolder._stub)
        return f.CreateVM_Task(
            config=spec,
            pool=vim.ResourcePool(pool._moId, content.rootFolder._stub),
            host=vim.HostSystem(host_id, content.rootFolder._stub),
        )

    task = session.call(f"create VM {name}", run)
    vm = wait_for_task(session, task, what=f"create VM {name}")
    row = properties.read_one(session, vm, ["config.instanceUuid", "config.uuid"])
    log.info("vsphere.vm_created", vm=vm._moId, host=host_id, disks=len(disks))
    return CreatedVm(
        id=vm._moId, instance_uuid=row.get("config.instanceUuid", ""), bios_uuid=row.get("config.uuid", "")
    )


def _disk_spec(path: str, controller_key: int, unit: int, *, key: int, new_size: int = 0) -> Any:
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName=path, diskMode="persistent", thinProvisioned=bool(new_size)
    )
    disk = vim.vm.device.VirtualDisk(key=key, backing=backing, controllerKey=controller_key, unitNumber=unit)
    spec = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.add, device=disk)
    if new_size:
        disk.capacityInKB = (new_size + 1023) // 1024
        disk.capacityInBytes = new_size
        spec.fileOperation = vim.vm.device.VirtualDeviceSpec.FileOperation.create
    return spec


def _reconfigure(session: Session, vm_id: str, spec: Any, what: str) -> None:
    task = session.call(
        what, lambda c: vim.VirtualMachine(vm_id, c.rootFolder._stub).ReconfigVM_Task(spec=spec)
    )
    wait_for_task(session, task, what=what)


def attached_disks(session: Session, vm_id: str) -> dict[str, Any]:
    devices = _vm_row(session, vm_id, ["config.hardware.device"]).get("config.hardware.device") or []
    return {
        d.backing.fileName: d
        for d in devices
        if isinstance(d, vim.vm.device.VirtualDisk) and getattr(d.backing, "fileName", "")
    }


def attach_disk(session: Session, vm_id: str, path: str) -> int:
    """Attach the existing VMDK `path` to VM `vm_id`; returns the disk's device key."""
    parse_datastore_path(path)
    devices = _vm_row(session, vm_id, ["config.hardware.device"]).get("config.hardware.device") or []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk) and getattr(d.backing, "fileName", "") == path:
            return d.key
    used: dict[int, set[int]] = {}
    for d in devices:
        if d.controllerKey is not None and d.unitNumber is not None:
            used.setdefault(d.controllerKey, set()).add(d.unitNumber)
    for c in devices:
        if isinstance(c, vim.vm.device.VirtualSCSIController):
            free = [
                u for u in range(SCSI_UNITS) if u != SCSI_RESERVED_UNIT and u not in used.get(c.key, set())
            ]
            if free:
                spec = vim.vm.ConfigSpec(deviceChange=[_disk_spec(path, c.key, free[0], key=-1)])
                _reconfigure(session, vm_id, spec, f"attach {path} to VM {vm_id}")
                disk = attached_disks(session, vm_id).get(path)
                if disk is None:
                    raise PreconditionFailed(f"{path} is not attached to VM {vm_id} after reconfiguring it")
                log.info("vsphere.disk_attached", vm=vm_id, key=disk.key)
                return disk.key
    raise PreconditionFailed(
        f"VM {vm_id} has no SCSI controller with a free slot for {path}",
        hint="add a SCSI controller to the master target VM, or detach disks it no longer needs",
        code="vsphere-no-free-slot",
    )


def detach_disk(session: Session, vm_id: str, path: str) -> bool:
    """Detach `path` from VM `vm_id`, keeping the file; False when it was not attached."""
    parse_datastore_path(path)
    disk = attached_disks(session, vm_id).get(path)
    if disk is None:
        return False
    spec = vim.vm.ConfigSpec(
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(
                operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=disk
            )
        ]
    )
    _reconfigure(session, vm_id, spec, f"detach {path} from VM {vm_id}")
    log.info("vsphere.disk_detached", vm=vm_id, key=disk.key)
    return True


def bios_uuid(session: Session, vm_id: str) -> str:
    """The VM's BIOS UUID (`config.uuid`), what its guest reads as the SMBIOS UUID."""
    return str(_vm_row(session, vm_id, ["config.uuid"]).get("config.uuid", ""))


def power_state(session: Session, vm_id: str) -> str:
    return str(_vm_row(session, vm_id, ["runtime.powerState"]).get("runtime.powerState", ""))


def power_on(session: Session, vm_id: str) -> bool:
    """Power VM `vm_id` on; False when it was on already."""
    if power_state(session, vm_id) == "poweredOn":
        return False
    task = session.call(
        f"power on VM {vm_id}", lambda c: vim.VirtualMachine(vm_id, c.rootFolder._stub).PowerOnVM_Task()
    )
    wait_for_task(session, task, what=f"power on VM {vm_id}")
    return True


def power_off(session: Session, vm_id: str) -> bool:
    """Power VM `vm_id` off (hard); False when it was off already."""
    if power_state(session, vm_id) == "poweredOff":
        return False
    task = session.call(
        f"power off VM {vm_id}", lambda c: vim.VirtualMachine(vm_id, c.rootFolder._stub).PowerOffVM_Task()
    )
    wait_for_task(session, task, what=f"power off VM {vm_id}")
    return True


def destroy_vm(session: Session, vm_id: str) -> None:
    """Power the VM off and delete it with its disks (a VM siterecovery made and no longer needs)."""
    power_off(session, vm_id)
    task = session.call(
        f"delete VM {vm_id}", lambda c: vim.VirtualMachine(vm_id, c.rootFolder._stub).Destroy_Task()
    )
    wait_for_task(session, task, what=f"delete VM {vm_id}")
    log.info("vsphere.vm_destroyed", vm=vm_id)


def extra_config(session: Session, vm_id: str) -> dict[str, str]:
    """The VM's advanced settings (`config.extraConfig`); a later duplicate key wins."""
    options = _vm_row(session, vm_id, ["config.extraConfig"]).get("config.extraConfig") or []
    return {o.key: str(o.value) for o in options}


def set_extra_config(session: Session, vm_id: str, values: Mapping[str, str]) -> bool:
    """Set advanced settings; False when every one had that value already."""
    current = extra_config(session, vm_id)
    changes = {k: v for k, v in values.items() if current.get(k) != v}
    if not changes:
        return False
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in changes.items()])
    _reconfigure(session, vm_id, spec, f"set advanced settings of VM {vm_id}")
    return True
