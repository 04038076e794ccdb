"""`srctl lab`: a whole site on this host, on free loopback ports.

`lab up` starts a configuration server, a process server, a master target and a
source agent protecting a generated 256 MiB disk image, waits until every one
is enrolled and healthy, enables replication of the disk (nbd mode: the source
agent serves it as an NBD export and journals every write), waits for the
initial sync, and prints where everything is, the NBD address first. Everything lives
under one directory (default ~/.local/state/siterecovery/lab); `lab down` stops
every process it started, and `--purge` also removes the directory.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import grpc
import tomli_w
import typer

from siterecovery.common import daemon as daemon_state
from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import launcher
from siterecovery.controller.cli import output
from siterecovery.controller.cli.client import Profile, default_lab_dir, lab_profile

app = typer.Typer(help="A whole site on this host, for trying things out.", no_args_is_help=True)

DISK_BYTES = 256 * 1024**2
HEALTH_TIMEOUT = 60.0
SYNC_TIMEOUT = 300.0
# Shorter than production's 10 s so that orders (enable, pause, take a point)
# reach the lab's agents within a couple of seconds.
LAB_HEARTBEAT_SECONDS = 2.0
LAB_FILE = "lab.json"
AGENTS = ("process-server", "master-target", "source-agent")

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="where the lab lives (default ~/.local/state/siterecovery/lab)", envvar="SRCTL_LAB_DIR"),
]


def _lab_dir(directory: Path | None) -> Path:
    return (directory or default_lab_dir()).expanduser().resolve()


def _running(lab_dir: Path) -> list[launcher.Launched]:
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
    replicate: Annotated[bool, typer.Option("--replicate/--no-replicate", help="replicate the lab's disk")] = True,
) -> None:
    """Start a whole site on loopback and wait until it is healthy."""
    lab_dir = _lab_dir(directory)
    if _running(lab_dir):
        raise errors.Conflict(
            f"a lab already runs in {lab_dir}",
            hint="see `srctl lab status`, or stop it with `srctl lab down`",
            code="lab-running",
        )
    lab_dir.mkdir(parents=True, exist_ok=True)
    logs = lab_dir / "logs"
    started: list[launcher.Launched] = []
    lab_file = lab_dir / LAB_FILE
    try:
        cs_dir = lab_dir / "config-server"
        cs_config = _write_toml(
            lab_dir / "config" / "config-server.toml",
            {"state_dir": str(cs_dir), "listen": "127.0.0.1", "port": 0, "heartbeat_interval": heartbeat_interval},
        )
        started.append(
            launcher.launch("config-server", ["--config", str(cs_config)], state_dir=cs_dir, log_path=logs / "config-server.log")
        )
        launcher.save(lab_file, started)
        port = started[0].state["port"]
        profile = Profile.load(lab_profile(lab_dir))
        passphrase = profile.admin().GetPassphrase(admin_pb2.GetPassphraseRequest(), timeout=RPC_TIMEOUT).passphrase
        passphrase_file = lab_dir / "config" / "passphrase"
        passphrase_file.write_text(passphrase + "\n")
        os.chmod(passphrase_file, 0o600)
        disk = lab_dir / "disks" / "disk0.img"
        if not disk.exists():
            make_disk_image(disk)
        common = {"server": f"127.0.0.1:{port}", "passphrase_file": str(passphrase_file), "heartbeat_interval": heartbeat_interval}
        configs = {
            "process-server": {**common, "state_dir": str(lab_dir / "process-server"), "listen": "127.0.0.1", "port": 0, "advertise": "127.0.0.1"},
            "master-target": {**common, "state_dir": str(lab_dir / "master-target"), "listen": "127.0.0.1", "port": 0, "advertise": "127.0.0.1"},
            "source-agent": {**common, "state_dir": str(lab_dir / "source-agent"), "listen": "127.0.0.1", "port": 0, "advertise": "127.0.0.1", "nbd_port": 0, "disks": [{"path": str(disk), "name": "disk0"}]},
        }
        for name in AGENTS:
            config = _write_toml(lab_dir / "config" / f"{name}.toml", configs[name])
            started.append(
                launcher.launch(name, ["--config", str(config)], state_dir=Path(configs[name]["state_dir"]), log_path=logs / f"{name}.log")
            )
            launcher.save(lab_file, started)
        servers = _wait_healthy(profile, expected=len(AGENTS))
        pair = _replicate(profile) if replicate else None
    except (errors.SiteRecoveryError, grpc.RpcError) as exc:
        for daemon in reversed(started):
            launcher.stop(daemon)
        if isinstance(exc, grpc.RpcError):
            raise errors.from_rpc_error(exc) from exc
        raise
    _print_summary(lab_dir, started, servers, profile, pair)


def _replicate(profile: Profile) -> admin_pb2.PairView:
    """Enable replication of the lab's disk and wait for the initial sync."""
    stub = profile.admin()
    deadline = time.monotonic() + RPC_TIMEOUT
    # The source agent's machine is recorded when it registers, which may be a moment
    # after it is healthy: wait for it rather than assume it.
    while not (machines := stub.ListMachines(admin_pb2.ListMachinesRequest(), timeout=RPC_TIMEOUT).machines):
        if time.monotonic() > deadline:
            raise errors.Unavailable(
                "the lab's source agent registered no machine", hint="see the logs in the lab directory",
                code="lab-no-machine",
            )
        time.sleep(0.1)
    machine = machines[0]
    # A lab started again after `lab down` keeps its pair: it resumes where it stood.
    if not stub.ListPairs(admin_pb2.ListPairsRequest(machine=machine.id), timeout=RPC_TIMEOUT).pairs:
        stub.EnableReplication(
            admin_pb2.EnableReplicationRequest(machine=machine.id, disks=["disk0"], mode=rpb.REPLICATION_MODE_NBD),
            timeout=RPC_TIMEOUT,
        )
    deadline = time.monotonic() + SYNC_TIMEOUT
    while time.monotonic() < deadline:
        (pair,) = stub.ListPairs(admin_pb2.ListPairsRequest(machine=machine.id), timeout=RPC_TIMEOUT).pairs
        if pair.state == rpb.PAIR_STATE_REPLICATING:
            return pair
        if pair.state == rpb.PAIR_STATE_ERROR:
            raise errors.PreconditionFailed(
                f"the lab's replication failed: {pair.reason}",
                hint="see the logs in the lab's logs/ folder",
                code=pair.reason_code or "lab-replication",
            )
        time.sleep(0.2)
    raise errors.Unavailable(
        f"the lab's initial sync did not finish within {SYNC_TIMEOUT:.0f} s",
        hint="`srctl replication status` shows how far it got; the logs are in the lab's logs/ folder",
        code="lab-sync-timeout",
    )


def nbd_address(lab_dir: Path) -> str:
    """The NBD URI of the lab's disk, from the source agent's state file."""
    state = daemon_state.read_state_file(lab_dir / "source-agent", "source-agent") or {}
    return state.get("nbd", {}).get("disk0", "")


def _print_summary(
    lab_dir: Path, started: list[launcher.Launched], servers, profile: Profile, pair: admin_pb2.PairView | None
) -> None:
    output.console.print(f"[bold green]Lab is up[/bold green] in {lab_dir}")
    if pair is not None:
        uri = nbd_address(lab_dir)
        output.console.print(f"Write to the protected disk over NBD: [bold]{uri}[/bold]", highlight=False)
        output.console.print(
            f"  e.g. qemu-io -f raw -c 'write -P 0xab 0 1M' {uri}\n"
            f"       fio --name=w --ioengine=nbd --uri={uri} --rw=randwrite --bs=16k --size=64M",
            highlight=False,
        )
        output.console.print(
            f"Replicating disk0 (pair {pair.pair_id}) to the master target at {pair.target_path}", highlight=False
        )
    rows = []
    for daemon in started:
        port = daemon.state.get("port", "-")
        rows.append([daemon.name, daemon.pid, f"127.0.0.1:{port}" if port != "-" else "-", str(daemon.state_dir), str(daemon.log_path)])
    output.print_table("Processes", ["COMPONENT", "PID", "ADDRESS", "STATE DIR", "LOG"], rows)
    output.console.print(
        f"Disk image behind the export: {lab_dir / 'disks' / 'disk0.img'} "
        "(write through NBD: changes made to the file directly are not replicated)",
        highlight=False,
    )
    output.console.print(f"srctl profile: {profile.path}")
    if profile.path != lab_profile(default_lab_dir()):
        output.console.print(f"  use it with: export SRCTL_CONFIG={profile.path}")
    machine = pair.machine_hostname if pair is not None else "<machine>"
    output.console.print(
        f"Next: `srctl replication status`, `srctl recovery-points create {machine}`, "
        f"`srctl recovery-points list {machine}`, `srctl lab status`, `srctl lab down`.",
        highlight=False,
    )


@app.command("status")
def status(directory: DirOption = None, output_format: Annotated[output.Format, typer.Option("--output", "-o")] = output.Format.table) -> None:
    """Show the lab's processes and their health."""
    lab_dir = _lab_dir(directory)
    path = lab_dir / LAB_FILE
    if not path.exists():
        raise errors.NotFound(f"no lab in {lab_dir}", hint="start one with `srctl lab up`", code="lab-missing")
    daemons, _ = launcher.load(path)
    health: dict[str, str] = {}
    try:
        profile = Profile.load(lab_profile(lab_dir))
        for s in profile.admin().ListServers(admin_pb2.ListServersRequest(), timeout=RPC_TIMEOUT).servers:
            health[output.enum_label(common_pb2.Role.Name(s.role), "ROLE_")] = output.enum_label(common_pb2.Health.Name(s.health), "HEALTH_")
    except (errors.SiteRecoveryError, grpc.RpcError):
        pass
    role_of = {"config-server": "config-server", "process-server": "process-server", "master-target": "master-target", "source-agent": "source"}
    rows = []
    for d in daemons:
        alive = d.process() is not None
        port = d.state.get("port")
        rows.append({
            "component": d.name,
            "pid": d.pid,
            "running": "yes" if alive else "no",
            "address": f"127.0.0.1:{port}" if port is not None else "",
            "health": health.get(role_of[d.name], "unknown") if alive else "stopped",
            "log": str(d.log_path),
        })
    if output_format is output.Format.json:
        output.print_json({"dir": str(lab_dir), "daemons": rows})
    else:
        output.print_table(f"Lab in {lab_dir}", ["COMPONENT", "PID", "RUNNING", "ADDRESS", "HEALTH", "LOG"], [list(r.values()) for r in rows])
    if not all(r["running"] == "yes" for r in rows):
        raise typer.Exit(errors.Unavailable.exit_code)


@app.command("down")
def down(directory: DirOption = None, purge: Annotated[bool, typer.Option(help="also delete the lab directory")] = False) -> None:
    """Stop every process of the lab (SIGTERM, then SIGKILL after 15 s)."""
    lab_dir = _lab_dir(directory)
    path = lab_dir / LAB_FILE
    if not path.exists():
        raise errors.NotFound(f"no lab in {lab_dir}", hint="nothing to stop", code="lab-missing")
    daemons, _ = launcher.load(path)
    left = [d.name for d in reversed(daemons) if not launcher.stop(d)]
    if left:
        raise errors.Internal(f"could not stop {', '.join(left)}", code="lab-stop-failed")
    path.unlink()
    if purge:
        shutil.rmtree(lab_dir)
    output.console.print(f"Lab in {lab_dir} stopped" + (" and removed." if purge else "."))
