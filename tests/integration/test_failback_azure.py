"""The failback cycle with Azure as the cloud: real daemons, a real Azurite, recorded Azure Compute.

On premises is the `local` provider (VM app01, its disk served over NBD by its
agent, a master target on the site's directory). The cloud is an Azure site:
the on-premises process server writes app01's disk into a page blob of
Azurite; Azure Compute (disks, NICs, VMs) answers from recordings shaped like
the public REST API examples, through the real SDK clients of the configuration
server, which runs in this process for that reason (`daemon.run(azure=…)`).

No VM boots from a recording, so the test plays Azure's part for the failed-over
VM: it downloads the blob the failover imported and starts a source agent on it
whose machine UUID is the recorded `vmId` in the byte order a guest may read it
(SMBIOS, first three fields swapped). Every phase is checked by hashing the
disks that must be equal, and every Azure request by method, path and body.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient

from siterecovery.common import daemon as common_daemon
from siterecovery.controller import azure_sites
from siterecovery.controller import daemon as config_server
from siterecovery.controller.settings import ConfigServerSettings
from tests.azure_replay import ReplayTransport, load
from tests.azurite import ACCOUNT, ACCOUNT_KEY
from tests.conftest import needs_tools
from tests.unit.azure.test_compute import SITE, VALUES, StaticToken

from .blob_support import connection_string, write_credential
from .conftest import HEARTBEAT, wait_for
from .failback_site import VM, FailbackSite, MiB, sha256

pytestmark = [pytest.mark.slow, needs_tools("qemu-io")]

AZURE_SITE = "dr-azure"
CONTAINER = "replicas"
VM_ID = "0f47b100-583c-48e3-a4c0-aefc2c9bbcc1"  # properties.vmId in the recordings
DISK_SIZE = 32 * MiB


def names(vm: str, item: str) -> dict[str, str]:
    """The recordings' placeholders for the resources a failover of `vm` creates for protected machine `item`."""
    return {**VALUES, "vm": vm, "disk": f"{vm}-disk0", "nic": f"{vm}-nic0", "item": item}


def deletion(values: dict[str, str]) -> list[dict]:
    """What deleting a failover's VM, disk and NIC asks of Azure: each is read first (only what was
    made for the machine is deleted)."""
    return (load("vm_delete", values) + load("disk_create", values)[3:] + load("disk_delete", values)
            + load("nic_create", values)[3:] + load("nic_delete", values))


class AzureFailbackSite(FailbackSite):
    """FailbackSite with the configuration server in this process and Azure as the cloud."""

    def __init__(self, root: Path, azurite_port: int) -> None:
        super().__init__(root)
        self.azurite_port = azurite_port
        self.transport = ReplayTransport()
        self.connector = azure_sites.AzureConnector(
            transport=self.transport, credential=lambda site, secret: StaticToken(), polling_interval=0,
            sleep=self.transport.sleep,
            storage_credential=lambda site, secret: {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY},
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_config_server(self, *, port: int = 0, **extra) -> None:
        self._close_admin()
        cfg = ConfigServerSettings(state_dir=self.cs_dir, listen="127.0.0.1", port=port, heartbeat_interval=HEARTBEAT,
                                   job_poll_interval=0.2, local_site_dir=self.sites.root, log_json=True)
        self._thread = threading.Thread(target=config_server.run, args=(cfg, self._stop),
                                        kwargs={"azure": self.connector}, daemon=True)
        self._thread.start()
        state = common_daemon.state_file_path(self.cs_dir, config_server.DAEMON)
        wait_for(lambda: state.exists() or not self._thread.is_alive(), what="the configuration server")
        assert self._thread.is_alive(), "the configuration server stopped while starting"
        self.cs_port = common_daemon.read_state_file(self.cs_dir, config_server.DAEMON)["port"]

    def srctl(self, *args: str, config: Path | None = None):
        return super().srctl(*args, config=config or self.profile)

    def start(self) -> None:  # type: ignore[override]
        """The servers, and app01 as a VM of the local provider on premises."""
        self.start_servers(self.sites.onprem.root)
        from siterecovery.controller.cli.lab import _static_network

        from .replication_site import make_image

        directory = self.sites.onprem.vm_dir(VM)
        make_image(directory / "disk0.img", DISK_SIZE, data_bytes=8 * MiB, seed=3)
        vm = self.sites.onprem.define_vm(VM, {"disk0": directory / "disk0.img"}, created_by="user")
        _static_network(vm.guest_root)
        self.sites.onprem.power_on(VM, self.launch())
        wait_for(lambda: len([s for s in self.servers() if s["health"] == "healthy"]) == 4, timeout=60,
                 what="three agents and the VM's agent healthy")

    def start_servers(self, datastore: Path, *, mt_uuid: str = "") -> None:
        """The configuration server, ps-onprem (writing blobs), mt-onprem on `datastore`, ps-cloud; the Azure site."""
        self.start_config_server()
        datastore.mkdir(parents=True, exist_ok=True)
        credential = write_credential(self.root / "secrets" / "azure-storage.conn", self.azurite_port)
        self.start_agent("process-server", "ps-onprem", hostname="ps-onprem",
                         azure_storage_connection_string_file=str(credential))
        self.start_agent("master-target", "mt-onprem", hostname="mt-onprem", datastore_dirs=[str(datastore)],
                         **({"machine_uuid": mt_uuid} if mt_uuid else {}))
        self.start_agent("process-server", "ps-cloud", hostname="ps-cloud")
        secret = self.root / "azure-sp-secret"
        secret.write_text("recorded-responses-need-no-secret\n")
        secret.chmod(0o600)
        added = self.srctl(
            "azure", "add", AZURE_SITE, "--subscription", SITE.subscription_id, "--tenant", SITE.tenant_id,
            "--client-id", SITE.client_id, "--secret-file", str(secret), "--resource-group", SITE.resource_group,
            "--region", SITE.region, "--vnet", SITE.vnet, "--subnet", SITE.subnet, "--test-subnet", "isolated",
            "--storage-account", ACCOUNT, "--container", CONTAINER,
            "--blob-endpoint", f"http://127.0.0.1:{self.azurite_port}/{ACCOUNT}",
        )
        assert added.returncode == 0, added.stderr

    def stop_all(self) -> None:
        super().stop_all()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- Azure -------------------------------------------------------------------------
    def container(self) -> ContainerClient:
        return ContainerClient.from_connection_string(connection_string(self.azurite_port), CONTAINER)

    def blobs_of(self, replica: str) -> set[str]:
        """The blobs beside one replica (its machine's directory): Azurite is shared by the module's tests."""
        prefix = replica.rsplit("/", 1)[0] + "/"
        return {b.name for b in self.container().list_blobs(name_starts_with=prefix)}

    def blob(self, name: str, path: Path) -> Path:
        data = self.container().get_blob_client(name).download_blob(offset=0, length=DISK_SIZE).readall()
        path.write_bytes(data)
        return path

    def boot_azure_vm(self, copy_blob: str) -> Path:
        """Play Azure booting the failed-over VM: its disk is the imported blob; its agent reads the vmId
        byte-swapped from SMBIOS."""
        disk = self.blob(copy_blob, self.root / "azure-app01-disk0.img")
        swapped = str(uuid.UUID(bytes_le=uuid.UUID(VM_ID).bytes))
        self.start_agent("source-agent", "azure-app01", hostname=VM, machine_uuid=swapped,
                         disks=[{"path": str(disk), "name": "disk0"}])
        return disk

    def azure_nbd(self) -> str:
        return common_daemon.read_state_file(self.root / "azure-app01", "source-agent")["nbd"]["disk0"]

    def servers_health(self, server_id: str) -> str:
        return next(s["health"] for s in self.servers() if s["id"] == server_id)

    def requests(self, since: int) -> list[tuple[str, str]]:
        return [(r.method, r.path.rsplit("/", 1)[-1]) for r in self.transport.requests[since:]]


@pytest.fixture
def azure_site(tmp_path: Path, azurite):
    site = AzureFailbackSite(tmp_path, azurite.port)
    try:
        site.start()
        yield site
    finally:
        site.stop_all()


def _write(nbd: str, pattern: int, offset: int, length: int) -> None:
    import subprocess

    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", nbd],
                   check=True, capture_output=True, timeout=60)


def test_protect_to_azure_fail_over_fail_back_and_protect_again(azure_site: AzureFailbackSite) -> None:
    site = azure_site
    assert site.srctl("group", "create", "PG1").returncode == 0
    # Refused before anything is stored: Azure takes no master target; an unknown site.
    for bad in (("--master-target", "mt-onprem"), ("--azure-site", "nope")):
        args = ("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem", "--no-wait")
        result = site.srctl(*args, *(("--azure-site", AZURE_SITE) if "--azure-site" not in bad else ()), *bad)
        assert result.returncode in (2, 3), result.stdout + result.stderr
    assert site.srctl_json("machine", "list") == []

    site.run_job("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem",
                 "--azure-site", AZURE_SITE)
    machine = site.machine()
    (pair,) = machine["pairs"]
    replica = machine["details"]["cloud"]["replicas"]["disk0"]
    blob_name = replica.split(f"/{CONTAINER}/", 1)[1]
    onprem_disk = site.disk("onprem")
    assert sha256(site.blob(blob_name, site.root / "replica.img")) == sha256(onprem_disk)

    # A test failover: its own copy, disk, NIC (in the test subnet) and VM; the cleanup removes them all.
    site.write("onprem", 0x41, 0, MiB)
    taken = site.srctl("recovery-points", "create", VM, "--output", "json")
    assert taken.returncode == 0, taken.stderr
    test = names(f"{VM}-test", machine["id"])
    site.transport.queue(load("disk_create", test) + load("nic_create", test) + load("vm_create", test))
    site.run_job("machine", "test-failover", VM)
    nic_put = next(r for r in site.transport.requests if r.method == "PUT" and r.path.endswith(f"/{VM}-test-nic0"))
    subnet = nic_put.body["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
    assert subnet.endswith("/subnets/isolated"), subnet
    test_copies = site.machine()["details"]["test"]["copies"]
    assert test_copies and all("-test-" in c for c in test_copies)
    seen = len(site.transport.requests)
    site.transport.queue(deletion(test))
    site.run_job("machine", "test-cleanup", VM)
    assert site.requests(seen) == [("GET", f"{VM}-test"), ("DELETE", f"{VM}-test"), ("GET", "op-delete"),
                                   ("GET", "op-delete"), ("GET", f"{VM}-test-disk0"), ("DELETE", f"{VM}-test-disk0"),
                                   ("GET", "op-disk-delete"), ("GET", f"{VM}-test-nic0"), ("DELETE", f"{VM}-test-nic0")]
    remaining = site.blobs_of(blob_name)
    assert remaining == {blob_name}, remaining
    assert site.transport.done

    # A point no disk holds is refused when asked for, before any job exists.
    jobs = len(site.srctl_json("jobs", "list"))
    refused = site.srctl("machine", "failover", VM, "--recovery-point", "latest-app-consistent", "--no-wait")
    assert refused.returncode == 3 and "no app-consistent recovery point" in refused.stderr, refused.stderr
    assert len(site.srctl_json("jobs", "list")) == jobs and site.machine()["state"] == "protected"

    # Failover (planned: the source answers, so its final point is the one recovered).
    site.write("onprem", 0x42, 2 * MiB, MiB)
    prod = names(VM, machine["id"])
    site.transport.queue(load("disk_create", prod) + load("nic_create", prod) + load("vm_create", prod))
    site.run_job("machine", "failover", VM)
    assert site.transport.done
    machine = site.machine()
    cloud = machine["details"]["cloud"]
    assert (machine["state"], cloud["provider"], cloud["vm"], cloud["vm_uuid"]) == (
        "failed-over", "azure", VM, VM_ID)
    assert [i.rsplit("/", 1)[-1] for i in cloud["disk_ids"] + cloud["nic_ids"]] == [f"{VM}-disk0", f"{VM}-nic0"]
    disk_put = next(r for r in site.transport.requests if r.method == "PUT" and r.path.endswith(f"/{VM}-disk0"))
    (copy_blob,) = cloud["copies"]
    assert disk_put.body["properties"]["creationData"]["sourceUri"].endswith(f"/{CONTAINER}/{copy_blob}")
    assert site.sites.onprem.get_vm(VM).power == "off", "failover shuts the source down"
    azure_disk = site.boot_azure_vm(copy_blob)
    failed_over = sha256(azure_disk)
    # The on-premises VM is off by design now: `srctl doctor` says so rather than failing its heartbeat.
    onprem_uuid = site.machine()["details"]["onprem"]["vm_uuid"]
    (onprem_agent,) = [s for s in site.servers() if s["inventory"]["host"]["machine_uuid"] == onprem_uuid]
    wait_for(lambda: site.servers_health(onprem_agent["id"]) == "critical", what="the on-premises agent to go silent")
    doctor = json.loads(site.srctl("doctor", "--output", "json").stdout)
    (beat,) = [c for c in doctor["checks"] if c["name"] == "heartbeat" and c["subject"] == f"source {VM}"
               and "silent" in c["message"]]
    assert beat["status"] == "ok" and "runs in the cloud" in beat["message"], beat
    assert failed_over == sha256(onprem_disk), "the failover's disk is the source at its final point"

    # Work in Azure, then reprotect to the original on-premises VM: only differences travel.
    for index in range(3):
        _write(site.azure_nbd(), 0x50 + index, (5 + 7 * index) * MiB, 256 * 1024)
    site.run_job("machine", "reprotect", VM, "--process-server", "ps-cloud", "--master-target", "mt-onprem")
    machine = site.machine()
    assert (machine["state"], machine["group"]) == ("failback-protected", "PG1_Failback")
    assert machine["details"]["history"][-1]["bytes_moved"] <= 4 * MiB
    site.caught_up()

    # Failback: Azure powers the VM off and deallocates it; the on-premises VM comes back with the data.
    seen = len(site.transport.requests)
    site.transport.queue(load("vm_power_off", prod) + load("vm_deallocate", prod))
    site.run_job("machine", "failback", VM)
    assert site.transport.done
    assert ("POST", "powerOff") in site.requests(seen) and ("POST", "deallocate") in site.requests(seen)
    machine = site.machine()
    assert machine["state"] == "failed-back"
    assert sha256(onprem_disk) == sha256(azure_disk) != failed_over
    assert site.sites.onprem.get_vm(VM).power == "on"
    assert machine["details"]["network_order"]["status"] == "ok"

    # Protect to Azure again, onto the replica blob the first protection left: a delta.
    site.run_job("machine", "reprotect", VM)
    machine = site.machine()
    assert (machine["state"], machine["group"]) == ("protected", "PG1")
    assert machine["details"]["history"][-1]["bytes_moved"] <= 4 * MiB
    site.caught_up()
    assert sha256(site.blob(blob_name, site.root / "replica-again.img")) == sha256(onprem_disk)

    # Delete the Azure VM: VM, disk, NIC and the failover's copy go; the replica stays.
    seen = len(site.transport.requests)
    site.transport.queue(deletion(prod))
    site.run_job("machine", "delete-cloud-vm", VM)
    assert site.transport.done
    assert ("DELETE", VM) in site.requests(seen) and ("DELETE", f"{VM}-disk0") in site.requests(seen)
    assert site.blobs_of(blob_name) == {blob_name}
    retired = [s for s in site.srctl_json("servers", "list", "--all") if s["hostname"] == VM and s.get("revoked_at")]
    assert retired, "the Azure VM's agent is retired with it"
    kept = site.srctl("azure", "remove", AZURE_SITE)
    assert kept.returncode == 4 and "cloud of protected machine(s) app01" in kept.stderr, kept.stderr
    assert [h["workflow"] for h in site.machine()["details"]["history"]] == [
        "protect", "test-failover", "test-cleanup", "failover", "reprotect-to-onprem", "failback",
        "reprotect-to-cloud", "delete-cloud-vm"]


@pytest.fixture
def vpx(tmp_path_factory: pytest.TempPathFactory):
    from .vcsim import running_vcsim

    with running_vcsim("vpx", tmp_path_factory.mktemp("vpx")) as sim:
        yield sim


@pytest.mark.timeout(600)
def test_a_vsphere_vm_fails_over_to_azure_and_back_with_fio_on_both_sides(tmp_path: Path, azurite, vpx) -> None:
    """The real providers on both sides: vcsim on premises, Azurite and recorded compute in Azure.

    The site dies after the last write reached the blob but before any snapshot
    held it: "latest" must still hold it (the blob copied once the process server
    stopped writing it), not the older snapshot.
    """
    from .test_failback_vsphere import (
        Guest,
        _power,
        _until_powered_on,
        _vcenter_ready,
        add_vcenter,
        app_vm,
        fio_write,
    )

    admin = vpx.session()
    datastore, mt_uuid = _vcenter_ready(admin)
    flat, app = app_vm(admin, datastore)
    site = AzureFailbackSite(tmp_path, azurite.port)
    try:
        site.start_servers(datastore, mt_uuid=mt_uuid)
        add_vcenter(site, vpx)
        guest = Guest(site, admin, app.id, flat, app.bios_uuid)
        guest.boot()
        assert site.srctl("group", "create", "PG1").returncode == 0
        site.run_job("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem",
                     "--azure-site", AZURE_SITE)
        machine = site.machine()
        assert (machine["details"]["onprem"]["provider"], machine["details"]["cloud"]["provider"]) == (
            "vsphere", "azure")

        # The last writes reach the blob; then the site dies (the guest with kill -9).
        guest.write(0x11, 4 * MiB, 2 * MiB)
        site.caught_up()
        guest.crash()
        prod = names(VM, machine["id"])
        site.transport.queue(load("disk_create", prod) + load("nic_create", prod) + load("vm_create", prod))
        site.run_job("machine", "failover", VM, "--recovery-point", "latest")
        assert site.transport.done
        assert _power(admin, app.id) == "poweredOff"
        machine = site.machine()
        assert machine["details"]["history"][-1]["point"] == "latest"
        (copy_blob,) = machine["details"]["cloud"]["copies"]
        azure_disk = site.boot_azure_vm(copy_blob)
        assert sha256(azure_disk) == sha256(flat), "the failover holds every write the blob had"

        # Work in Azure (fio through the Azure VM's NBD export), reprotect into the original flat VMDK.
        fio_write(site.azure_nbd(), 0x22, 10 * MiB, 3 * MiB)
        site.run_job("machine", "reprotect", VM, "--process-server", "ps-cloud", "--master-target", "mt-onprem",
                     "--vcenter", "vc01")
        machine = site.machine()
        assert machine["state"] == "failback-protected"
        moved = machine["details"]["history"][-1]["bytes_moved"]
        assert 0 < moved < DISK_SIZE // 2, f"{moved} bytes moved for a {DISK_SIZE}-byte disk: not a delta"
        fio_write(site.azure_nbd(), 0x44, 20 * MiB, 1 * MiB)
        site.caught_up()

        # Failback: Azure powers off and deallocates; vCenter powers app01 on; its guest boots.
        site.transport.queue(load("vm_power_off", prod) + load("vm_deallocate", prod))
        failback = site.start_job("machine", "failback", VM)
        _until_powered_on(site, admin, app.id, failback)
        guest.boot()
        site.wait_job(failback)
        assert site.transport.done
        assert site.machine()["state"] == "failed-back"
        assert sha256(flat) == sha256(azure_disk)

        # Back to Azure, onto the replica blob (a delta); fio writes on premises reach it.
        site.run_job("machine", "reprotect", VM)
        machine = site.machine()
        assert machine["state"] == "protected"
        assert machine["details"]["history"][-1]["bytes_moved"] < DISK_SIZE // 2
        guest.write(0x33, 0, 1 * MiB)
        site.caught_up()
        blob_name = machine["details"]["cloud"]["replicas"]["disk0"].split(f"/{CONTAINER}/", 1)[1]
        assert sha256(site.blob(blob_name, site.root / "replica.img")) == sha256(flat)
    finally:
        admin.close()
        site.stop_all()


def test_a_failover_azure_refuses_leaves_nothing_behind(azure_site: AzureFailbackSite) -> None:
    """The VM is refused (the subscription's core quota): the job fails with Azure's reason, and its
    compensation deletes the disk and NIC it made and the blob copy; app01 runs on premises again."""
    site = azure_site
    assert site.srctl("group", "create", "PG1").returncode == 0
    site.run_job("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem",
                 "--azure-site", AZURE_SITE)
    machine = site.machine()
    blob_name = machine["details"]["cloud"]["replicas"]["disk0"].split(f"/{CONTAINER}/", 1)[1]
    prod = names(VM, machine["id"])
    # Create: disk, NIC, then the VM refused. Compensation: the VM is looked for (never made), the
    # disk and the NIC are read (made for app01) and deleted.
    site.transport.queue(load("disk_create", prod) + load("nic_create", prod) + load("vm_create_quota", prod)
                         + load("vm_get_not_found", prod) + load("disk_create", prod)[3:] + load("disk_delete", prod)
                         + load("nic_create", prod)[3:] + load("nic_delete", prod))
    job = site.run_job("machine", "failover", VM, expect="compensated")
    assert "quota" in job["error_message"].lower(), job["error_message"]
    assert site.transport.done, [e["request"] for e in site.transport.exchanges]
    deleted = [(r.method, r.path.rsplit("/", 1)[-1]) for r in site.transport.requests if r.method == "DELETE"]
    assert deleted == [("DELETE", f"{VM}-disk0"), ("DELETE", f"{VM}-nic0")]
    assert site.blobs_of(blob_name) == {blob_name}, "the failover's blob copy is gone"
    machine = site.machine()
    assert machine["state"] == "protected" and machine["details"]["cloud"]["vm"] == ""
    assert site.sites.onprem.get_vm(VM).power == "on", "the source runs again"
