"""A two-site setup for the protection workflow tests: real daemons, the `local` provider.

The configuration server runs the local provider over `<root>/sites`; a
process server and a master target stand at each site (named like the lab's:
ps-onprem, mt-onprem, ps-cloud, mt-cloud); the on-premises VM `app01` is a
disk image served over NBD by its agent. `protect()` protects it in PG1.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from siterecovery.controller import launcher
from siterecovery.controller.protection.environment import LocalSites
from siterecovery.controller.providers.local.site import AgentLaunch

from .conftest import HEARTBEAT, Site, wait_for
from .replication_site import make_image, sha256

MiB = 1024 * 1024
VM = "app01"
AGENTS = {
    "ps-onprem": ("process-server", {}),
    "mt-onprem": ("master-target", {"onprem": True}),
    "ps-cloud": ("process-server", {}),
    "mt-cloud": ("master-target", {"cloud": True}),
}
JOB_TIMEOUT = 240.0


class FailbackSite(Site):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.sites = LocalSites(root / "sites")
        self.cs_config: dict[str, Any] = {}

    # -- start ----------------------------------------------------------------------
    def start(self, *, disk_size: int = 32 * MiB, data_bytes: int = 8 * MiB, static_network: bool = True) -> None:
        self.cs_config = {"local_site_dir": str(self.sites.root), "job_poll_interval": 0.2}
        self.start_config_server(**self.cs_config)
        self.sites.onprem.root.mkdir(parents=True, exist_ok=True)
        self.sites.cloud.root.mkdir(parents=True, exist_ok=True)
        for name, (daemon, where) in AGENTS.items():
            extra: dict[str, Any] = {"hostname": name}
            if where.get("onprem"):
                extra["datastore_dirs"] = [str(self.sites.onprem.root)]
            if where.get("cloud"):
                extra["datastore_dirs"] = [str(self.sites.cloud.root)]
            self.start_agent(daemon, name, **extra)
        directory = self.sites.onprem.vm_dir(VM)
        make_image(directory / "disk0.img", disk_size, data_bytes=data_bytes, seed=3)
        vm = self.sites.onprem.define_vm(VM, {"disk0": directory / "disk0.img"}, created_by="user")
        if static_network:
            from siterecovery.controller.cli.lab import _static_network

            _static_network(vm.guest_root)
        self.sites.onprem.power_on(VM, self.launch())
        wait_for(lambda: len([s for s in self.servers() if s["health"] == "healthy"]) == 5, timeout=60,
                 what="four agents and the VM's agent healthy")

    def launch(self) -> AgentLaunch:
        return AgentLaunch(server=f"127.0.0.1:{self.cs_port}", passphrase=self.passphrase(),
                           heartbeat_interval=HEARTBEAT)

    def protect(self) -> dict:
        assert self.srctl("group", "create", "PG1").returncode == 0
        self.run_job("machine", "protect", VM, "--group", "PG1", "--process-server", "ps-onprem",
                     "--master-target", "mt-cloud")
        return self.machine()

    # -- jobs -------------------------------------------------------------------------
    def start_job(self, *args: str) -> str:
        result = self.srctl(*args, "--no-wait", "--output", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["job"]

    def wait_job(self, job_id: str, *, expect: str = "succeeded") -> dict:
        def finished() -> dict | None:
            job = self.srctl_json("jobs", "show", job_id)
            return job if job["status"] in ("succeeded", "failed", "compensated", "cancelled") else None

        job = wait_for(finished, timeout=JOB_TIMEOUT, what=f"job {job_id}")
        assert job["status"] == expect, json.dumps(job, indent=1)
        return job

    def run_job(self, *args: str, expect: str = "succeeded") -> dict:
        return self.wait_job(self.start_job(*args), expect=expect)

    def refused(self, *args: str) -> subprocess.CompletedProcess:
        """A command that must be refused (exit 5) before any job starts."""
        jobs = len(self.srctl_json("jobs", "list"))
        result = self.srctl(*args, "--no-wait")
        assert result.returncode == 5, result.stdout + result.stderr
        assert len(self.srctl_json("jobs", "list")) == jobs, "a refused command started a job"
        return result

    # -- reading --------------------------------------------------------------------------
    def machine(self) -> dict:
        return self.srctl_json("machine", "failback-status", VM)

    def disk(self, site: str, vm: str = VM) -> Path:
        return (self.sites.onprem if site == "onprem" else self.sites.cloud).vm_dir(vm) / "disk0.img"

    def nbd(self, site: str, vm: str = VM) -> str:
        found = (self.sites.onprem if site == "onprem" else self.sites.cloud).get_vm(vm)
        assert found is not None and found.power == "on", f"{vm} is not running at {site}"
        return found.nbd_uris()["disk0"]

    def write(self, site: str, pattern: int, offset: int, length: int, vm: str = VM) -> None:
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", self.nbd(site, vm)],
                       check=True, capture_output=True, timeout=60)

    def caught_up(self) -> None:
        def done() -> bool:
            pairs = self.machine()["pairs"]
            views = [p for p in self.srctl_json("replication", "status") if p["pair_id"] in {q["pair_id"] for q in pairs}]
            return bool(views) and all(v.get("rpo_seconds") == 0 and v.get("source_seq") == v.get("applied_seq")
                                       for v in views)

        wait_for(done, timeout=60, what="replication to catch up")

    # -- restarts ------------------------------------------------------------------------
    def kill_config_server(self) -> None:
        assert self.cs is not None
        launcher.kill9(self.cs)
        self.daemons.remove(self.cs)

    def strike(self, rng, *args: str) -> dict:
        """Start a job, kill -9 the configuration server at a random moment of it, start it again;
        the job must still succeed."""
        job_id = self.start_job(*args)
        strike_at = time.monotonic() + rng.uniform(0.0, 3.0)  # a seeded moment, not a synchronisation
        wait_for(lambda: time.monotonic() >= strike_at
                 or self.srctl_json("jobs", "show", job_id)["status"] not in ("pending", "running"),
                 what="the moment to strike")
        self.kill_config_server()
        self.restart_config_server()
        return self.wait_job(job_id)

    def restart_config_server(self) -> None:
        """Start it again on the port it had (agents know that one)."""
        self.start_config_server(port=self.cs_port, **self.cs_config)

    def stop_all(self) -> None:
        for site in (self.sites.onprem, self.sites.cloud):
            for vm in site.list_vms():
                site.halt(vm.name)
        super().stop_all()


__all__ = ["VM", "FailbackSite", "MiB", "sha256"]
