"""Compute and network operations on an Azure site, each one idempotent thing.

Every operation reads before it writes, so running it twice (a retried job
step, a restarted controller) does the work once:

- `ensure_disk_from_blob`  managed disk imported from a page blob (a fixed VHD)
- `ensure_nic`             network interface in the site's subnet, static or dynamic IP
- `ensure_vm`              VM attached to existing disks, or from an image with custom data
- `get_vm` / `find_vm`     a VM, optionally with its instance view (power state)
- `power_off`, `deallocate` skipped when the VM is already in that state
- `delete_vm`, `delete_disk`, `delete_nic`   nothing to do when already gone

Each returns a plain frozen dataclass (`VmInfo`, `DiskInfo`, `NicInfo`) read
from the REST shape of the answer, never an SDK model. Requests are sent as
REST-shaped JSON too, so what goes over the wire is written here, plainly.

Clients are built by `AzureCompute.connect`, with the SDK's own retries off
(`retry_total=0`): `common.azure.errors.call` retries throttling and transient
failures under our policy, honouring `Retry-After`, and maps everything else
to our errors with a hint. A `transport` and `polling_interval=0` can be
passed in, which is how the tests replay recorded responses.

An existing resource of the same name that does not match what was asked for
(another disk source, another subnet or address, another size) is a Conflict,
and nothing is changed.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from siterecovery.common import errors
from siterecovery.common.azure.errors import DEFAULT_RETRY, AzureRetryPolicy, call
from siterecovery.common.azure.site import AzureSite
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

MAX_CUSTOM_DATA = 64 * 1024  # Azure's limit on the decoded custom data


# --- what callers get back -----------------------------------------------------------


@dataclass(frozen=True)
class DiskInfo:
    id: str
    name: str
    size_gb: int
    provisioning_state: str
    disk_state: str  # Unattached, Attached, Reserved, ...
    source_uri: str
    managed_by: str  # the VM holding it, or ""
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NicInfo:
    id: str
    name: str
    subnet_id: str
    private_ip: str
    allocation: str  # Static or Dynamic
    vm_id: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VmInfo:
    id: str
    name: str
    size: str
    provisioning_state: str
    power_state: str  # running, stopping, stopped, deallocating, deallocated, starting; "" when not read
    os_disk_id: str
    data_disk_ids: tuple[str, ...]
    nic_ids: tuple[str, ...]
    tags: Mapping[str, str] = field(default_factory=dict)
    vm_uuid: str = ""  # properties.vmId: the SMBIOS UUID the guest sees


@dataclass(frozen=True)
class ImageRef:
    publisher: str
    offer: str
    sku: str
    version: str = "latest"


@dataclass(frozen=True)
class VmSpec:
    """What VM to create. Either `os_disk_id` (attach an existing disk) or `image` (+ admin user)."""

    name: str
    size: str
    nic_id: str
    os_type: str = "Linux"
    os_disk_id: str = ""
    data_disk_ids: tuple[str, ...] = ()
    image: ImageRef | None = None
    admin_username: str = ""
    ssh_public_key: str = ""
    custom_data: bytes = field(default=b"", repr=False)  # may carry an enrollment secret
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.os_disk_id) == bool(self.image):
            raise errors.InvalidInput(
                f"VM {self.name}: give exactly one of an OS disk to attach or an image", code="azure-vm-spec"
            )
        if self.image and not (self.admin_username and self.ssh_public_key):
            raise errors.InvalidInput(
                f"VM {self.name}: a VM from an image needs an admin user name and an SSH public key",
                code="azure-vm-spec",
            )
        if self.custom_data and not self.image:
            raise errors.InvalidInput(
                f"VM {self.name}: custom data only applies to a VM created from an image", code="azure-vm-spec"
            )
        if len(self.custom_data) > MAX_CUSTOM_DATA:
            raise errors.InvalidInput(
                f"VM {self.name}: custom data is {len(self.custom_data)} bytes; Azure accepts at most {MAX_CUSTOM_DATA}",
                code="azure-vm-spec",
            )
        if self.os_type not in ("Linux", "Windows"):
            raise errors.InvalidInput(f"os_type must be Linux or Windows, not {self.os_type!r}", code="azure-vm-spec")


def resource_name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def resource_group_of(resource_id: str) -> str:
    parts = resource_id.split("/")
    lowered = [p.lower() for p in parts]
    try:
        return parts[lowered.index("resourcegroups") + 1]
    except (ValueError, IndexError):
        raise errors.InvalidInput(f"{resource_id!r} is not an Azure resource id", code="azure-resource-id") from None


# --- reading REST shapes -------------------------------------------------------------


def _json(model: Any) -> dict:
    if model is None:
        return {}
    if hasattr(model, "as_dict"):
        return model.as_dict()
    return dict(model)


def _disk(body: dict) -> DiskInfo:
    props = body.get("properties", {})
    return DiskInfo(
        id=body.get("id", ""),
        name=body.get("name", ""),
        size_gb=int(props.get("diskSizeGB") or 0),
        provisioning_state=props.get("provisioningState", ""),
        disk_state=props.get("diskState", ""),
        source_uri=props.get("creationData", {}).get("sourceUri", ""),
        managed_by=body.get("managedBy", "") or "",
        tags=dict(body.get("tags") or {}),
    )


def _nic(body: dict) -> NicInfo:
    props = body.get("properties", {})
    configs = props.get("ipConfigurations") or [{}]
    ip = configs[0].get("properties", {})
    return NicInfo(
        id=body.get("id", ""),
        name=body.get("name", ""),
        subnet_id=ip.get("subnet", {}).get("id", ""),
        private_ip=ip.get("privateIPAddress", "") or "",
        allocation=ip.get("privateIPAllocationMethod", ""),
        vm_id=(props.get("virtualMachine") or {}).get("id", ""),
        tags=dict(body.get("tags") or {}),
    )


def _power_state(instance_view: dict) -> str:
    for status in instance_view.get("statuses", []):
        code = status.get("code", "")
        if code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return ""


def _vm(body: dict) -> VmInfo:
    props = body.get("properties", {})
    storage = props.get("storageProfile", {})
    return VmInfo(
        id=body.get("id", ""),
        name=body.get("name", ""),
        size=props.get("hardwareProfile", {}).get("vmSize", ""),
        provisioning_state=props.get("provisioningState", ""),
        power_state=_power_state(props.get("instanceView") or {}),
        os_disk_id=storage.get("osDisk", {}).get("managedDisk", {}).get("id", ""),
        data_disk_ids=tuple(d.get("managedDisk", {}).get("id", "") for d in storage.get("dataDisks", [])),
        nic_ids=tuple(n.get("id", "") for n in props.get("networkProfile", {}).get("networkInterfaces", [])),
        tags=dict(body.get("tags") or {}),
        vm_uuid=props.get("vmId", ""),
    )


# --- the operations --------------------------------------------------------------------


class AzureCompute:
    """Compute and network operations on one Azure site."""

    def __init__(
        self,
        site: AzureSite,
        compute: Any,
        network: Any,
        *,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.site = site
        self.compute = compute
        self.network = network
        self.policy = policy
        self._sleep = sleep

    @classmethod
    def connect(
        cls,
        site: AzureSite,
        credential: Any,
        *,
        transport: Any = None,
        polling_interval: float | None = None,
        base_url: str | None = None,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] | None = None,
    ) -> AzureCompute:
        """Clients for the site's subscription; `transport`/`polling_interval` are for tests."""
        from azure.mgmt.compute import ComputeManagementClient
        from azure.mgmt.network import NetworkManagementClient

        kwargs: dict[str, Any] = {"retry_total": 0}
        if transport is not None:
            kwargs["transport"] = transport
        if polling_interval is not None:
            kwargs["polling_interval"] = polling_interval
        if base_url is not None:
            kwargs["base_url"] = base_url
        compute = ComputeManagementClient(credential, site.subscription_id, **kwargs)
        network = NetworkManagementClient(credential, site.subscription_id, **kwargs)
        return cls(site, compute, network, policy=policy, sleep=sleep or time.sleep)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return call(what, fn, self.policy, sleep=self._sleep)

    def _find(self, what: str, fn: Callable[[], Any]) -> dict | None:
        def get() -> dict | None:
            try:
                return _json(fn())
            except ResourceNotFoundError:
                return None

        return self._call(what, get)

    @property
    def _rg(self) -> str:
        return self.site.resource_group

    # --- disks ---

    def _require_owner(self, kind: str, name: str, tags: Mapping[str, str], owner: Mapping[str, str] | None) -> None:
        """An existing resource is adopted only when its tags say it was made for the same owner."""
        if owner and any(tags.get(key) != value for key, value in owner.items()):
            raise errors.Conflict(
                f"{kind} {name} already exists in resource group {self._rg}, and siterecovery did not create it "
                "for this machine",
                hint=f"rename or remove that {kind} (it is left alone), then run the workflow again",
                code="azure-not-ours",
            )

    @staticmethod
    def _owned(tags: Mapping[str, str], owner: Mapping[str, str] | None) -> bool:
        return not owner or all(tags.get(key) == value for key, value in owner.items())

    def find_disk(self, name: str) -> DiskInfo | None:
        body = self._find(f"read disk {name}", lambda: self.compute.disks.get(self._rg, name))
        return _disk(body) if body is not None else None

    def ensure_disk_from_blob(
        self,
        name: str,
        source_uri: str,
        *,
        os_type: str = "",
        sku: str = "StandardSSD_LRS",
        hyper_v_generation: str = "V1",
        tags: Mapping[str, str] | None = None,
        owner: Mapping[str, str] | None = None,
    ) -> DiskInfo:
        """A managed disk imported from the page blob (fixed VHD) at `source_uri`.
        With `owner`, an existing disk is taken only when it carries those tags."""
        existing = self.find_disk(name)
        if existing is not None:
            self._require_owner("disk", name, existing.tags, owner)
            if existing.source_uri != source_uri:
                raise errors.Conflict(
                    f"disk {name} already exists, imported from {existing.source_uri or 'something else'}, not {source_uri}",
                    hint="delete that disk, or use another name for this failover",
                    code="azure-disk-mismatch",
                )
            return existing
        properties: dict[str, Any] = {
            "creationData": {
                "createOption": "Import",
                "sourceUri": source_uri,
                "storageAccountId": self.site.storage_account_id,
            },
            "hyperVGeneration": hyper_v_generation,
        }
        if os_type:
            properties["osType"] = os_type
        body = {"location": self.site.region, "sku": {"name": sku}, "tags": dict(tags or {}), "properties": properties}
        result = self._call(
            f"create disk {name} from {source_uri}",
            lambda: self.compute.disks.begin_create_or_update(self._rg, name, body).result(),
        )
        return _disk(_json(result))

    def delete_disk(self, name: str, resource_group: str | None = None, *,
                    owner: Mapping[str, str] | None = None) -> bool:
        """Delete a managed disk; nothing to do when it is gone (Azure answers 204). With `owner`, it
        is read first and left alone (False) unless it carries those tags."""
        group = resource_group or self._rg
        if owner:
            found = self._find(f"read disk {name}", lambda: self.compute.disks.get(group, name))
            if found is None:
                return True
            if not self._owned(dict(found.get("tags") or {}), owner):
                log.warning("disk not deleted: not ours", disk=name)
                return False
        self._call(f"delete disk {name}", lambda: self.compute.disks.begin_delete(group, name).result())
        return True

    # --- network interfaces ---

    def find_nic(self, name: str) -> NicInfo | None:
        body = self._find(
            f"read network interface {name}", lambda: self.network.network_interfaces.get(self._rg, name)
        )
        return _nic(body) if body is not None else None

    def ensure_nic(
        self, name: str, *, private_ip: str = "", tags: Mapping[str, str] | None = None,
        owner: Mapping[str, str] | None = None,
    ) -> NicInfo:
        """A NIC in the site's subnet: with `private_ip` static, otherwise dynamic.
        With `owner`, an existing NIC is taken only when it carries those tags."""
        subnet_id = self.site.subnet_id
        existing = self.find_nic(name)
        if existing is not None:
            self._require_owner("network interface", name, existing.tags, owner)
            if existing.subnet_id.lower() != subnet_id.lower() or (private_ip and existing.private_ip != private_ip):
                raise errors.Conflict(
                    f"network interface {name} already exists in {existing.subnet_id} with {existing.private_ip or 'no address'}",
                    hint="delete it, or pick another name, subnet or address",
                    code="azure-nic-mismatch",
                )
            return existing
        ip_config: dict[str, Any] = {
            "privateIPAllocationMethod": "Static" if private_ip else "Dynamic",
            "subnet": {"id": subnet_id},
        }
        if private_ip:
            ip_config["privateIPAddress"] = private_ip
        body = {
            "location": self.site.region,
            "tags": dict(tags or {}),
            "properties": {"ipConfigurations": [{"name": "ipconfig1", "properties": ip_config}]},
        }
        result = self._call(
            f"create network interface {name}",
            lambda: self.network.network_interfaces.begin_create_or_update(self._rg, name, body).result(),
        )
        return _nic(_json(result))

    def delete_nic(self, name: str, resource_group: str | None = None, *,
                   owner: Mapping[str, str] | None = None) -> bool:
        """Delete a NIC; nothing to do when it is gone. With `owner`, as `delete_disk`."""
        group = resource_group or self._rg
        if owner:
            found = self._find(f"read network interface {name}",
                               lambda: self.network.network_interfaces.get(group, name))
            if found is None:
                return True
            if not self._owned(dict(found.get("tags") or {}), owner):
                log.warning("network interface not deleted: not ours", nic=name)
                return False
        self._call(
            f"delete network interface {name}",
            lambda: self.network.network_interfaces.begin_delete(group, name).result(),
        )
        return True

    # --- virtual machines ---

    def find_vm(self, name: str, *, instance_view: bool = False) -> VmInfo | None:
        kwargs = {"expand": "instanceView"} if instance_view else {}
        body = self._find(f"read VM {name}", lambda: self.compute.virtual_machines.get(self._rg, name, **kwargs))
        return _vm(body) if body is not None else None

    def get_vm(self, name: str, *, instance_view: bool = False) -> VmInfo:
        vm = self.find_vm(name, instance_view=instance_view)
        if vm is None:
            raise errors.NotFound(
                f"VM {name} does not exist in resource group {self._rg}",
                hint="check the VM name and the Azure site's resource group",
                code="azure-not-found",
            )
        return vm

    def ensure_vm(self, spec: VmSpec, *, owner: Mapping[str, str] | None = None) -> VmInfo:
        """The VM of `spec`; an existing VM of that name must have its size and NIC (and, with
        `owner`, those tags)."""
        existing = self.find_vm(spec.name)
        if existing is not None:
            self._require_owner("VM", spec.name, existing.tags, owner)
            if existing.size != spec.size or spec.nic_id.lower() not in {n.lower() for n in existing.nic_ids}:
                raise errors.Conflict(
                    f"VM {spec.name} already exists with size {existing.size} and NICs {list(existing.nic_ids)}",
                    hint="delete that VM, or use another name",
                    code="azure-vm-mismatch",
                )
            return existing
        body = self._vm_body(spec)
        result = self._call(
            f"create VM {spec.name} ({spec.size})",
            lambda: self.compute.virtual_machines.begin_create_or_update(self._rg, spec.name, body).result(),
        )
        return _vm(_json(result))

    def _vm_body(self, spec: VmSpec) -> dict:
        storage: dict[str, Any] = {}
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": spec.size},
            "storageProfile": storage,
            "networkProfile": {"networkInterfaces": [{"id": spec.nic_id, "properties": {"primary": True}}]},
        }
        if spec.image is not None:
            storage["imageReference"] = {
                "publisher": spec.image.publisher,
                "offer": spec.image.offer,
                "sku": spec.image.sku,
                "version": spec.image.version,
            }
            storage["osDisk"] = {
                "createOption": "FromImage",
                "deleteOption": "Delete",
                "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
            }
            os_profile: dict[str, Any] = {
                "computerName": spec.name,
                "adminUsername": spec.admin_username,
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {
                                "path": f"/home/{spec.admin_username}/.ssh/authorized_keys",
                                "keyData": spec.ssh_public_key,
                            }
                        ]
                    },
                },
            }
            if spec.custom_data:
                os_profile["customData"] = base64.b64encode(spec.custom_data).decode()
            properties["osProfile"] = os_profile
        else:
            storage["osDisk"] = {
                "osType": spec.os_type,
                "createOption": "Attach",
                "managedDisk": {"id": spec.os_disk_id},
            }
        if spec.data_disk_ids:
            storage["dataDisks"] = [
                {"lun": lun, "createOption": "Attach", "managedDisk": {"id": disk_id}}
                for lun, disk_id in enumerate(spec.data_disk_ids)
            ]
        return {"location": self.site.region, "tags": dict(spec.tags), "properties": properties}

    def power_off(self, name: str, *, skip_shutdown: bool = False) -> VmInfo:
        """Stop the VM (the guest is shut down first unless `skip_shutdown`); no-op when stopped."""
        vm = self.get_vm(name, instance_view=True)
        if vm.power_state in ("stopped", "deallocated", "deallocating"):
            log.info("VM already off", vm=name, power_state=vm.power_state)
            return vm
        self._call(
            f"power off VM {name}",
            lambda: self.compute.virtual_machines.begin_power_off(
                self._rg, name, skip_shutdown=skip_shutdown
            ).result(),
        )
        return self.get_vm(name, instance_view=True)

    def start(self, name: str) -> VmInfo:
        """Start a stopped or deallocated VM; no-op when it runs."""
        vm = self.get_vm(name, instance_view=True)
        if vm.power_state in ("running", "starting"):
            return vm
        self._call(f"start VM {name}", lambda: self.compute.virtual_machines.begin_start(self._rg, name).result())
        return self.get_vm(name, instance_view=True)

    def deallocate(self, name: str) -> VmInfo:
        """Release the VM's compute (billing stops); no-op when already deallocated."""
        vm = self.get_vm(name, instance_view=True)
        if vm.power_state == "deallocated":
            log.info("VM already deallocated", vm=name)
            return vm
        self._call(
            f"deallocate VM {name}",
            lambda: self.compute.virtual_machines.begin_deallocate(self._rg, name).result(),
        )
        return self.get_vm(name, instance_view=True)

    def delete_vm(self, name: str, *, owner: Mapping[str, str] | None = None) -> VmInfo | None:
        """Delete the VM (not its disks or NICs); returns what it was, None when already gone (or,
        with `owner`, when it does not carry those tags: then it is left alone)."""
        vm = self.find_vm(name)
        if vm is None:
            return None
        if not self._owned(vm.tags, owner):
            log.warning("VM not deleted: not ours", vm=name)
            return None
        self._call(f"delete VM {name}", lambda: self.compute.virtual_machines.begin_delete(self._rg, name).result())
        return vm
