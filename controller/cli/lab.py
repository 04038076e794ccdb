"""`srctl lab`: an on-premises site and a cloud on this host, on free loopback ports.

`lab up` starts a configuration server with the `local` provider (VMs are
directories under `sites/onprem` and `sites/cloud`), a process server and a
master target for each site, and the on-premises VM `app01` (a 256 MiB disk
served over NBD by its agent); waits until every one is enrolled and healthy;
protects `app01` to the cloud in protection group PG1 and waits for the
initial sync; and prints where everything is, the NBD address first.
Everything lives under one directory (default ~/.local/state/siterecovery/lab);
`lab down` stops every process (VMs that were on come back with the next
`lab up`), and `--purge` also removes the directory. `srctl drill` runs the
whole failover and failback cycle in it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import tomli_w
import typer

from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.common.daemon import read_state_file
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.controller import launcher
from siterecovery.controller.cli import output
from siterecovery.controller.cli.client import LAB_DIR_ENV, Profile, lab_profile
from siterecovery.controller.cli.client import lab_dir as resolve_lab_dir
from siterecovery.controller.inventory_view import CONFIG_SERVER_ID
from siterecovery.controller.protection.environment import LocalSites
from siterecovery.controller.providers.local.site import AGENT, AgentLaunch

app = typer.Typer(help="A whole site on this host, for trying things out.", no_args_is_help=True)

DISK_BYTES = 256 * 1024**2
HEALTH_TIMEOUT = 60.0
SYNC_TIMEOUT = 300.0
# Shorter than production's 10 s so that orders (enable, pause, take a point)
# reach the lab's agents within a couple of seconds.
LAB_HEARTBEAT_SECONDS = 2.0
LAB_FILE = "lab.json"
# Every lab daemon serves Prometheus metrics on a free loopback port (`srctl lab status` lists them).
METRICS_LISTEN = "127.0.0.1:0"
PS_ONPREM, MT_ONPREM, PS_CLOUD, MT_CLOUD = "ps-onprem", "mt-onprem", "ps-cloud", "mt-cloud"
LAB_VM = "app01"
LAB_GROUP = "PG1"

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="where the lab lives (default ~/.local/state/siterecovery/lab)", envvar=LAB_DIR_ENV),
]


def lab_dir_of(directory: Path | None) -> Path:
    return resolve_lab_dir(directory)


def running_daemons(lab_dir: Path) -> list[launcher.Launched]:
    path = lab_dir / LAB_FILE
    if not path.exists():
        return []
    daemons, _ = launcher.load(path)
    return [d for d in daemons if d.process() is not None]


def make_disk_image(path: Path, size: int = DISK_BYTES) -> None:
    """A sparse image with 16 MiB of random data spread over it, like a used disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as image:
        image.truncate(size)
        chunk = 1024 * 1024
        for offset in range(0, size, size // 16):
            image.seek(offset)
            image.write(os.urandom(chunk))
        image.flush()
        os.fsync(image.fileno())


def _write_toml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def _wait_healthy(profile: Profile, expected: int) -> list[common_pb2.ServerInfo]:
    """Until `expected` servers report healthy, or HEALTH_TIMEOUT passes."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    stub = profile.admin()
    servers: list[common_pb2.ServerInfo] = []
    while time.monotonic() < deadline:
        try:
            servers = list(stub.ListServers(admin_pb2.ListServersRequest(), timeout=RPC_TIMEOUT).servers)
        except grpc.RpcError:
            servers = []
        healthy = [
            s for s in servers
            if s.health == common_pb2.HEALTH_HEALTHY and s.role != common_pb2.ROLE_CONFIG_SERVER
        ]
        if len(healthy) >= expected:
            return servers
        time.sleep(0.2)
    raise errors.Unavailable(
        f"the lab's servers were not all healthy after {HEALTH_TIMEOUT:.0f} s",
        hint="see `srctl lab status` and the logs in the lab's logs/ folder",
        code="lab-unhealthy",
    )


@app.command("up")
def up(
    directory: DirOption = None,
    heartbeat_interval: Annotated[float, typer.Option(help="seconds between heartbeats")] = LAB_HEARTBEAT_SECONDS,
    replicate: Annotated[bool, typer.Option("--replicate/--no-replicate", help="protect the lab's VM to the cloud")] = True,
    output_format: output.OutputOption = output.Format.table,
) -> None:
    """Start a whole site on loopback (on-premises and cloud, local provider) and wait until it is healthy."""
    summary = start(lab_dir_of(directory), heartbeat_interval=heartbeat_interval, replicate=replicate)
    output.emit(output_format, summary.data(), summary.print)


@dataclass
class Summary:
    """What `lab up` started, for people (`print`) and scripts (`data`)."""

    lab_dir: Path
    started: list[launcher.Launched]
    names: list[str]
    profile: Profile
    sites: LocalSites
    protected: ppb.ProtectedMachine | None

    def data(self) -> dict:
        return {
            "dir": str(self.lab_dir),
            "profile": str(self.profile.path),
            "processes": [
                {"component": name, "pid": d.pid, "address": f"127.0.0.1:{d.state['port']}" if "port" in d.state else "",
                 "log": str(d.log_path)}
                for name, d in zip(self.names, self.started, strict=False)
            ],
            "vms": [
                {"name": vm.name, "site": site.role, "nbd": vm.nbd_uris()}
                for site in (self.sites.onprem, self.sites.cloud) for vm in site.list_vms()
            ],
            "protected": {"name": self.protected.name, "state": self.protected.state, "group": self.protected.group}
            if self.protected is not None else None,
        }

    def print(self) -> None:
        _print_summary(self.lab_dir, self.started, self.names, self.profile, self.sites, self.protected)


def start(lab_dir: Path, *, heartbeat_interval: float = LAB_HEARTBEAT_SECONDS, replicate: bool = True) -> Summary:
    if running_daemons(lab_dir):
        raise errors.Conflict(
            f"a lab already runs in {lab_dir}",
            hint="see `srctl lab status`, or stop it with `srctl lab down`",
            code="lab-running",
        )
    lab_dir.mkdir(parents=True, exist_ok=True)
    logs = lab_dir / "logs"
    started: list[launcher.Launched] = []
    lab_file = lab_dir / LAB_FILE
    sites = LocalSites(lab_dir / "sites")
    try:
        cs_dir = lab_dir / "config-server"
        cs_config = _write_toml(
            lab_dir / "config" / "config-server.toml",
            {
                "state_dir": str(cs_dir), "listen": "127.0.0.1", "port": 0, "heartbeat_interval": heartbeat_interval,
                "local_site_dir": str(sites.root), "job_poll_interval": 0.5, "metrics_listen": METRICS_LISTEN,
            },
        )
        started.append(
            launcher.launch("config-server", ["--config", str(cs_config)], state_dir=cs_dir,
                            log_path=logs / "config-server.log")
        )
        launcher.save(lab_file, started, names=["config-server"])
        port = started[0].state["port"]
        profile = Profile.load(lab_profile(lab_dir))
        passphrase = profile.admin().GetPassphrase(admin_pb2.GetPassphraseRequest(), timeout=RPC_TIMEOUT).passphrase
        passphrase_file = lab_dir / "config" / "passphrase"
        passphrase_file.write_text(passphrase + "\n")
        os.chmod(passphrase_file, 0o600)
        common = {
            "server": f"127.0.0.1:{port}", "passphrase_file": str(passphrase_file),
            "heartbeat_interval": heartbeat_interval, "listen": "127.0.0.1", "port": 0, "advertise": "127.0.0.1",
            "metrics_listen": METRICS_LISTEN,
        }
        configs = _agent_configs(lab_dir, sites, common)
        names = ["config-server"]
        for name, (daemon, config_values) in configs.items():
            config = _write_toml(lab_dir / "config" / f"{name}.toml", config_values)
            started.append(
                launcher.launch(daemon, ["--config", str(config)], state_dir=Path(config_values["state_dir"]),
                                log_path=logs / f"{name}.log")
            )
            names.append(name)
            launcher.save(lab_file, started, names=names)
        _start_vms(sites, AgentLaunch(server=f"127.0.0.1:{port}", passphrase=passphrase,
                                      heartbeat_interval=heartbeat_interval))
        _wait_healthy(profile, expected=len(configs) + 1)
        protected = _protect(profile, LAB_VM) if replicate else None
    except (errors.SiteRecoveryError, grpc.RpcError) as exc:
        halt_vms(sites)
        for daemon in reversed(started):
            launcher.stop(daemon)
        if isinstance(exc, grpc.RpcError):
            raise errors.from_rpc_error(exc) from exc
        raise
    return Summary(lab_dir, started, names, profile, sites, protected)


def _agent_configs(lab_dir: Path, sites: LocalSites, common: dict) -> dict[str, tuple[str, dict]]:
    """The lab's agents: a process server and a master target at each site.

    On-premises: the process server that forwards the VM's writes to the cloud,
    and the master target that writes the on-premises VMs' disks on failback.
    In the cloud: the process server that a failed-over VM replicates through,
    and the master target that keeps the replicas (the stand-in for page blobs).
    """
    def agent(name: str, **extra: object) -> dict:
        return {**common, "state_dir": str(lab_dir / name), "hostname": name, **extra}

    sites.onprem.root.mkdir(parents=True, exist_ok=True)
    sites.cloud.root.mkdir(parents=True, exist_ok=True)
    return {
        PS_ONPREM: ("process-server", agent(PS_ONPREM)),
        MT_ONPREM: ("master-target", agent(MT_ONPREM, datastore_dirs=[str(sites.onprem.root)])),
        PS_CLOUD: ("process-server", agent(PS_CLOUD)),
        MT_CLOUD: ("master-target", agent(MT_CLOUD, datastore_dirs=[str(sites.cloud.root)])),
    }


def _start_vms(sites: LocalSites, launch: AgentLaunch) -> None:
    """The lab's VMs: the first time, the on-premises VM with a 256 MiB disk; later, every VM that was on."""
    onprem = sites.onprem
    if onprem.get_vm(LAB_VM) is None:
        directory = onprem.vm_dir(LAB_VM)
        make_disk_image(directory / "disk0.img")
        vm = onprem.define_vm(LAB_VM, {"disk0": directory / "disk0.img"}, created_by="user")
        _static_network(vm.guest_root)
        onprem.power_on(LAB_VM, launch)
    for site in (onprem, sites.cloud):
        for vm in site.list_vms():
            if vm.power == "on":
                site.power_on(vm.name, launch)  # no-op when its agent runs


def _static_network(root: Path) -> None:
    """The lab VM's guest network configuration: a static address (what a failover to a cloud loses)."""
    mac = (root / "sys" / "class" / "net" / "eth0" / "address").read_text().strip()
    keyfile = root / "etc" / "NetworkManager" / "system-connections" / "eth0.nmconnection"
    keyfile.parent.mkdir(parents=True, exist_ok=True)
    keyfile.write_text(
        "[connection]\nid=eth0\ntype=ethernet\ninterface-name=eth0\n\n"
        f"[ethernet]\nmac-address={mac}\n\n"
        "[ipv4]\nmethod=manual\naddress1=10.10.0.11/24,10.10.0.1\ndns=10.10.0.2;\n\n[ipv6]\nmethod=ignore\n"
    )
    keyfile.chmod(0o600)


def halt_vms(sites: LocalSites) -> None:
    """Stop every VM's agent, keeping the VMs `on` for the next `lab up`."""
    for site in (sites.onprem, sites.cloud):
        for vm in site.list_vms():
            site.halt(vm.name)


def _protect(profile: Profile, machine: str) -> ppb.ProtectedMachine:
    """Protect the lab's VM to the cloud (group PG1) and wait for its initial sync."""
    stub = profile.protection()
    if LAB_GROUP not in [g.name for g in stub.ListProtectionGroups(ppb.ListProtectionGroupsRequest(), timeout=RPC_TIMEOUT).groups]:
        stub.CreateProtectionGroup(ppb.CreateProtectionGroupRequest(name=LAB_GROUP), timeout=RPC_TIMEOUT)
    known = {m.name: m for m in stub.ListProtectedMachines(ppb.ListProtectedMachinesRequest(), timeout=RPC_TIMEOUT).machines}
    if machine not in known:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while True:  # the VM's agent registers its machine a moment after it is healthy
            try:
                job = stub.ProtectMachine(
                    ppb.ProtectMachineRequest(machine=machine, group=LAB_GROUP, process_server=PS_ONPREM,
                                              master_target=MT_CLOUD),
                    timeout=RPC_TIMEOUT,
                )
                break
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                if error.code != "machine-not-found" or time.monotonic() > deadline:
                    raise error from exc
                time.sleep(0.2)
        wait_job(profile, job.id, SYNC_TIMEOUT)
    return stub.GetProtectedMachine(ppb.GetProtectedMachineRequest(machine=machine), timeout=RPC_TIMEOUT)


def wait_job(profile: Profile, job_id: str, timeout: float) -> admin_pb2.Job:
    """Until the job ends; PreconditionFailed with its error when it did not succeed."""
    stub = profile.admin()
    deadline = time.monotonic() + timeout
    job = None
    try:
        for update in stub.WatchJob(admin_pb2.GetJobRequest(id=job_id), timeout=timeout):
            job = update
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() < deadline:
            raise errors.from_rpc_error(exc) from exc
    if job is None or job.status != admin_pb2.JOB_STATUS_SUCCEEDED:
        detail = f"{job.error_code}: {job.error_message}" if job is not None else "no answer"
        raise errors.PreconditionFailed(
            f"job {job_id} ({job.kind if job else '?'}) did not succeed: {detail}",
            hint=f"`srctl jobs show {job_id}` shows every step",
            code="lab-job-failed",
        )
    return job


def _print_summary(
    lab_dir: Path, started: list[launcher.Launched], names: list[str], profile: Profile,
    sites: LocalSites, protected: ppb.ProtectedMachine | None,
) -> None:
    output.console.print(f"[bold green]Lab is up[/bold green] in {lab_dir}")
    for site in (sites.onprem, sites.cloud):
        for vm in site.list_vms():
            for disk, uri in vm.nbd_uris().items():
                output.console.print(f"VM {vm.name} ({site.role}) {disk}: write over NBD to [bold]{uri}[/bold]",
                                     highlight=False)
                output.console.print(f"  e.g. qemu-io -f raw -c 'write -P 0xab 0 1M' {uri}", highlight=False)
    if protected is not None:
        output.console.print(f"{protected.name} is {protected.state} (group {protected.group}); "
                             f"`srctl drill` runs the whole failover and failback cycle", highlight=False)
    rows = []
    for name, daemon in zip(names, started, strict=False):
        port = daemon.state.get("port", "-")
        rows.append([name, daemon.pid, f"127.0.0.1:{port}" if port != "-" else "-", metrics_url(daemon.state),
                     str(daemon.log_path)])
    output.print_table("Processes", ["COMPONENT", "PID", "ADDRESS", "METRICS", "LOG"], rows)
    output.console.print(f"srctl profile: {profile.path}")
    if profile.path != lab_profile(resolve_lab_dir()):  # srctl would not find it by itself
        output.console.print(f"  use it with: export SRCTL_CONFIG={profile.path}")
    output.console.print(
        f"Next: `srctl drill`, `srctl machine failback-status {LAB_VM}`, `srctl replication status`, "
        "`srctl lab status`, `srctl lab down`.",
        highlight=False,
    )


def metrics_url(state: dict) -> str:
    """Where a lab daemon serves Prometheus metrics (its state file's metrics_port)."""
    port = state.get("metrics_port")
    return f"http://127.0.0.1:{port}/metrics" if port else ""


@app.command("status")
def status(directory: DirOption = None, output_format: output.OutputOption = output.Format.table) -> None:
    """Show the lab's processes and their health."""
    lab_dir = lab_dir_of(directory)
    path = lab_dir / LAB_FILE
    if not path.exists():
        raise errors.NotFound(f"no lab in {lab_dir}", hint="start one with `srctl lab up`", code="lab-missing")
    daemons, extra = launcher.load(path)
    names = extra.get("names") or [d.name for d in daemons]
    servers: list[common_pb2.ServerInfo] = []
    try:
        profile = Profile.load(lab_profile(lab_dir))
        servers = list(profile.admin().ListServers(admin_pb2.ListServersRequest(), timeout=RPC_TIMEOUT).servers)
    except (errors.SiteRecoveryError, grpc.RpcError):
        pass
    daemon_rows, vm_rows = status_rows(lab_dir, daemons, names, servers)
    if output_format is not output.Format.table:
        output.emit(output_format, {"dir": str(lab_dir), "daemons": daemon_rows, "vms": vm_rows})
    else:
        output.print_table(f"Lab in {lab_dir}", ["COMPONENT", "PID", "RUNNING", "ADDRESS", "HEALTH", "METRICS", "LOG"],
                           [list(r.values()) for r in daemon_rows + vm_rows])
    if not all(r["running"] == "yes" for r in daemon_rows):
        raise typer.Exit(errors.Unavailable.exit_code)


def server_id_of(state_dir: Path, daemon: str, launched_state: dict | None = None) -> str:
    """The server id a lab daemon or a VM's agent enrolled as: `agent_id` of the state file it writes when
    ready (the configuration server's own row has a fixed id)."""
    if daemon == "config-server":
        return CONFIG_SERVER_ID
    state = read_state_file(state_dir, daemon) or launched_state or {}
    return str(state.get("agent_id", ""))


def status_rows(
    lab_dir: Path, daemons: list[launcher.Launched], names: list[str], servers: list[common_pb2.ServerInfo],
) -> tuple[list[dict], list[dict]]:
    """`lab status`'s rows (daemons, VMs), each with the health of its own server.

    A row is matched to its server by id, from the state file its process wrote,
    never by host name: every lab process runs on this one host, an on-premises
    VM and its failed-over copy in the cloud carry the same name, and an agent
    that enrolled again leaves its old row behind."""
    health = {s.id: output.enum_label(common_pb2.Health.Name(s.health), "HEALTH_") for s in servers}
    daemon_rows = []
    for name, d in zip(names, daemons, strict=False):
        alive = d.process() is not None
        port = d.state.get("port")
        daemon_rows.append({
            "component": name,
            "pid": d.pid,
            "running": "yes" if alive else "no",
            "address": f"127.0.0.1:{port}" if port is not None else "",
            "health": health.get(server_id_of(d.state_dir, d.name, d.state), "unknown") if alive else "stopped",
            "metrics": metrics_url(d.state),
            "log": str(d.log_path),
        })
    vm_rows = []
    sites = LocalSites(lab_dir / "sites")
    for site in (sites.onprem, sites.cloud):
        for vm in site.list_vms():
            uris = vm.nbd_uris()
            vm_rows.append({
                "component": f"vm {vm.name} ({site.role})",
                "pid": "",
                "running": "yes" if uris else "no",
                "address": ", ".join(uris.values()),
                "health": health.get(server_id_of(vm.agent_dir, AGENT), "unknown") if uris else vm.power,
                "metrics": "",
                "log": str(vm.directory / "agent.log"),
            })
    return daemon_rows, vm_rows


@app.command("down")
def down(
    directory: DirOption = None,
    purge: Annotated[bool, typer.Option(help="also delete the lab directory")] = False,
    output_format: output.OutputOption = output.Format.table,
) -> None:
    """Stop every process of the lab (SIGTERM, then SIGKILL after 15 s); VMs that were on return with `lab up`."""
    lab_dir = lab_dir_of(directory)
    path = lab_dir / LAB_FILE
    if not path.exists():
        raise errors.NotFound(f"no lab in {lab_dir}", hint="nothing to stop", code="lab-missing")
    daemons, _ = launcher.load(path)
    halt_vms(LocalSites(lab_dir / "sites"))
    left = [d.name for d in reversed(daemons) if not launcher.stop(d)]
    if left:
        raise errors.Internal(f"could not stop {', '.join(left)}", code="lab-stop-failed")
    path.unlink()
    if purge:
        shutil.rmtree(lab_dir)
    output.emit(output_format, {"dir": str(lab_dir), "stopped": [d.name for d in daemons], "removed": purge},
                lambda: output.console.print(f"Lab in {lab_dir} stopped" + (" and removed." if purge else ".")))
