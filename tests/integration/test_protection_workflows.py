"""Protection workflows with real daemons and the local provider: test failover, failover,
the refusals that must change nothing, and a configuration server killed mid-job.

Every check is by state and by SHA-256 of the disks involved.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import needs_tools

from .conftest import wait_for
from .failback_site import VM, FailbackSite, MiB, sha256

pytestmark = [pytest.mark.slow, needs_tools("qemu-io")]


def test_a_protected_machine_its_twin_group_refusals_and_a_test_failover(protected: FailbackSite) -> None:
    groups = {g["name"]: g for g in protected.srctl_json("group", "list")}
    assert groups["PG1_Failback"]["failback_of"] == "PG1" and groups["PG1"]["machines"] == 1
    machine = protected.machine()
    assert (machine["state"], machine["direction"], machine["group"]) == ("protected", "to-cloud", "PG1")
    assert machine["details"]["kind"] == "vm" and machine["details"]["onprem"]["vm"] == VM
    network = machine["details"]["network"]
    assert network["interfaces"][0]["addresses"][0]["address"] == "10.10.0.11", "static IP recorded at protection"
    (pair,) = machine["pairs"]
    assert Path(pair["target_path"]).is_relative_to(protected.sites.cloud.root)
    protected.caught_up()
    assert sha256(Path(pair["target_path"])) == sha256(protected.disk("onprem"))
    history = machine["details"]["history"]
    assert [h["workflow"] for h in history] == ["protect"] and history[0]["bytes_moved"] > 0

    # Refusals: each names the fix, and nothing changes.
    before = protected.machine()
    cases = [
        (("machine", "failback", VM), "reprotect the machine to on-premises first"),
        (("machine", "reprotect", VM), "reprotect follows a failover"),
        (("machine", "test-cleanup", VM), "no test failover to clean up"),
        (("machine", "delete-cloud-vm", VM), "has no cloud VM to delete"),
    ]
    for args, hint in cases:
        result = protected.refused(*args)
        assert hint in result.stderr, result.stderr
    assert protected.srctl("plan", "create", "P1", "--group", VM).returncode == 0
    plan = protected.srctl_json("plan", "show", "P1")
    assert plan["protection_groups"] == ["PG1", "PG1_Failback"], "a plan holding PG1 holds its twin"
    wrong_way = protected.refused("plan", "failover", "P1", "--direction", "to-onprem")
    assert "replicates to-cloud" in wrong_way.stderr and "reprotect it to on-premises first" in wrong_way.stderr
    bad_point = protected.srctl("machine", "failover", VM, "--recovery-point", "../etc", "--no-wait")
    assert bad_point.returncode == 2 and "not a recovery point" in bad_point.stderr
    after = protected.machine()
    assert (after["state"], after["job"], after["details"]["pairs"]) == (
        before["state"], before["job"], before["details"]["pairs"]
    )

    # A test failover runs beside replication and is cleaned up.
    protected.write("onprem", 0x5A, 4 * MiB, MiB)
    protected.caught_up()
    expected = sha256(protected.disk("onprem"))
    protected.run_job("machine", "test-failover", VM)
    machine = protected.machine()
    assert machine["state"] == "test-failed-over"
    test_vm = protected.sites.cloud.get_vm(f"{VM}-test")
    assert test_vm is not None and test_vm.network == "isolated" and test_vm.power == "on"
    assert sha256(protected.disk("cloud", f"{VM}-test")) == expected
    # Replication goes on: a write on-premises still reaches the replica.
    protected.write("onprem", 0x6B, 8 * MiB, MiB)
    protected.caught_up()
    (pair,) = protected.machine()["pairs"]
    assert sha256(Path(pair["target_path"])) == sha256(protected.disk("onprem"))
    # A test VM is not the failover: failing over now is refused until it is cleaned up.
    refused = protected.refused("machine", "failover", VM)
    assert "test-failed-over" in refused.stderr and "clean up" in refused.stderr
    protected.run_job("machine", "test-cleanup", VM)
    assert protected.machine()["state"] == "protected"
    assert protected.sites.cloud.get_vm(f"{VM}-test") is None
    assert not protected.sites.cloud.vm_dir(f"{VM}-test").exists()


def test_failover_the_failback_rules_and_a_failback_to_a_new_vm(protected: FailbackSite) -> None:
    protected.write("onprem", 0x11, 0, 2 * MiB)
    protected.write("onprem", 0x22, 20 * MiB, 64 * 1024)
    assert protected.srctl("plan", "create", "P1", "--group", VM).returncode == 0
    job = protected.run_job("plan", "failover", "P1", "--direction", "to-cloud", "--recovery-point", "latest")
    assert [s["name"].split(": ")[1] for s in job["steps"]] == [
        "claim", "final point", "shut down source", "pause pairs", "recover disks", "create VM", "remove pairs", "finish"
    ]
    machine = protected.machine()
    assert machine["state"] == "failed-over" and machine["pairs"] == []
    onprem = protected.sites.onprem.get_vm(VM)
    assert onprem is not None and onprem.power == "off", "the source was shut down"
    assert sha256(protected.disk("cloud")) == sha256(protected.disk("onprem")), "every acknowledged write came up"
    # The cloud VM runs: its agent serves the disk, and registered as the cloud side of app01.
    protected.write("cloud", 0x33, 4 * MiB, MiB)
    wait_for(lambda: any(m["hostname"] == VM and m["id"] != machine["details"]["onprem"]["machine_id"]
                         for m in protected.srctl_json("machines", "list")), what="the cloud VM's agent")
    again = protected.refused("plan", "failover", "P1", "--direction", "to-cloud")
    assert "has done that already" in again.stderr

    # The failback rules refuse before anything changes.
    vm_json = protected.sites.onprem.vm_dir(VM) / "vm.json"
    data = json.loads(vm_json.read_text())
    data["snapshots"] = ["before-patch", "after-patch"]
    vm_json.write_text(json.dumps(data))
    route = ("--process-server", "ps-cloud", "--master-target", "mt-onprem")
    refused = protected.refused("machine", "reprotect", VM, *route)
    assert "VM app01 has 2 snapshots" in refused.stderr and "delete them, then run reprotect again" in refused.stderr
    data["snapshots"] = []
    vm_json.write_text(json.dumps(data))
    unreachable = protected.refused("machine", "reprotect", VM, "--process-server", "ps-cloud",
                                    "--master-target", "mt-cloud")
    assert "not reachable from master target mt-cloud" in unreachable.stderr
    machine = protected.machine()
    assert machine["state"] == "failed-over" and machine["pairs"] == []
    assert protected.sites.onprem.get_vm(VM).power == "off"

    # Alternate location: a new VM on the master target's datastore, fully synced, then failed back to.
    protected.run_job("machine", "reprotect", VM, *route, "--target", "new")
    machine = protected.machine()
    (pair,) = machine["pairs"]
    new_disk = protected.disk("onprem", f"{VM}-failback")
    assert Path(pair["target_path"]) == new_disk and machine["details"]["failback"]["target"] == "new"
    protected.run_job("machine", "failback", VM)
    new_vm = protected.sites.onprem.get_vm(f"{VM}-failback")
    assert new_vm is not None and new_vm.power == "on"
    assert sha256(new_disk) == sha256(protected.disk("cloud"))
    assert protected.sites.onprem.get_vm(VM).power == "off", "the original VM was left alone"
    machine = protected.machine()
    assert machine["state"] == "failed-back" and machine["details"]["network_order"]["status"] == "ok"
    keyfiles = list((new_vm.guest_root / "etc" / "NetworkManager" / "system-connections").glob("*.nmconnection"))
    assert keyfiles and "10.10.0.11/24" in keyfiles[0].read_text(), "the static IP came back on the new VM"


def test_a_killed_configuration_server_resumes_its_jobs_and_a_physical_server_fails_back_to_a_vm_only(
    protected: FailbackSite,
) -> None:
    """kill -9 at seeded random moments of a test failover, its cleanup, a failover and a protection; each
    finishes (the whole-cycle test strikes the reprotects, the failback and the delete)."""
    rng = random.Random(11)
    for workflow in ("test-failover", "test-cleanup", "failover"):
        protected.strike(rng, "machine", workflow, VM)
    assert protected.machine()["state"] == "failed-over"
    assert sha256(protected.disk("cloud")) == sha256(protected.disk("onprem"))

    # A physical server (an agent on no VM the site knows) is protected like a VM,
    # and may fail back only to a new VM.
    disk = protected.root / "phys01-disk0.img"
    with open(disk, "wb") as image:
        image.truncate(16 * MiB)
    protected.start_agent("source-agent", "phys01", hostname="phys01", disks=[{"path": str(disk), "name": "disk0"}],
                          network_root=str(protected.root / "phys01-root"))
    wait_for(lambda: any(m["hostname"] == "phys01" for m in protected.srctl_json("machines", "list")),
             what="phys01 to register")
    protected.strike(rng, "machine", "protect", "phys01", "--group", "PG1", "--process-server", "ps-onprem",
                     "--master-target", "mt-cloud")
    physical = protected.srctl_json("machine", "failback-status", "phys01")
    assert physical["details"]["kind"] == "physical" and physical["state"] == "protected"
    protected.run_job("machine", "failover", "phys01")
    refused = protected.refused("machine", "reprotect", "phys01", "--process-server", "ps-cloud",
                                "--master-target", "mt-onprem")
    assert "physical server; failback to physical is not supported" in refused.stderr
    assert "--target new" in refused.stderr
    assert protected.srctl_json("machine", "failback-status", "phys01")["state"] == "failed-over"


def test_the_whole_cycle_moves_only_the_differences_back(protected: FailbackSite) -> None:
    protected.write("onprem", 0x41, 0, MiB)
    protected.run_job("machine", "failover", VM)
    failed_over = sha256(protected.disk("cloud"))
    # Work done in the cloud: 3 x 256 KiB.
    for index in range(3):
        protected.write("cloud", 0x50 + index, (5 + 7 * index) * MiB, 256 * 1024)
    # The configuration server is killed in the middle of the reprotect and of the failback.
    rng = random.Random(5)
    protected.strike(rng, "machine", "reprotect", VM, "--process-server", "ps-cloud", "--master-target", "mt-onprem")
    machine = protected.machine()
    assert (machine["state"], machine["group"], machine["direction"]) == ("failback-protected", "PG1_Failback", "to-onprem")
    (pair,) = machine["pairs"]
    assert Path(pair["target_path"]) == protected.disk("onprem"), "the original VM's disk is the failback target"
    reprotect = machine["details"]["history"][-1]
    assert reprotect["workflow"] == "reprotect-to-onprem"
    assert reprotect["bytes_moved"] <= 4 * MiB, f"a delta resync moved {reprotect['bytes_moved']} bytes"
    protected.caught_up()
    protected.write("cloud", 0x60, 30 * MiB, 64 * 1024)  # after the reprotect, still carried back
    protected.strike(rng, "machine", "failback", VM, "--recovery-point", "latest")
    machine = protected.machine()
    assert machine["state"] == "failed-back" and machine["pairs"] == []
    cloud_vm = protected.sites.cloud.get_vm(VM)
    assert cloud_vm is not None and cloud_vm.power == "off", "failback shuts the cloud VM down"
    assert sha256(protected.disk("onprem")) == sha256(protected.disk("cloud")) != failed_over
    assert protected.sites.onprem.get_vm(VM).power == "on"
    order = machine["details"]["network_order"]
    assert order["status"] == "ok", order
    protected.strike(rng, "machine", "reprotect", VM)
    machine = protected.machine()
    assert (machine["state"], machine["group"]) == ("protected", "PG1")
    protected.caught_up()
    (pair,) = machine["pairs"]
    assert sha256(Path(pair["target_path"])) == sha256(protected.disk("onprem"))
    assert machine["details"]["history"][-1]["bytes_moved"] <= 4 * MiB
    left_behind = protected.refused("machine", "unprotect", VM)
    assert "[cloud-vm-left]" in left_behind.stderr and f"srctl machine delete-cloud-vm {VM}" in left_behind.stderr
    protected.strike(rng, "machine", "delete-cloud-vm", VM)
    assert protected.sites.cloud.get_vm(VM) is None
    assert [h["workflow"] for h in protected.machine()["details"]["history"]] == [
        "protect", "failover", "reprotect-to-onprem", "failback", "reprotect-to-cloud", "delete-cloud-vm"
    ]

    # Unprotect (the configuration server killed in the middle): the pairs end, the machine leaves
    # its group, the replica stays as it was; protecting it again starts over.
    replica = Path(pair["target_path"])
    replica_hash = sha256(replica)
    job = protected.strike(rng, "machine", "unprotect", VM)
    assert job["steps"][-1]["name"] == f"{VM}: forget" and "is no longer protected" in job["steps"][-1]["message"]
    assert protected.srctl("machine", "failback-status", VM).returncode == 3
    assert protected.srctl_json("replication", "status") == []
    assert {g["name"]: g["machines"] for g in protected.srctl_json("group", "list")}["PG1"] == 0
    assert sha256(replica) == replica_hash
    protected.run_job("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem",
                      "--master-target", "mt-cloud")
    protected.caught_up()
    (pair,) = protected.machine()["pairs"]
    assert sha256(Path(pair["target_path"])) == sha256(protected.disk("onprem"))


def test_an_unplanned_failover_first_takes_what_the_process_server_still_holds(protected: FailbackSite) -> None:
    """The site dies while its last writes wait in the process server's spool (the cloud's master
    target is down): those writes were acknowledged, so the failover waits for them to reach the
    target before it pauses the pairs, and the cloud VM's disk holds them."""
    from siterecovery.controller import launcher

    mt_cloud = next(d for d in protected.daemons if d.state_dir == protected.root / "mt-cloud")
    assert launcher.stop(mt_cloud)
    protected.daemons.remove(mt_cloud)
    protected.write("onprem", 0x71, 3 * MiB, MiB)

    def spooled() -> bool:
        (view,) = protected.srctl_json("replication", "status")
        seq = {k: int(view.get(k, 0)) for k in ("spooled_seq", "source_seq", "applied_seq", "spool_backlog_frames")}
        return seq["spooled_seq"] == seq["source_seq"] > seq["applied_seq"] and seq["spool_backlog_frames"] > 0

    wait_for(spooled, timeout=60, what="the write to wait in the spool")
    expected = sha256(protected.disk("onprem"))
    protected.sites.onprem.halt(VM)  # the site goes down; its process server lives on
    job = protected.start_job("machine", "failover", VM)

    def draining_or_done() -> bool:
        shown = protected.srctl_json("jobs", "show", job)
        return shown["status"] not in ("pending", "running") or any(
            "pass on" in s["message"] for s in shown["steps"] if s["name"].endswith("final point"))

    wait_for(draining_or_done, timeout=60, what="the failover to wait for the spool")
    protected.start_agent("master-target", "mt-cloud", hostname="mt-cloud",
                          datastore_dirs=[str(protected.sites.cloud.root)])
    protected.wait_job(job)
    assert sha256(protected.disk("cloud")) == expected
