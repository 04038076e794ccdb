"""`srctl drill`: the whole failover and failback cycle in the lab, with a verdict per phase.

Phases: protect (done by `lab up`), write on-premises, fail over to the cloud
(a recovery plan, direction to-cloud), write in the cloud, reprotect to
on-premises (only differing blocks travel back), fail back (the plan,
direction to-onprem; the cloud VM is shut down), reprotect to the cloud, and
delete the cloud VM the failback left. Each phase reports its time, the bytes
the replication moved, and an integrity verdict computed here, from the
files: the two disks that must be equal at that moment are hashed (SHA-256)
and compared, e.g. after the failback the on-premises disk and the cloud disk
at the chosen point (the cloud VM is off by then, so its disk holds still).

Writes go through each VM's NBD export with qemu-io, as an application would.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import typer

from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.controller.cli import output
from siterecovery.controller.cli.client import Profile, lab_profile
from siterecovery.controller.cli.lab import (
    LAB_VM,
    MT_ONPREM,
    PS_CLOUD,
    DirOption,
    lab_dir_of,
    running_daemons,
    start,
    wait_job,
)
from siterecovery.controller.cli.session import explain
from siterecovery.controller.protection.environment import LocalSites

PLAN = "drill"
JOB_TIMEOUT = 900.0
WRITES = 24


@dataclass
class Phase:
    name: str
    seconds: float
    bytes_moved: int
    verdict: str  # "ok", "FAILED: ...", or "-" when there is nothing to compare
    detail: str = ""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _equal(what: str, a: Path, b: Path) -> tuple[str, str]:
    left, right = sha256(a), sha256(b)
    if left == right:
        return "ok", f"{what}: sha256 {left[:16]}… on both"
    return f"FAILED: {what} differ", f"{a}: {left}; {b}: {right}"


def _write(uri: str, seed: int, size: int) -> int:
    """Random writes (64 KiB to 1 MiB, random patterns) through NBD; returns the bytes written."""
    rng = random.Random(seed)
    commands: list[str] = []
    written = 0
    for _ in range(WRITES):
        length = rng.choice((64, 256, 1024)) * 1024
        offset = rng.randrange(0, size - length, 4096)
        commands += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {length}"]
        written += length
    try:
        subprocess.run(["qemu-io", "-f", "raw", *commands, uri], check=True, capture_output=True, timeout=120)
    except FileNotFoundError:
        raise errors.PreconditionFailed("qemu-io is not installed", hint="run deploy/install.sh",
                                        code="qemu-io-missing") from None
    except subprocess.CalledProcessError as exc:
        raise errors.Unavailable(f"writing through {uri} failed: {exc.stderr.decode(errors='replace')[-300:]}",
                                 code="drill-write-failed") from exc
    return written


class Drill:
    def __init__(self, lab_dir: Path, profile: Profile) -> None:
        self.sites = LocalSites(lab_dir / "sites")
        self.profile = profile
        self.stub = profile.protection()
        self.phases: list[Phase] = []

    def machine(self) -> ppb.ProtectedMachine:
        return self.stub.GetProtectedMachine(ppb.GetProtectedMachineRequest(machine=LAB_VM), timeout=RPC_TIMEOUT)

    def last_history(self) -> dict:
        history = json.loads(self.machine().details_json).get("history", [])
        return history[-1] if history else {}

    def run_job(self, start) -> tuple[float, int]:
        started = time.monotonic()
        job = start()
        wait_job(self.profile, job.id, JOB_TIMEOUT)
        record = self.last_history()
        return time.monotonic() - started, int(record.get("bytes_moved", 0))

    def plan(self, workflow: str, **fields) -> tuple[float, int]:
        return self.run_job(lambda: self.stub.StartPlanWorkflow(
            ppb.StartPlanWorkflowRequest(plan=PLAN, workflow=workflow, **fields), timeout=RPC_TIMEOUT))

    def replica(self, machine: ppb.ProtectedMachine) -> Path:
        (pair,) = [p for p in machine.pairs]
        return Path(pair.target_path)

    def wait_caught_up(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pairs = self.machine().pairs
            if pairs and all(p.rpo_known and p.rpo_seconds == 0 and p.source_backlog_bytes == 0
                             and p.spool_backlog_bytes == 0 and p.source_seq == p.applied_seq for p in pairs):
                return
            time.sleep(0.2)
        raise errors.Unavailable("replication did not catch up within 120 s", code="drill-not-caught-up")

    def add(self, name: str, seconds: float, moved: int, verdict: tuple[str, str] | None) -> None:
        status, detail = verdict if verdict else ("-", "")
        self.phases.append(Phase(name, round(seconds, 2), moved, status, detail))

    def run(self) -> list[Phase]:
        machine = self.machine()
        if machine.state != "protected":
            raise errors.PreconditionFailed(
                f"{LAB_VM} is {machine.state}; the drill starts from a protected machine",
                hint="`srctl machine failback-status app01` says what to do next, "
                     "or start afresh: `srctl lab down --purge` then `srctl lab up`",
                code="drill-wrong-state",
            )
        plans = [p.name for p in self.stub.ListRecoveryPlans(ppb.ListRecoveryPlansRequest(), timeout=RPC_TIMEOUT).plans]
        if PLAN not in plans:
            self.stub.SaveRecoveryPlan(ppb.SaveRecoveryPlanRequest(
                plan=ppb.RecoveryPlan(name=PLAN, groups=[ppb.PlanGroup(machines=[LAB_VM])])), timeout=RPC_TIMEOUT)
        onprem_disk = self.sites.onprem.vm_dir(LAB_VM) / "disk0.img"
        cloud_disk = self.sites.cloud.vm_dir(LAB_VM) / "disk0.img"
        size = onprem_disk.stat().st_size

        protect = next((h for h in reversed(json.loads(machine.details_json).get("history", []))
                        if h["workflow"] in ("protect", "reprotect-to-cloud")), {})
        self.wait_caught_up()
        self.add("protect to the cloud", protect.get("seconds", 0.0), int(protect.get("bytes_moved", 0)),
                 _equal("on-premises disk and cloud replica", onprem_disk, self.replica(self.machine())))

        started = time.monotonic()
        written = _write(self.sites.onprem.get_vm(LAB_VM).nbd_uris()["disk0"], seed=1, size=size)
        self.wait_caught_up()
        self.add("write on-premises", time.monotonic() - started, written, None)

        seconds, moved = self.plan("failover", direction="to-cloud", recovery_point="latest")
        self.add("fail over to the cloud", seconds, moved,
                 _equal("on-premises disk and cloud VM disk", onprem_disk, cloud_disk))

        started = time.monotonic()
        written = _write(self.sites.cloud.get_vm(LAB_VM).nbd_uris()["disk0"], seed=2, size=size)
        self.add("write in the cloud", time.monotonic() - started, written, None)

        seconds, moved = self.plan("reprotect", process_server=PS_CLOUD, master_target=MT_ONPREM, target="original")
        self.wait_caught_up()
        self.add("reprotect to on-premises", seconds, moved,
                 _equal("cloud VM disk and on-premises disk", cloud_disk, onprem_disk))

        seconds, moved = self.plan("failover", direction="to-onprem", recovery_point="latest")
        self.add("fail back to on-premises", seconds, moved,
                 _equal("cloud disk at the point and failed-back disk", cloud_disk, onprem_disk))

        seconds, moved = self.plan("reprotect")
        self.wait_caught_up()
        self.add("reprotect to the cloud", seconds, moved,
                 _equal("on-premises disk and cloud replica", onprem_disk, self.replica(self.machine())))

        seconds, moved = self.run_job(lambda: self.stub.StartWorkflow(
            ppb.StartWorkflowRequest(machine=LAB_VM, workflow="delete-cloud-vm"), timeout=RPC_TIMEOUT))
        self.add("delete the cloud VM", seconds, 0, ("ok", "") if not cloud_disk.exists() else
                 ("FAILED: the cloud VM's disk is still there", str(cloud_disk)))
        return self.phases


def drill(
    directory: DirOption = None,
    output_format: output.OutputOption = output.Format.table,
) -> None:
    """Run the whole failover and failback cycle in the lab (started first when none runs); a verdict per phase."""
    lab_dir = lab_dir_of(directory)
    if not running_daemons(lab_dir):
        # For scripts stdout holds only the result; the lab's summary goes to stderr then.
        people = output_format is output.Format.table
        (output.console if people else output.err_console).print(f"No lab runs in {lab_dir}: starting one (srctl lab up).")
        summary = start(lab_dir)
        if people:
            summary.print()
    profile = Profile.load(lab_profile(lab_dir))
    runner = Drill(lab_dir, profile)
    try:
        phases = runner.run()
    except grpc.RpcError as exc:
        raise explain(exc, profile) from exc
    failed = [p for p in phases if p.verdict not in ("ok", "-")]
    if output_format is not output.Format.table:
        output.emit(output_format, {"phases": [asdict(p) for p in phases], "ok": not failed})
    else:
        output.print_table("Drill", ["PHASE", "TIME", "BYTES MOVED", "INTEGRITY"], [
            [p.name, f"{p.seconds:.1f} s", output.human_bytes(p.bytes_moved), p.verdict] for p in phases
        ])
        for p in phases:
            if p.detail:
                output.console.print(f"  {p.name}: {p.detail}", highlight=False)
        output.console.print(f"The lab in {lab_dir} keeps running: `srctl drill` runs the cycle again, "
                             "`srctl lab down` stops it.", highlight=False)
    if failed:
        raise typer.Exit(errors.Integrity.exit_code)
