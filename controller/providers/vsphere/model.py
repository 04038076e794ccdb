"""What discovery finds, as plain frozen dataclasses that round-trip through JSON.

Identifiers are managed object ids (moids), unique within one endpoint. Sizes
are bytes. Lists are sorted by name or key, so two discoveries of an unchanged
inventory produce equal documents.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Datacenter:
    id: str
    name: str
    vm_folder: str = ""  # the folder new VMs go into
    vm_folder_privileges: tuple[str, ...] = ()  # the account's effective privileges there


@dataclass(frozen=True)
class Cluster:
    id: str
    name: str
    datacenter: str


@dataclass(frozen=True)
class Host:
    id: str
    name: str
    datacenter: str
    cluster: str  # "" for a standalone host
    product: str  # e.g. "VMware ESXi"
    version: str
    build: str
    edition: str  # licence edition key, e.g. "esx.enterprisePlus.cpuPackage"; "" when unknown
    connection_state: str
    datastores: tuple[str, ...] = ()
    privileges: tuple[str, ...] = ()  # the account's effective privileges here


@dataclass(frozen=True)
class Datastore:
    id: str
    name: str
    datacenter: str
    type: str  # VMFS, NFS, vsan, OTHER, …
    url: str
    capacity: int
    free_space: int
    accessible: bool
    hosts: tuple[str, ...] = ()  # hosts that mount it
    privileges: tuple[str, ...] = ()


@dataclass(frozen=True)
class Disk:
    key: int
    label: str
    path: str  # "[datastore] folder/name.vmdk"
    datastore: str  # datastore id
    capacity: int
    controller: str  # e.g. "lsilogic", "pvscsi", "sata", "nvme", "ide"
    controller_key: int
    unit_number: int


@dataclass(frozen=True)
class Nic:
    key: int
    label: str
    mac: str
    network: str
    connected: bool
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    created: str  # ISO 8601
    children: int


@dataclass(frozen=True)
class VirtualMachine:
    id: str
    name: str
    instance_uuid: str
    bios_uuid: str
    power_state: str  # poweredOn, poweredOff, suspended
    host: str
    datacenter: str
    guest_id: str
    template: bool
    enable_uuid: bool | None  # disk.EnableUUID; None when not set at all
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    guest_ips: tuple[str, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()


@dataclass(frozen=True)
class Inventory:
    endpoint: str
    api_type: str  # "VirtualCenter" or "HostAgent" (a standalone ESXi host)
    api_version: str
    instance_uuid: str
    user: str
    datacenters: tuple[Datacenter, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    hosts: tuple[Host, ...] = ()
    datastores: tuple[Datastore, ...] = ()
    vms: tuple[VirtualMachine, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        return _build(cls, data)

    def datacenter(self, key: str) -> Datacenter | None:
        return next((d for d in self.datacenters if key in (d.id, d.name)), None)

    def host(self, key: str) -> Host | None:
        return next((h for h in self.hosts if key in (h.id, h.name)), None)

    def datastore(self, key: str) -> Datastore | None:
        return next((d for d in self.datastores if key in (d.id, d.name)), None)

    def vm(self, key: str) -> VirtualMachine | None:
        return next((v for v in self.vms if key in (v.id, v.name, v.instance_uuid, v.bios_uuid)), None)


_NESTED: dict[tuple[type, str], type] = {
    (Inventory, "datacenters"): Datacenter,
    (Inventory, "clusters"): Cluster,
    (Inventory, "hosts"): Host,
    (Inventory, "datastores"): Datastore,
    (Inventory, "vms"): VirtualMachine,
    (VirtualMachine, "disks"): Disk,
    (VirtualMachine, "nics"): Nic,
    (VirtualMachine, "snapshots"): Snapshot,
}


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        nested = _NESTED.get((cls, f.name))
        if nested is not None:
            value = tuple(_build(nested, item) for item in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


__all__ = [
    "Cluster",
    "Datacenter",
    "Datastore",
    "Disk",
    "Host",
    "Inventory",
    "Nic",
    "Snapshot",
    "VirtualMachine",
    "field",
]
