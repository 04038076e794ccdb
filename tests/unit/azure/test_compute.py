"""Compute operations through the real SDK clients, answered by recorded responses.

The recordings (recordings/*.json) are shaped like the public Azure REST API
examples; each test checks what was sent (method, path, api-version, body)
and what came back, including long-running operations polled through
Azure-AsyncOperation and Location, with their Retry-After honoured (the
transport records waits instead of sleeping).
"""

from __future__ import annotations

import base64

import pytest
from azure.core.credentials import AccessTokenInfo

from siterecovery.common import errors
from siterecovery.common.azure.errors import AzureRetryPolicy
from siterecovery.common.azure.site import AzureSite
from siterecovery.controller.providers.azure.compute import AzureCompute, ImageRef, VmSpec
from tests.azure_replay import ReplayTransport, load

VM_API, DISK_API, NET_API = "2026-04-01", "2026-03-02", "2026-03-01"
SITE = AzureSite(
    subscription_id="11111111-2222-3333-4444-555555555555",
    tenant_id="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    client_id="99999999-8888-7777-6666-555555555555",
    resource_group="rg-dr",
    region="westeurope",
    vnet="vnet-dr",
    subnet="workloads",
    storage_account="srdrstore",
)
RG_ID = SITE.resource_group_id
VALUES = {
    "sub": SITE.subscription_id,
    "rg": SITE.resource_group,
    "region": SITE.region,
    "vm": "web1",
    "disk": "web1-disk0",
    "nic": "web1-nic0",
    "account": SITE.storage_account,
    "source_uri": "https://srdrstore.blob.core.windows.net/siterecovery/pair-1-failover-t1.vhd",
    "ip": "10.1.2.10",
    "subnet_id": SITE.subnet_id,
}


class StaticToken:
    """A credential that always has a token (the recordings need no sign-in)."""

    def get_token_info(self, *scopes, options=None) -> AccessTokenInfo:
        return AccessTokenInfo("recorded-token", 4_000_000_000)


@pytest.fixture
def transport():
    t = ReplayTransport()
    yield t
    assert t.done, f"recorded responses left unused: {[e['request'] for e in t.exchanges]}"


@pytest.fixture
def azure(transport):
    return AzureCompute.connect(
        SITE,
        StaticToken(),
        transport=transport,
        polling_interval=0,
        policy=AzureRetryPolicy(max_attempts=3, initial_backoff=0.5, max_backoff=4, max_retry_after=60),
        sleep=transport.sleep,
    )


def calls(transport):
    return [(r.method, r.path.removeprefix(RG_ID) if r.path.startswith(RG_ID) else r.path) for r in transport.requests]


def test_get_vm_with_instance_view(azure, transport):
    transport.queue(load("vm_get_instance_view", VALUES))
    vm = azure.get_vm("web1", instance_view=True)
    assert vm.name == "web1" and vm.size == "Standard_D2s_v3" and vm.power_state == "running"
    assert vm.os_disk_id == f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0"
    assert vm.data_disk_ids == (f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0-1",)
    assert vm.nic_ids == (f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0",)
    (request,) = transport.requests
    assert request.method == "GET" and request.api_version == VM_API
    assert request.query["$expand"] == "instanceView"
    assert request.headers["Authorization"] == "Bearer recorded-token"


OPERATION = f"/subscriptions/{SITE.subscription_id}/providers/Microsoft.Compute/locations/westeurope/operations/op-poweroff"


def test_power_off_polls_the_async_operation_honouring_retry_after(azure, transport):
    transport.queue(load("vm_power_off", VALUES))
    vm = azure.power_off("web1")
    assert vm.power_state == "stopped"
    assert calls(transport) == [
        ("GET", "/providers/Microsoft.Compute/virtualMachines/web1"),
        ("POST", "/providers/Microsoft.Compute/virtualMachines/web1/powerOff"),
        ("GET", OPERATION),  # Azure-AsyncOperation: InProgress
        ("GET", OPERATION),  # Azure-AsyncOperation: Succeeded
        ("GET", OPERATION),  # Location (?monitor=true): a POST's final state
        ("GET", "/providers/Microsoft.Compute/virtualMachines/web1"),
    ]
    assert transport.requests[2].query == {"api-version": VM_API}
    assert transport.requests[4].query == {"monitor": "true", "api-version": VM_API}
    post = transport.requests[1]
    assert post.api_version == VM_API and post.body is None
    assert post.query.get("skipShutdown", "false") == "false"  # the guest is shut down cleanly
    # azure-core polls once at once, then waits what the InProgress answer's Retry-After says
    assert transport.sleeps == [3]


def test_start_a_deallocated_vm_and_starting_a_running_one_is_a_no_op(azure, transport):
    transport.queue(load("vm_start", VALUES))
    vm = azure.start("web1")
    assert vm.power_state == "running" and vm.vm_uuid == "0f47b100-583c-48e3-a4c0-aefc2c9bbcc1"
    assert [m for m, _ in calls(transport)] == ["GET", "POST", "GET", "GET", "GET", "GET"]
    assert transport.requests[1].path.endswith("/virtualMachines/web1/start")
    assert transport.requests[1].api_version == VM_API
    transport.queue(load("vm_get_instance_view", VALUES))
    assert azure.start("web1").power_state == "running"
    assert [m for m, _ in calls(transport)][6:] == ["GET"]


def test_deallocate_then_again_is_a_no_op(azure, transport):
    transport.queue(load("vm_deallocate", VALUES))
    assert azure.deallocate("web1").power_state == "deallocated"
    assert [m for m, _ in calls(transport)] == ["GET", "POST", "GET", "GET", "GET"]
    assert transport.requests[1].path.endswith("/virtualMachines/web1/deallocate")
    transport.requests.clear()
    transport.queue(load("vm_deallocate_already", VALUES))
    assert azure.deallocate("web1").power_state == "deallocated"
    assert [m for m, _ in calls(transport)] == ["GET"]  # nothing was sent to change anything


def test_delete_vm_polls_location_until_204(azure, transport):
    transport.queue(load("vm_delete", VALUES))
    deleted = azure.delete_vm("web1")
    assert deleted is not None and deleted.os_disk_id.endswith("/disks/web1-disk0")
    assert [m for m, _ in calls(transport)] == ["GET", "DELETE", "GET", "GET"]
    assert transport.requests[1].api_version == VM_API
    assert transport.sleeps == [5]  # the still-202 poll's Retry-After


def test_delete_vm_that_is_gone_changes_nothing(azure, transport):
    transport.queue(load("vm_delete_gone", VALUES))
    assert azure.delete_vm("web1") is None
    assert [m for m, _ in calls(transport)] == ["GET"]


def test_create_vm_attaching_disks(azure, transport):
    transport.queue(load("vm_create", VALUES))
    spec = VmSpec(
        name="web1",
        size="Standard_D2s_v3",
        nic_id=f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0",
        os_disk_id=f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0",
        data_disk_ids=(f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0-1",),
        tags={"sr-managed": "true", "sr-job": "job-1"},
    )
    vm = azure.ensure_vm(spec)
    assert vm.provisioning_state == "Succeeded"
    assert [m for m, _ in calls(transport)] == ["GET", "PUT", "GET", "GET", "GET"]
    put = transport.requests[1]
    assert put.api_version == VM_API
    assert put.body == {
        "location": "westeurope",
        "tags": {"sr-managed": "true", "sr-job": "job-1"},
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_D2s_v3"},
            "storageProfile": {
                "osDisk": {"osType": "Linux", "createOption": "Attach", "managedDisk": {"id": spec.os_disk_id}},
                "dataDisks": [{"lun": 0, "createOption": "Attach", "managedDisk": {"id": spec.data_disk_ids[0]}}],
            },
            "networkProfile": {"networkInterfaces": [{"id": spec.nic_id, "properties": {"primary": True}}]},
        },
    }
    # the final GET after the async operation is on the VM itself (PUT: original URI)
    assert transport.requests[-1].path.endswith("/virtualMachines/web1")


def test_create_vm_from_image_with_custom_data(azure, transport):
    transport.queue(load("vm_create", VALUES))
    cloud_init = b"#cloud-config\nruncmd:\n  - [echo, hello]\n"
    spec = VmSpec(
        name="web1",
        size="Standard_D2s_v3",
        nic_id=f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0",
        image=ImageRef("Canonical", "ubuntu-24_04-lts", "server"),
        admin_username="sradmin",
        ssh_public_key="ssh-ed25519 AAAAC3Nza test",
        custom_data=cloud_init,
    )
    assert "cloud-config" not in repr(spec)
    azure.ensure_vm(spec)
    props = transport.requests[1].body["properties"]
    assert base64.b64decode(props["osProfile"]["customData"]) == cloud_init
    assert props["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"] == "/home/sradmin/.ssh/authorized_keys"
    assert props["storageProfile"]["imageReference"] == {
        "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"
    }
    assert props["storageProfile"]["osDisk"]["createOption"] == "FromImage"


def test_create_disk_imports_the_blob(azure, transport):
    transport.queue(load("disk_create", VALUES))
    disk = azure.ensure_disk_from_blob("web1-disk0", VALUES["source_uri"], os_type="Linux", tags={"sr-managed": "true"})
    assert (disk.name, disk.size_gb, disk.disk_state, disk.source_uri) == (
        "web1-disk0", 10, "Unattached", VALUES["source_uri"]
    )
    assert [m for m, _ in calls(transport)] == ["GET", "PUT", "GET", "GET"]
    put = transport.requests[1]
    assert put.api_version == DISK_API
    assert put.body == {
        "location": "westeurope",
        "sku": {"name": "StandardSSD_LRS"},
        "tags": {"sr-managed": "true"},
        "properties": {
            "creationData": {
                "createOption": "Import",
                "sourceUri": VALUES["source_uri"],
                "storageAccountId": SITE.storage_account_id,
            },
            "hyperVGeneration": "V1",
            "osType": "Linux",
        },
    }


def test_existing_disk_from_another_source_is_a_conflict_and_changes_nothing(azure, transport):
    transport.queue(load("disk_exists_other_source", VALUES))
    with pytest.raises(errors.Conflict) as caught:
        azure.ensure_disk_from_blob("web1-disk0", VALUES["source_uri"])
    assert "already exists" in caught.value.message and "delete that disk" in caught.value.hint
    assert [m for m, _ in calls(transport)] == ["GET"]


def test_create_nic_with_static_ip(azure, transport):
    transport.queue(load("nic_create", VALUES))
    nic = azure.ensure_nic("web1-nic0", private_ip="10.1.2.10", tags={"sr-managed": "true"})
    assert (nic.private_ip, nic.allocation, nic.subnet_id) == ("10.1.2.10", "Static", SITE.subnet_id)
    put = transport.requests[1]
    assert put.method == "PUT" and put.api_version == NET_API
    assert put.body["properties"]["ipConfigurations"] == [
        {
            "name": "ipconfig1",
            "properties": {
                "privateIPAllocationMethod": "Static",
                "subnet": {"id": SITE.subnet_id},
                "privateIPAddress": "10.1.2.10",
            },
        }
    ]
    # the first poll goes out at once (the 201's Retry-After is not waited) and says Succeeded
    assert transport.sleeps == []


def test_throttling_is_retried_after_retry_after(azure, transport):
    transport.queue(load("vm_get_throttled", VALUES))
    assert azure.get_vm("web1").name == "web1"
    assert len(transport.requests) == 3
    assert transport.sleeps == [7, 11]  # exactly what Azure asked for, nothing more


def test_throttling_beyond_the_policy_is_a_clear_rate_limit(transport):
    azure = AzureCompute.connect(
        SITE, StaticToken(), transport=transport, polling_interval=0,
        policy=AzureRetryPolicy(max_attempts=2, max_retry_after=60), sleep=transport.sleep,
    )
    transport.queue(load("vm_get_throttled", VALUES)[:2])
    with pytest.raises(errors.RateLimited) as caught:
        azure.get_vm("web1")
    assert caught.value.retryable and caught.value.code == "azure-throttled"
    assert "throttled read VM web1 after 2 attempts" in caught.value.message
    assert "retry after 11 s" in caught.value.hint
    assert transport.sleeps == [7]


def test_a_retry_after_longer_than_the_policy_allows_is_not_waited_out(transport):
    azure = AzureCompute.connect(
        SITE, StaticToken(), transport=transport, polling_interval=0,
        policy=AzureRetryPolicy(max_attempts=5, max_retry_after=5), sleep=transport.sleep,
    )
    transport.queue(load("vm_get_throttled", VALUES)[:1])
    with pytest.raises(errors.RateLimited) as caught:
        azure.get_vm("web1")
    assert "retry after 7 s" in caught.value.hint
    assert transport.sleeps == []


def test_not_found_is_a_clear_error(azure, transport):
    transport.queue(load("vm_get_not_found", VALUES))
    with pytest.raises(errors.NotFound) as caught:
        azure.power_off("web1")
    assert "VM web1 does not exist in resource group rg-dr" in caught.value.message
    assert "resource group" in caught.value.hint


def test_quota_is_a_clear_precondition_and_nothing_is_retried(azure, transport):
    transport.queue(load("vm_create_quota", VALUES))
    spec = VmSpec(
        name="web1", size="Standard_D2s_v3", nic_id=f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0",
        os_disk_id=f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0",
    )
    with pytest.raises(errors.PreconditionFailed) as caught:
        azure.ensure_vm(spec)
    assert caught.value.code == "azure-quota"
    assert "OperationNotAllowed" in caught.value.message and "Cores quota" in caught.value.message
    assert "quota increase" in caught.value.hint
    assert [m for m, _ in calls(transport)] == ["GET", "PUT"]


def test_a_failed_long_running_operation_surfaces_its_error_code(azure, transport):
    transport.queue(load("vm_create_allocation_failed", VALUES))
    spec = VmSpec(
        name="web1", size="Standard_D2s_v3", nic_id=f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0",
        os_disk_id=f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0",
    )
    with pytest.raises(errors.PreconditionFailed) as caught:
        azure.ensure_vm(spec)
    assert "AllocationFailed" in caught.value.message
    assert "another VM size or region" in caught.value.hint


OWNER = {"sr-machine": "it-1"}


def test_a_resource_someone_else_made_is_neither_adopted_nor_deleted(azure, transport):
    # Recorded resources carry sr-machine={item}; here it is another machine's.
    others = {**VALUES, "item": "it-other"}
    transport.queue(load("nic_create", others)[3:])  # GET: the NIC exists
    with pytest.raises(errors.Conflict) as raised:
        azure.ensure_nic("web1-nic0", owner=OWNER)
    assert raised.value.code == "azure-not-ours" and "did not create it" in raised.value.message
    transport.queue(load("vm_delete", others)[:1])  # GET: the VM exists
    assert azure.delete_vm("web1", owner=OWNER) is None
    transport.queue(load("disk_create", others)[3:])  # GET: the disk exists
    assert azure.delete_disk("web1-disk0", owner=OWNER) is False
    assert [m for m, _ in calls(transport)] == ["GET", "GET", "GET"], "nothing but reads"


def test_a_resource_made_for_this_machine_is_adopted_and_deleted(azure, transport):
    ours = {**VALUES, "item": "it-1"}
    transport.queue(load("nic_create", ours)[3:])
    assert azure.ensure_nic("web1-nic0", owner=OWNER).name == "web1-nic0"
    transport.queue(load("disk_create", ours)[3:] + load("disk_delete", ours))
    assert azure.delete_disk("web1-disk0", owner=OWNER) is True
    assert [m for m, _ in calls(transport)] == ["GET", "GET", "DELETE", "GET"]
