"""The account's effective privileges, computed from permissions and roles.

Why not `AuthorizationManager.HasPrivilegeOnEntities`? It is the natural
question on a real vCenter, but the simulator we test against answers
"granted" to everything, so a test could never show a missing privilege. The
permissions (`RetrieveAllPermissions`) and role definitions (`roleList`) are
modelled faithfully, so we evaluate them ourselves, by vSphere's documented
rules:

- walk from the entity up its parent chain; a permission defined on the
  entity itself always applies, one on an ancestor only when it propagates;
- at the first level where a permission names the user, the union of those
  roles is the answer (a user's own permission beats a group's at that level,
  and a lower level beats a higher one);
- otherwise, at the first level where a permission names one of the user's
  groups, the union of those roles is the answer;
- no applicable permission anywhere: no privileges.

Group membership comes from `UserDirectory.RetrieveUserGroups(belongsToUser=…)`
(direct membership only; nested groups are not followed). When the directory
cannot answer, only the user's own permissions count, so a privilege granted
only through a group is reported missing: a conservative error that the hint
of the preflight check explains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from siterecovery.common.logging import get_logger
from siterecovery.controller.providers.vsphere import properties
from siterecovery.controller.providers.vsphere.session import Session

log = get_logger(__name__)

# What failback needs where (DESIGN §1: reprotect and failover to on-premises).
FAILBACK_DATASTORE_PRIVILEGES: tuple[str, ...] = (
    "Datastore.AllocateSpace",
    "Datastore.Browse",
    "Datastore.FileManagement",
)
# Creating a VM (failback to a new VM) is checked by vSphere on the folder
# the VM goes into (the datacenter's VM folder, where operations.create_vm
# puts it), not on the host: a role granted on the host alone does not allow it.
FAILBACK_FOLDER_PRIVILEGES: tuple[str, ...] = ("VirtualMachine.Inventory.Create",)
FAILBACK_HOST_PRIVILEGES: tuple[str, ...] = (
    "VirtualMachine.Config.AddExistingDisk",
    "VirtualMachine.Config.RemoveDisk",
    "VirtualMachine.Interact.PowerOn",
    "VirtualMachine.Interact.PowerOff",
    # Failback stamps the disk generation in the VM's advanced settings (guestinfo).
    "VirtualMachine.Config.AdvancedConfig",
    # A failback to a new VM creates its disks.
    "VirtualMachine.Config.AddNewDisk",
    "Resource.AssignVMToPool",
)


def normalize_principal(name: str) -> str:
    """`DOMAIN\\user` and `user@domain` name the same principal; compare case-insensitively."""
    name = name.strip().lower()
    if "\\" in name:
        domain, user = name.split("\\", 1)
        return f"{user}@{domain}"
    return name


def _same_principal(a: str, b: str) -> bool:
    a, b = normalize_principal(a), normalize_principal(b)
    if a == b:
        return True
    # A local account on ESXi or vcsim has no domain on one side.
    return a.split("@", 1)[0] == b.split("@", 1)[0] and ("@" not in a or "@" not in b)


@dataclass(frozen=True)
class Permission:
    entity: str
    principal: str
    group: bool
    role_id: int
    propagate: bool


@dataclass(frozen=True)
class PermissionModel:
    """Everything needed to evaluate privileges offline: permissions, roles, the entity tree."""

    permissions: Mapping[str, tuple[Permission, ...]]
    roles: Mapping[int, frozenset[str]]
    parents: Mapping[str, str]
    role_names: Mapping[int, str] = field(default_factory=dict)

    def effective(self, entity: str, user: str, groups: Iterable[str] = ()) -> frozenset[str]:
        groups = [g for g in groups]
        current: str | None = entity
        own_level = True
        seen: set[str] = set()
        while current and current not in seen:
            seen.add(current)
            applicable = [p for p in self.permissions.get(current, ()) if own_level or p.propagate]
            mine = [p for p in applicable if not p.group and _same_principal(p.principal, user)]
            if not mine:
                mine = [
                    p for p in applicable if p.group and any(_same_principal(p.principal, g) for g in groups)
                ]
            if mine:
                granted: set[str] = set()
                for p in mine:
                    granted |= self.roles.get(p.role_id, frozenset())
                return frozenset(granted)
            current = self.parents.get(current)
            own_level = False
        return frozenset()


def load_model(session: Session, parents: Mapping[str, str]) -> PermissionModel:
    """Read every permission and role definition (two calls)."""

    def read(content: Any) -> tuple[Any, Any]:
        am = content.authorizationManager
        perms = am.RetrieveAllPermissions()
        return am, perms

    am, perms = session.call("read permissions", read)
    row = properties.read_one(session, am, ["roleList"])
    roles = {r.roleId: frozenset(r.privilege or ()) for r in row.get("roleList", [])}
    names = {r.roleId: r.name for r in row.get("roleList", [])}
    by_entity: dict[str, list[Permission]] = {}
    for p in perms or []:
        if p.entity is None:  # vcsim keeps a permission as a client sent it, entity and all
            continue
        entity = p.entity._moId
        by_entity.setdefault(entity, []).append(
            Permission(entity, p.principal, bool(p.group), int(p.roleId), bool(p.propagate))
        )
    return PermissionModel(
        permissions={k: tuple(v) for k, v in by_entity.items()},
        roles=roles,
        parents=dict(parents),
        role_names=names,
    )


def user_groups(session: Session) -> tuple[str, ...]:
    """The groups the session's user directly belongs to, or () when the directory cannot say."""
    user = normalize_principal(session.user)
    name, _, domain = user.partition("@")

    def run(content: Any) -> tuple[str, ...]:
        directory = content.userDirectory
        if directory is None:
            return ()
        found = directory.RetrieveUserGroups(
            domain=domain or None,
            searchStr="",
            belongsToUser=name,
            exactMatch=False,
            findUsers=False,
            findGroups=True,
        )
        return tuple(sorted({r.principal for r in found or [] if r.group}))

    try:
        return session.call("read the account's groups", run)
    except Exception as exc:
        log.info("vsphere.groups_unknown", reason=type(exc).__name__)
        return ()


def missing(granted: Iterable[str], needed: Iterable[str]) -> tuple[str, ...]:
    have = set(granted)
    return tuple(p for p in needed if p not in have)
