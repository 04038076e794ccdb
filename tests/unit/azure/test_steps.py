"""Azure job kinds run by the real job engine on a SQLite store, against recorded responses."""

from __future__ import annotations

import pytest

from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import JobRunner, create_job
from siterecovery.controller.providers.azure import steps
from siterecovery.controller.providers.azure.compute import AzureCompute
from siterecovery.controller.store import open_store
from tests.azure_replay import ReplayTransport, load
from tests.unit.azure.test_compute import RG_ID, SITE, VALUES, StaticToken


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


@pytest.fixture
def transport():
    t = ReplayTransport()
    yield t
    assert t.done, f"recorded responses left unused: {[e['request'] for e in t.exchanges]}"


@pytest.fixture
def compute_for(transport):
    azure = AzureCompute.connect(SITE, StaticToken(), transport=transport, polling_interval=0, sleep=transport.sleep)
    return lambda ctx: azure


def run(store, kind, params):
    job = create_job(store, kind, target="web1", params=params)
    runner = JobRunner(store, kinds=[kind], lease_seconds=30)
    for _ in range(10):  # bounded: each round drives the job as far as it goes
        runner.run_once()
        job = store.get_job(job.id)
        if job.status in states.TERMINAL_JOB_STATUSES:
            return job
    raise AssertionError(f"job did not finish: {job}")


def first(name):
    """The recording's first exchange: the step's own look-up before it creates anything."""
    return load(name, VALUES)[:1]


FAILOVER_PARAMS = {
    "disks": [{"name": "web1-disk0", "source_uri": VALUES["source_uri"], "os_type": "Linux"}],
    "nic": {"name": "web1-nic0", "private_ip": "10.1.2.10"},
    "vm": {"name": "web1", "size": "Standard_D2s_v3", "tags": {"sr-machine": "m-1"}},
}


def methods(transport):
    return [(r.method, r.path.removeprefix(RG_ID)) for r in transport.requests if r.method != "GET"]


def test_failover_creates_disks_nic_and_vm(store, transport, compute_for):
    transport.queue(first("disk_create") + load("disk_create", VALUES))
    transport.queue(first("nic_create") + load("nic_create", VALUES))
    transport.queue(first("vm_create") + load("vm_create", VALUES))
    job = run(store, steps.failover_kind(compute_for), FAILOVER_PARAMS)
    assert job.status == states.SUCCEEDED, job.error_message
    outputs = job.outputs()
    assert outputs["create-disks"] == {"disk_ids": [f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0"]}
    assert outputs["create-nic"]["private_ip"] == "10.1.2.10"
    assert outputs["create-vm"]["vm_id"].endswith("/virtualMachines/web1")
    assert methods(transport) == [
        ("PUT", "/providers/Microsoft.Compute/disks/web1-disk0"),
        ("PUT", "/providers/Microsoft.Network/networkInterfaces/web1-nic0"),
        ("PUT", "/providers/Microsoft.Compute/virtualMachines/web1"),
    ]
    vm_put = [r for r in transport.requests if r.method == "PUT"][-1]
    assert vm_put.body["tags"] == {"sr-managed": "true", "sr-job": job.id, "sr-machine": "m-1"}
    assert vm_put.body["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"] == outputs["create-disks"]["disk_ids"][0]
    # every step's last message names what it made
    assert "web1" in job.steps[2].message


def test_failover_refused_for_quota_compensates_and_leaves_nothing_behind(store, transport, compute_for):
    transport.queue(first("disk_create") + load("disk_create", VALUES))
    transport.queue(first("nic_create") + load("nic_create", VALUES))
    transport.queue(first("vm_create") + load("vm_create_quota", VALUES))
    transport.queue(first("vm_create"))  # the step's clean-up finds no VM: Azure created none
    transport.queue(load("nic_delete", VALUES))  # compensate create-nic
    transport.queue(load("disk_delete", VALUES))  # compensate create-disks
    job = run(store, steps.failover_kind(compute_for), FAILOVER_PARAMS)
    assert job.status == states.COMPENSATED
    assert job.error_code == "azure-quota"
    assert "quota" in job.error_message
    # (copy-points had nothing to copy: these disks name their source blob)
    assert [s.status for s in job.steps] == [states.COMPENSATED] * 3 + [states.FAILED]
    assert methods(transport) == [
        ("PUT", "/providers/Microsoft.Compute/disks/web1-disk0"),
        ("PUT", "/providers/Microsoft.Network/networkInterfaces/web1-nic0"),
        ("PUT", "/providers/Microsoft.Compute/virtualMachines/web1"),
        ("DELETE", "/providers/Microsoft.Network/networkInterfaces/web1-nic0"),
        ("DELETE", "/providers/Microsoft.Compute/disks/web1-disk0"),
    ]


def test_shutdown_powers_off_then_deallocates(store, transport, compute_for):
    transport.queue(load("vm_power_off", VALUES) + load("vm_deallocate", VALUES))
    job = run(store, steps.shutdown_kind(compute_for), {"vm": {"name": "web1"}})
    assert job.status == states.SUCCEEDED, job.error_message
    assert job.outputs() == {"power-off": {"power_state": "stopped"}, "deallocate": {"power_state": "deallocated"}}
    assert [p.rsplit("/", 1)[-1] for m, p in methods(transport)] == ["powerOff", "deallocate"]


def test_delete_records_resources_first_then_deletes_all(store, transport, compute_for):
    values = dict(VALUES)
    transport.queue(load("vm_delete", values)[:1])  # record-resources reads the VM
    transport.queue(load("vm_delete", values))  # delete-vm
    transport.queue(load("disk_delete", values))  # the OS disk
    transport.queue(load("disk_delete", {**values, "disk": "web1-disk0-1"}))  # the data disk
    transport.queue(load("nic_delete", values))
    job = run(store, steps.delete_kind(compute_for), {"vm": {"name": "web1"}})
    assert job.status == states.SUCCEEDED, job.error_message
    recorded = job.outputs()["record-resources"]
    assert recorded["disk_ids"] == [
        f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0",
        f"{RG_ID}/providers/Microsoft.Compute/disks/web1-disk0-1",
    ]
    assert recorded["nic_ids"] == [f"{RG_ID}/providers/Microsoft.Network/networkInterfaces/web1-nic0"]
    assert methods(transport) == [
        ("DELETE", "/providers/Microsoft.Compute/virtualMachines/web1"),
        ("DELETE", "/providers/Microsoft.Compute/disks/web1-disk0"),
        ("DELETE", "/providers/Microsoft.Compute/disks/web1-disk0-1"),
        ("DELETE", "/providers/Microsoft.Network/networkInterfaces/web1-nic0"),
    ]


def test_deploy_process_server_sends_cloud_init_that_never_enters_params(store, transport, compute_for):
    secret = "correct-horse-battery-staple"
    cloud_init = steps.process_server_cloud_init(
        config_server="10.1.0.4:443", passphrase=secret, install_command="pip install siterecovery"
    )
    kind = steps.deploy_process_server_kind(compute_for, lambda ctx: cloud_init)
    params = {
        "nic": {"name": "web1-nic0", "private_ip": "10.1.2.10"},
        "vm": {
            "name": "web1",
            "size": "Standard_D2s_v3",
            "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
            "admin_username": "sradmin",
            "ssh_public_key": "ssh-ed25519 AAAAC3Nza test",
        },
    }
    transport.queue(first("nic_create") + load("nic_create", VALUES))
    transport.queue(first("vm_create") + load("vm_create", VALUES))
    job = run(store, kind, params)
    assert job.status == states.SUCCEEDED, job.error_message
    import base64

    vm_put = [r for r in transport.requests if r.method == "PUT"][-1]
    sent = base64.b64decode(vm_put.body["properties"]["osProfile"]["customData"]).decode()
    assert sent.startswith("#cloud-config\n") and "permissions: '0600'" in sent and secret in sent
    assert "--passphrase-file /etc/siterecovery/passphrase" in sent
    stored = store.get_job(job.id)
    assert secret not in repr(stored.params) and all(secret not in (s.message + repr(s.output)) for s in stored.steps)
