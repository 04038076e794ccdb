"""The failback cycle with the on-premises site run by vSphere (real vcsim) and the lab's cloud.

The on-premises VM app01 is a vcsim VM whose disk is a flat VMDK on
LocalDS_0 (a real directory); its "guest" is a source agent the test starts
on that flat file with the VM's BIOS UUID, and stops or starts when the
workflows power the VM off or on in vcsim (the test watches the power state,
as a guest would live and die with its VM). Writes on both sides go through
fio's nbd engine. The on-premises master target
mounts LocalDS_0 (its datastore directory is the datastore's URL) and reports
the BIOS UUID of the simulator's VM DC0_C0_RP0_VM0 as its own.

What must hold: protection finds the VM in vCenter's discovery; a snapshot on
the VM refuses reprotect with its count and changes nothing; reprotect writes
only the differing blocks into the original flat VMDK; failback to an older
point puts that disk back to it in place, powers the VM on in vCenter, and the
disk's hash equals the cloud disk's at that point; reprotect to the cloud works.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVmomi import vim

from siterecovery.common.daemon import read_state_file
from siterecovery.controller import launcher
from siterecovery.controller.protection.onprem import GUESTINFO_GENERATION
from siterecovery.controller.providers.vsphere import operations
from siterecovery.controller.providers.vsphere.discovery import discover
from siterecovery.controller.providers.vsphere.session import Session

from .conftest import wait_for
from .failback_site import AGENTS, VM, FailbackSite, MiB, sha256
from .replication_site import make_image
from .vcsim import Vcsim, running_vcsim

# Two sites, vcsim and eight daemons: more than the default 300 s on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MT_VM = "DC0_C0_RP0_VM0"  # on cluster host DC0_C0_H1
APP_HOST = "DC0_C0_H0"
DISK = 32 * MiB


@pytest.fixture
def vpx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("vpx", tmp_path_factory.mktemp("vpx")) as sim:
        yield sim


class Guest:
    """app01's guest: a source agent on the VM's flat VMDK, alive while vCenter says the VM is on."""

    def __init__(self, site: FailbackSite, admin: Session, vm_id: str, flat: Path, bios_uuid: str) -> None:
        # vm_id "": a physical server (no VM, no VMware Tools to ask).
        self.site, self.admin, self.vm_id, self.flat, self.bios_uuid = site, admin, vm_id, flat, bios_uuid
        self.guestinfo = site.root / "guestinfo-disk-generation"
        self.agent: launcher.Launched | None = None

    def boot(self) -> None:
        # What VMware Tools would answer for the disk generation failback stamps on the VM.
        stamp = operations.extra_config(self.admin, self.vm_id).get(GUESTINFO_GENERATION, "") if self.vm_id else ""
        self.guestinfo.write_text(stamp)
        self.agent = self.site.start_agent(
            "source-agent", VM, hostname=VM, machine_uuid=self.bios_uuid,
            disks=[{"name": "disk0", "path": str(self.flat)}],
            disk_generation_command=f"cat {self.guestinfo}",
        )

    def shut_down(self) -> None:
        assert self.agent is not None and launcher.stop(self.agent)
        self.site.daemons.remove(self.agent)
        self.agent = None

    def crash(self) -> None:
        assert self.agent is not None
        launcher.kill9(self.agent)
        self.site.daemons.remove(self.agent)
        self.agent = None

    def nbd(self) -> str:
        return (read_state_file(self.site.root / VM, "source-agent") or {})["nbd"]["disk0"]

    def write(self, pattern: int, offset: int, length: int) -> None:
        fio_write(self.nbd(), pattern, offset, length)


def fio_write(uri: str, pattern: int, offset: int, length: int) -> None:
    """fio's nbd engine writing `length` bytes of `pattern` at `offset` through an NBD export."""
    subprocess.run(
        ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=64k",
         f"--offset={offset}", f"--size={length}", f"--buffer_pattern={pattern:#04x}"],
        check=True, capture_output=True, timeout=120,
    )


def _power(admin: Session, vm_id: str) -> str:
    return operations.power_state(admin, vm_id)


def _snapshot(admin: Session, vm_id: str) -> None:
    vm = operations.ref(admin, vim.VirtualMachine, vm_id)
    operations.wait_for_task(admin, vm.CreateSnapshot_Task(name="before-patch", memory=False, quiesce=False),
                             what="snapshot")


def _drop_snapshots(admin: Session, vm_id: str) -> None:
    vm = operations.ref(admin, vim.VirtualMachine, vm_id)
    operations.wait_for_task(admin, vm.RemoveAllSnapshots_Task(), what="delete snapshots")


def _until_powered_on(site: FailbackSite, admin: Session, vm_id: str, job: str) -> None:
    """Wait until vCenter says the VM is on (then its guest boots), or the job ended (it then says why)."""
    wait_for(lambda: _power(admin, vm_id) == "poweredOn"
             or site.srctl_json("jobs", "show", job)["status"] not in ("pending", "running"),
             timeout=120, what="vCenter to power the VM on")
    if _power(admin, vm_id) != "poweredOn":
        site.wait_job(job)  # fails, showing the job


def _discover(site: FailbackSite) -> None:
    job = site.srctl_json("vcenter", "discover", "vc01", "--no-wait")["job"]
    site.wait_job(job)


def _vcenter_ready(admin: Session) -> tuple[Path, str]:
    """The master target VM made ready for failback; (LocalDS_0's directory, the master target's BIOS UUID)."""
    inv = discover(admin)
    operations.set_extra_config(admin, inv.vm(MT_VM).id, {"disk.EnableUUID": "TRUE"})
    return Path(inv.datastore("LocalDS_0").url), discover(admin).vm(MT_VM).bios_uuid


def _start(site: FailbackSite, vpx: Vcsim, datastore: Path, mt_uuid: str) -> None:
    """The configuration server, the four agents (the on-premises master target on LocalDS_0), vc01 discovered."""
    site.cs_config = {"local_site_dir": str(site.sites.root), "job_poll_interval": 0.2}
    site.start_config_server(**site.cs_config)
    site.sites.cloud.root.mkdir(parents=True)
    for name, (daemon, where) in AGENTS.items():
        extra: dict = {"hostname": name}
        if where.get("onprem"):
            extra.update(datastore_dirs=[str(datastore)], machine_uuid=mt_uuid)
        if where.get("cloud"):
            extra["datastore_dirs"] = [str(site.sites.cloud.root)]
        site.start_agent(daemon, name, **extra)
    add_vcenter(site, vpx)


def add_vcenter(site: FailbackSite, vpx: Vcsim) -> None:
    """The simulator as endpoint vc01, discovered once."""
    password = site.root / "vc-password"
    password.write_text("secret\n")
    password.chmod(0o600)
    added = site.srctl("vcenter", "add", "vc01", "--host", vpx.host, "--port", str(vpx.port), "--user", "admin",
                       "--password-file", str(password), "--ca-file", vpx.cert_file)
    assert added.returncode == 0, added.stderr
    wait_for(lambda: site.srctl_json("vcenter", "list")[0]["discovery_status"] == "ok", timeout=60,
             what="the first discovery")


def app_vm(admin: Session, datastore: Path):
    """VM app01 on host DC0_C0_H0, powered on, its disk a flat VMDK of random data on `datastore`
    (LocalDS_0's directory); returns (the flat file, the VM)."""
    (datastore / VM).mkdir()
    flat = datastore / VM / "disk0-flat.vmdk"
    make_image(flat, DISK, data_bytes=8 * MiB, seed=5)
    (datastore / VM / "disk0.vmdk").write_text(
        f'# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\nRW {DISK // 512} VMFS "disk0-flat.vmdk"\n'
    )
    app = operations.create_vm(admin, name=VM, host_id=discover(admin).host(APP_HOST).id, datastore="LocalDS_0",
                               disks=[f"[LocalDS_0] {VM}/disk0.vmdk"])
    operations.power_on(admin, app.id)
    return flat, app


def test_failback_to_the_original_vsphere_vm_moves_only_the_differences(tmp_path: Path, vpx: Vcsim) -> None:
    admin = vpx.session()
    datastore, mt_uuid = _vcenter_ready(admin)
    flat, app = app_vm(admin, datastore)

    site = FailbackSite(tmp_path)
    try:
        _start(site, vpx, datastore, mt_uuid)
        guest = Guest(site, admin, app.id, flat, app.bios_uuid)
        guest.boot()

        # Protect: the machine is recognised as vCenter's VM app01 by its BIOS UUID.
        protected = site.protect()
        assert protected["state"] == "protected", protected
        onprem = protected["details"]["onprem"]
        assert (protected["details"]["kind"], onprem["provider"], onprem["vm"]) == ("vm", "vsphere", VM)
        guest.write(0x11, 4 * MiB, 2 * MiB)
        site.caught_up()

        # The site goes down: the process server first, so the guest's last write is journaled
        # but never replicated; then the guest, with no chance to tidy up (kill -9).
        ps_onprem = next(d for d in site.daemons if d.state_dir == tmp_path / "ps-onprem")
        assert launcher.stop(ps_onprem)
        site.daemons.remove(ps_onprem)
        guest.write(0x66, 6 * MiB, 1 * MiB)
        guest.crash()

        # Unplanned failover: vCenter powers app01 off; the cloud VM starts from what was replicated.
        site.run_job("machine", "failover", VM, "--recovery-point", "latest")
        assert _power(admin, app.id) == "poweredOff"
        site.start_agent("process-server", "ps-onprem", hostname="ps-onprem")
        fio_write(site.nbd("cloud"), 0x22, 10 * MiB, 3 * MiB)

        # A snapshot on the original VM: reprotect is refused with the fix, nothing changes.
        _snapshot(admin, app.id)
        _discover(site)
        reprotect = ("machine", "reprotect", VM, "--process-server", "ps-cloud", "--master-target", "mt-onprem",
                     "--vcenter", "vc01")
        before = site.machine()
        refused = site.refused(*reprotect)
        assert "VM app01 has 1 snapshot" in refused.stderr and "delete them, then run reprotect again" in refused.stderr
        assert site.machine() == before
        _drop_snapshots(admin, app.id)
        _discover(site)

        # Reprotect to on-premises: delta into the original flat VMDK.
        job = site.run_job(*reprotect)
        machine = site.machine()
        assert machine["state"] == "failback-protected", machine
        moved = machine["details"]["history"][-1]["bytes_moved"]
        assert 0 < moved < DISK // 2, f"{moved} bytes moved for a {DISK}-byte disk: not a delta"
        assert any(p["target_path"] == str(flat) for p in machine["pairs"]), machine["pairs"]
        assert job["status"] == "succeeded"

        # A point in the cloud, then more writes there that failback must leave behind.
        fio_write(site.nbd("cloud"), 0x44, 20 * MiB, 1 * MiB)
        site.caught_up()
        (view,) = site.srctl_json("recovery-points", "create", machine["details"]["cloud"]["machine_id"])
        at_point = sha256(site.disk("cloud"))
        fio_write(site.nbd("cloud"), 0x55, 0, 4 * MiB)
        site.caught_up()
        assert sha256(site.disk("cloud")) != at_point

        # Fail back to that point: the cloud VM goes off; the master target puts the original
        # flat VMDK back to the point in place; vCenter powers app01 on; its guest boots again —
        # and drops the journal holding the crash's unreplicated write instead of replaying it
        # onto the failed-back disk (the disk generation failback stamped on the VM says why).
        failback = site.start_job("machine", "failback", VM, "--recovery-point", view["point"]["tag_id"])
        _until_powered_on(site, admin, app.id, failback)
        guest.boot()
        site.wait_job(failback)
        machine = site.machine()
        assert machine["state"] == "failed-back"
        assert machine["details"]["history"][-1]["point"] == view["point"]["tag_id"]
        assert sha256(flat) == at_point

        # Back to the cloud with delta onto the replicas.
        site.run_job("machine", "reprotect", VM)
        assert site.machine()["state"] == "protected"
        guest.write(0x33, 0, 1 * MiB)
        site.caught_up()
    finally:
        admin.close()
        site.stop_all()


def test_a_physical_server_fails_back_to_a_new_vsphere_vm_on_the_master_targets_host(
    tmp_path: Path, vpx: Vcsim
) -> None:
    admin = vpx.session()
    datastore, mt_uuid = _vcenter_ready(admin)
    disk = tmp_path / "physical-disk0.img"
    make_image(disk, DISK, data_bytes=8 * MiB, seed=7)
    site = FailbackSite(tmp_path)
    try:
        _start(site, vpx, datastore, mt_uuid)
        server = Guest(site, admin, "", disk, "4c4c4544-0000-1000-8000-000000000001")
        server.boot()
        protected = site.protect()
        assert (protected["details"]["kind"], protected["details"]["onprem"]["provider"]) == ("physical", "")
        site.run_job("machine", "failover", VM)
        server.shut_down()
        fio_write(site.nbd("cloud"), 0x22, 10 * MiB, 3 * MiB)

        reprotect = ("machine", "reprotect", VM, "--process-server", "ps-cloud", "--master-target", "mt-onprem",
                     "--vcenter", "vc01")
        refused = site.refused(*reprotect)  # --target original is the default
        assert "physical server" in refused.stderr and "--target new" in refused.stderr
        site.run_job(*reprotect, "--target", "new")
        machine = site.machine()
        assert machine["state"] == "failback-protected", machine
        new_vm = discover(admin).vm(VM)
        assert new_vm is not None and new_vm.host == discover(admin).host("DC0_C0_H1").id, "on the master target's host"
        assert new_vm.power_state == "poweredOff"
        (target,) = [Path(p["target_path"]) for p in machine["pairs"]]
        assert target == datastore / VM / "disk0-flat.vmdk"

        failback = site.start_job("machine", "failback", VM)
        _until_powered_on(site, admin, new_vm.id, failback)
        cloud_disk = sha256(site.disk("cloud"))  # off now: it holds still
        Guest(site, admin, new_vm.id, target, new_vm.bios_uuid).boot()
        site.wait_job(failback)
        machine = site.machine()
        assert machine["state"] == "failed-back"
        assert (machine["details"]["onprem"]["provider"], machine["details"]["onprem"]["vm"]) == ("vsphere", VM)
        assert sha256(target) == cloud_disk
    finally:
        admin.close()
        site.stop_all()
