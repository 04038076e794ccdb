"""Facts the failback preflight checks (DESIGN §1), each read live from vSphere.

Each function answers one question with a targeted read, so a preflight does
not depend on how old the last discovery is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyVmomi import vim

from siterecovery.common.errors import NotFound
from siterecovery.controller.providers.vsphere import privileges as privs
from siterecovery.controller.providers.vsphere import properties
from siterecovery.controller.providers.vsphere.discovery import (
    _snapshots,
    enable_uuid,
    host_editions,
    mount_usable,
)
from siterecovery.controller.providers.vsphere.model import Snapshot
from siterecovery.controller.providers.vsphere.operations import ref
from siterecovery.controller.providers.vsphere.session import Session

# Licence editions of the free vSphere Hypervisor: it has no write API, so it cannot be a failback target.
FREE_EDITION_KEYS = frozenset({"esxbasic", "esx.hypervisor.free", "esx.hypervisor.cpupackage"})


def is_free_edition(edition_key: str) -> bool:
    key = edition_key.strip().lower()
    return key in FREE_EDITION_KEYS or key.startswith("esx.hypervisor.")


def _row(session: Session, kind: type, moid: str, paths: Sequence[str], what: str) -> dict[str, Any]:
    try:
        return properties.read_one(session, ref(session, kind, moid), paths)
    except NotFound as exc:
        raise NotFound(
            f"{what} {moid} does not exist on {session.endpoint.address}",
            hint="rediscover the endpoint",
            code="vsphere-not-found",
        ) from exc


def vm_exists(
    session: Session, *, vm_id: str = "", instance_uuid: str = "", bios_uuid: str = ""
) -> str | None:
    """The id of the VM with this id or UUID, or None when it no longer exists."""
    if vm_id:
        try:
            properties.read_one(session, ref(session, vim.VirtualMachine, vm_id), ["name"])
        except NotFound:
            return None
        return vm_id
    uuid, by_instance = (instance_uuid, True) if instance_uuid else (bios_uuid, False)
    if not uuid:
        return None

    def run(content: Any) -> Any:
        return content.searchIndex.FindByUuid(uuid=uuid, vmSearch=True, instanceUuid=by_instance)

    found = session.call("find a VM by UUID", run)
    return found._moId if found is not None else None


def vm_snapshots(session: Session, vm_id: str) -> tuple[Snapshot, ...]:
    """The VM's snapshots (reported, never deleted: reprotect refuses a VM that has any)."""
    return _snapshots(_row(session, vim.VirtualMachine, vm_id, ["snapshot", "name"], "VM").get("snapshot"))


def has_snapshots(session: Session, vm_id: str) -> bool:
    return bool(vm_snapshots(session, vm_id))


def lacks_enable_uuid(session: Session, vm_id: str) -> bool:
    """True unless the VM's `disk.EnableUUID` is TRUE (a Linux master target needs it)."""
    row = _row(session, vim.VirtualMachine, vm_id, ["config.extraConfig"], "VM")
    return enable_uuid(row.get("config.extraConfig")) is not True


def host_edition(session: Session, host_id: str) -> str:
    _row(session, vim.HostSystem, host_id, ["name"], "host")
    return host_editions(session, [host_id]).get(host_id, "")


def host_is_free_edition(session: Session, host_id: str) -> bool:
    return is_free_edition(host_edition(session, host_id))


def datastore_reachable(session: Session, datastore_id: str, host_id: str) -> bool:
    """True when `host_id` mounts `datastore_id` and the mount is usable."""
    row = _row(session, vim.Datastore, datastore_id, ["host"], "datastore")
    for mount in row.get("host") or []:
        if mount.key._moId == host_id:
            return mount_usable(mount)
    # Not in the datastore's mount list: ask the host (vcsim lists only one mount there).
    host = _row(session, vim.HostSystem, host_id, ["datastore"], "host")
    return any(d._moId == datastore_id for d in host.get("datastore") or [])


def parent_chain(session: Session, kind: type, moid: str) -> dict[str, str]:
    """{entity: parent} from `moid` up to the root folder."""
    parents: dict[str, str] = {}
    current = ref(session, kind, moid)
    for _ in range(64):
        parent = properties.read_one(session, current, ["parent"]).get("parent")
        if parent is None:
            break
        parents[current._moId] = parent._moId
        current = parent
    return parents


def effective_privileges(session: Session, kind: type, moid: str) -> frozenset[str]:
    model = privs.load_model(session, parent_chain(session, kind, moid))
    return model.effective(moid, session.user, privs.user_groups(session))


def missing_datastore_privileges(
    session: Session, datastore_id: str, needed: Sequence[str] = privs.FAILBACK_DATASTORE_PRIVILEGES
) -> tuple[str, ...]:
    """The privileges failback needs on the datastore that the account lacks (empty: none)."""
    _row(session, vim.Datastore, datastore_id, ["name"], "datastore")
    return privs.missing(effective_privileges(session, vim.Datastore, datastore_id), needed)


def missing_host_privileges(
    session: Session, host_id: str, needed: Sequence[str] = privs.FAILBACK_HOST_PRIVILEGES
) -> tuple[str, ...]:
    """The privileges failback needs on the host that the account lacks (empty: none)."""
    _row(session, vim.HostSystem, host_id, ["name"], "host")
    return privs.missing(effective_privileges(session, vim.HostSystem, host_id), needed)
