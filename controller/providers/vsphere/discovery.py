"""Discovery: read a vCenter or standalone ESXi host into an `Inventory`.

One RetrievePropertiesEx per object type (see `properties`), plus per host one
licence query on a vCenter, plus two calls for permissions and roles. Nothing
is written to vSphere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyVmomi import vim

from siterecovery.controller.providers.vsphere import privileges as privs
from siterecovery.controller.providers.vsphere import properties
from siterecovery.controller.providers.vsphere.model import (
    Cluster,
    Datacenter,
    Datastore,
    Disk,
    Host,
    Inventory,
    Nic,
    Snapshot,
    VirtualMachine,
)
from siterecovery.controller.providers.vsphere.session import Session

HOST_PATHS = ("name", "parent", "datastore", "summary.config.product", "runtime.connectionState")
DATASTORE_PATHS = (
    "name",
    "summary.type",
    "summary.url",
    "summary.capacity",
    "summary.freeSpace",
    "summary.accessible",
    "host",
)
VM_PATHS = (
    "name",
    "config.instanceUuid",
    "config.uuid",
    "config.guestId",
    "config.template",
    "config.extraConfig",
    "config.hardware.device",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
    "guest.ipAddress",
    "snapshot",
)

_CONTROLLERS: tuple[tuple[type, str], ...] = (
    (vim.vm.device.ParaVirtualSCSIController, "pvscsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "lsilogic-sas"),
    (vim.vm.device.VirtualLsiLogicController, "lsilogic"),
    (vim.vm.device.VirtualBusLogicController, "buslogic"),
    (vim.vm.device.VirtualAHCIController, "sata"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
    (vim.vm.device.VirtualIDEController, "ide"),
)


def controller_kind(device: Any) -> str:
    for cls, name in _CONTROLLERS:
        if isinstance(device, cls):
            return name
    return type(device).__name__.rsplit(".", 1)[-1]


def entity_parents(session: Session) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(parent of each entity, its type name, its name) for the whole tree, in one read."""
    rows = properties.collect(session, vim.ManagedEntity, ["parent", "name"])
    parents: dict[str, str] = {}
    kinds: dict[str, str] = {}
    names: dict[str, str] = {}
    for row in rows:
        kinds[row["_id"]] = type(row["_ref"]).__name__.rsplit(".", 1)[-1]
        names[row["_id"]] = row.get("name", "")
        if row.get("parent") is not None:
            parents[row["_id"]] = row["parent"]._moId
    return parents, kinds, names


def _ancestor(entity: str, kind: str, parents: Mapping[str, str], kinds: Mapping[str, str]) -> str:
    current: str | None = entity
    while current is not None:
        if kinds.get(current) == kind:
            return current
        current = parents.get(current)
    return ""


def host_editions(session: Session, host_ids: list[str]) -> dict[str, str]:
    """Licence edition key per host: the assignment on a vCenter, the host's own licence on ESXi."""
    lm = session.content.licenseManager
    if lm is None:
        return {}
    row = properties.read_one(session, lm, ["licenseAssignmentManager", "licenses"])
    lam = row.get("licenseAssignmentManager")
    if lam is None:  # a standalone host: its licences are its own
        keys = [lic.editionKey for lic in row.get("licenses", []) if lic.editionKey]
        return {h: (keys[0] if keys else "") for h in host_ids}
    editions: dict[str, str] = {}
    for host in host_ids:
        assigned = session.call(
            "read a host's licence", lambda _c, h=host: lam.QueryAssignedLicenses(entityId=h)
        )
        keys = [a.assignedLicense.editionKey for a in assigned or [] if a.assignedLicense]
        editions[host] = keys[0] if keys else ""
    return editions


def mount_usable(mount: Any) -> bool:
    """A DatastoreHostMount that is mounted and accessible (unknown counts as usable)."""
    info = mount.mountInfo
    return info is None or (info.mounted is not False and info.accessible is not False)


def _snapshots(info: Any) -> tuple[Snapshot, ...]:
    found: list[Snapshot] = []
    stack = list(info.rootSnapshotList or []) if info is not None else []
    while stack:
        node = stack.pop()
        children = list(node.childSnapshotList or [])
        found.append(
            Snapshot(
                id=node.snapshot._moId,
                name=node.name,
                created=node.createTime.isoformat() if node.createTime else "",
                children=len(children),
            )
        )
        stack.extend(children)
    return tuple(sorted(found, key=lambda s: (s.created, s.id)))


def enable_uuid(extra_config: Any) -> bool | None:
    value: bool | None = None
    for option in extra_config or []:
        if option.key.lower() == "disk.enableuuid":
            value = str(option.value).strip().lower() in ("true", "1", "yes")
    return value


def _vm(row: dict[str, Any], datacenter: str) -> VirtualMachine:
    devices = row.get("config.hardware.device") or []
    controllers = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    disks: list[Disk] = []
    nics: list[Nic] = []
    guest_net = {n.deviceConfigId: n for n in row.get("guest.net") or [] if n.deviceConfigId is not None}
    for d in devices:
        label = d.deviceInfo.label if d.deviceInfo else ""
        if isinstance(d, vim.vm.device.VirtualDisk):
            backing = d.backing
            capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
            controller = controllers.get(d.controllerKey)
            disks.append(
                Disk(
                    key=d.key,
                    label=label,
                    path=getattr(backing, "fileName", "") or "",
                    datastore=backing.datastore._moId if getattr(backing, "datastore", None) else "",
                    capacity=int(capacity),
                    controller=controller_kind(controller) if controller is not None else "",
                    controller_key=d.controllerKey or 0,
                    unit_number=d.unitNumber if d.unitNumber is not None else -1,
                )
            )
        elif isinstance(d, vim.vm.device.VirtualEthernetCard):
            net = guest_net.get(d.key)
            nics.append(
                Nic(
                    key=d.key,
                    label=label,
                    mac=d.macAddress or "",
                    network=(d.deviceInfo.summary if d.deviceInfo else "") or "",
                    connected=bool(d.connectable and d.connectable.connected),
                    ip_addresses=tuple(net.ipAddress or ()) if net is not None else (),
                )
            )
    ips: list[str] = []
    for n in row.get("guest.net") or []:
        ips.extend(n.ipAddress or ())
    if row.get("guest.ipAddress") and row["guest.ipAddress"] not in ips:
        ips.insert(0, row["guest.ipAddress"])
    host = row.get("runtime.host")
    return VirtualMachine(
        id=row["_id"],
        name=row.get("name", ""),
        instance_uuid=row.get("config.instanceUuid") or "",
        bios_uuid=row.get("config.uuid") or "",
        power_state=str(row.get("runtime.powerState", "")),
        host=host._moId if host is not None else "",
        datacenter=datacenter,
        guest_id=row.get("config.guestId") or "",
        template=bool(row.get("config.template")),
        enable_uuid=enable_uuid(row.get("config.extraConfig")),
        disks=tuple(sorted(disks, key=lambda x: x.key)),
        nics=tuple(sorted(nics, key=lambda x: x.key)),
        guest_ips=tuple(ips),
        snapshots=_snapshots(row.get("snapshot")),
    )


def discover(session: Session) -> Inventory:
    """Read the whole inventory the account can see, with its effective privileges."""
    content = session.content
    about = content.about
    parents, kinds, names = entity_parents(session)

    def dc_of(entity: str) -> str:
        return _ancestor(entity, "Datacenter", parents, kinds)

    model = privs.load_model(session, parents)
    groups = privs.user_groups(session)

    def granted(entity: str) -> tuple[str, ...]:
        return tuple(sorted(model.effective(entity, session.user, groups)))

    folders = {row["_id"]: row["vmFolder"]._moId for row in properties.collect(session, vim.Datacenter, ["vmFolder"])
               if row.get("vmFolder") is not None}
    datacenters = tuple(
        sorted(
            (
                Datacenter(id=i, name=names[i], vm_folder=folders.get(i, ""),
                           vm_folder_privileges=granted(folders[i]) if i in folders else ())
                for i, k in kinds.items()
                if k == "Datacenter"
            ),
            key=lambda d: d.name,
        )
    )
    clusters = tuple(
        sorted(
            (
                Cluster(id=i, name=names[i], datacenter=dc_of(i))
                for i, k in kinds.items()
                if k == "ClusterComputeResource"
            ),
            key=lambda c: c.name,
        )
    )
    host_rows = properties.collect(session, vim.HostSystem, HOST_PATHS)
    editions = host_editions(session, [r["_id"] for r in host_rows])
    hosts = []
    for row in host_rows:
        product = row.get("summary.config.product")
        parent = row["parent"]._moId if row.get("parent") is not None else ""
        hosts.append(
            Host(
                id=row["_id"],
                name=row.get("name", ""),
                datacenter=dc_of(row["_id"]),
                cluster=parent if kinds.get(parent) == "ClusterComputeResource" else "",
                product=product.name if product else "",
                version=product.version if product else "",
                build=product.build if product else "",
                edition=editions.get(row["_id"], ""),
                connection_state=str(row.get("runtime.connectionState", "")),
                datastores=tuple(sorted(d._moId for d in row.get("datastore") or [])),
                privileges=granted(row["_id"]),
            )
        )
    # Which hosts mount a datastore: the datastore's mount list and the hosts'
    # datastore lists together (vcsim fills only one mount in the former), less
    # any mount the datastore reports unmounted or inaccessible.
    mounted_by: dict[str, set[str]] = {}
    for row in host_rows:
        for d in row.get("datastore") or []:
            mounted_by.setdefault(d._moId, set()).add(row["_id"])
    datastores = []
    for row in properties.collect(session, vim.Datastore, DATASTORE_PATHS):
        mounts = set(mounted_by.get(row["_id"], set()))
        for m in row.get("host") or []:
            if mount_usable(m):
                mounts.add(m.key._moId)
            else:
                mounts.discard(m.key._moId)
        datastores.append(
            Datastore(
                id=row["_id"],
                name=row.get("name", ""),
                datacenter=dc_of(row["_id"]),
                type=row.get("summary.type", ""),
                url=row.get("summary.url", ""),
                capacity=int(row.get("summary.capacity") or 0),
                free_space=int(row.get("summary.freeSpace") or 0),
                accessible=bool(row.get("summary.accessible", False)),
                hosts=tuple(sorted(mounts)),
                privileges=granted(row["_id"]),
            )
        )
    vms = [_vm(row, dc_of(row["_id"])) for row in properties.collect(session, vim.VirtualMachine, VM_PATHS)]
    return Inventory(
        endpoint=session.endpoint.address,
        api_type=about.apiType,
        api_version=about.apiVersion,
        instance_uuid=about.instanceUuid or "",
        user=session.user,
        datacenters=datacenters,
        clusters=clusters,
        hosts=tuple(sorted(hosts, key=lambda h: h.name)),
        datastores=tuple(sorted(datastores, key=lambda d: d.name)),
        vms=tuple(sorted(vms, key=lambda v: v.name)),
    )
