"""The `local` provider: a directory-backed site, for the lab on one host.

A site is a directory; each VM is `<root>/vms/<name>/` holding `vm.json` and
its disk image files:

    vm.json  {"name", "uuid", "power": "on"|"off", "network": "production"|"isolated",
              "disks": [{"name", "file", "size_bytes"}], "snapshots": [...],
              "created_by": "siterecovery"|"user"}

A running VM is its guest's I/O path: a source agent (the stand-in for the
mobility agent a real VM runs) serving the VM's disks over NBD, with the VM's
UUID as its machine UUID and the VM's name as its host name. Powering on
starts that agent (`<vm>/agent/`, enrolled once with the passphrase the
configuration server writes there, 0600, like cloud-init custom data); powering
off stops it with SIGTERM, which lets it hand every acknowledged write to its
journal first. Everything here is idempotent: a step that runs twice finds the
VM as the first run left it.

The same class is the on-premises site (`<dir>/onprem`, the master target's
datastore for failback) and the cloud (`<dir>/cloud`, where failover creates
VMs from recovery points). It is the provider the workflows drive in the lab;
vSphere and Azure implement the same operations against real APIs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from siterecovery.common import errors
from siterecovery.common.daemon import fsync_dir, read_state_file, write_json_atomically
from siterecovery.common.logging import get_logger
from siterecovery.controller import launcher

log = get_logger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
AGENT = "source-agent"


@dataclass(frozen=True)
class LocalDisk:
    name: str
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class LocalVm:
    name: str
    uuid: str
    power: str
    network: str
    disks: tuple[LocalDisk, ...]
    directory: Path
    snapshots: tuple[str, ...] = ()
    created_by: str = "user"

    @property
    def agent_dir(self) -> Path:
        return self.directory / "agent"

    @property
    def guest_root(self) -> Path:
        """The guest's file system as far as its agent looks (network configuration, NICs in sys/class/net)."""
        return self.directory / "root"

    def nbd_uris(self) -> dict[str, str]:
        """Disk name -> NBD URI of the running VM's disks (empty when it is off)."""
        if self.power != "on":
            return {}
        return dict((read_state_file(self.agent_dir, AGENT) or {}).get("nbd", {}))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "power": self.power,
            "network": self.network,
            "disks": [{"name": d.name, "file": d.path.name, "size_bytes": d.size_bytes} for d in self.disks],
            "snapshots": list(self.snapshots),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class AgentLaunch:
    """What a VM's agent needs to reach the configuration server."""

    server: str
    passphrase: str
    heartbeat_interval: float
    log_level: str = "info"
    extra: dict = field(default_factory=dict)


def check_vm_name(name: str) -> str:
    if not _NAME.match(name):
        raise errors.InvalidInput(
            f"{name!r} cannot name a VM",
            hint="use letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit",
            code="vm-name-invalid",
        )
    return name


class LocalSite:
    """One directory-backed site. See the module docstring."""

    def __init__(self, root: Path, *, role: str) -> None:
        self.root = root
        self.role = role  # "onprem" or "cloud": only for messages

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, name: str) -> Path:
        return self.vms_dir / check_vm_name(name)

    # --- reading ---

    def get_vm(self, name: str) -> LocalVm | None:
        path = self.vm_dir(name) / "vm.json"
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise errors.Integrity(f"{path} cannot be read: {exc}", code="local-vm-damaged") from exc
        directory = path.parent
        return LocalVm(
            name=data["name"],
            uuid=data["uuid"],
            power=data.get("power", "off"),
            network=data.get("network", "production"),
            disks=tuple(
                LocalDisk(d["name"], directory / d["file"], int(d["size_bytes"])) for d in data.get("disks", [])
            ),
            directory=directory,
            snapshots=tuple(data.get("snapshots", [])),
            created_by=data.get("created_by", "user"),
        )

    def list_vms(self) -> list[LocalVm]:
        if not self.vms_dir.is_dir():
            return []
        found = [self.get_vm(p.name) for p in sorted(self.vms_dir.iterdir()) if (p / "vm.json").exists()]
        return [vm for vm in found if vm is not None]

    def find_vm_by_uuid(self, vm_uuid: str) -> LocalVm | None:
        for vm in self.list_vms():
            if vm.uuid == vm_uuid:
                return vm
        return None

    # --- changing ---

    def define_vm(
        self,
        name: str,
        disks: dict[str, Path],
        *,
        network: str = "production",
        created_by: str = "siterecovery",
        vm_uuid: str = "",
    ) -> LocalVm:
        """Record a VM over disk files already in its directory; the existing VM when it is there."""
        existing = self.get_vm(name)
        if existing is not None:
            return existing
        directory = self.vm_dir(name)
        listed = []
        for disk_name, path in disks.items():
            if path.parent.resolve() != directory.resolve() or not path.is_file():
                raise errors.InvalidInput(f"disk {path} of VM {name} is not a file in {directory}", code="local-vm-disk")
            listed.append(LocalDisk(disk_name, path, path.stat().st_size))
        vm = LocalVm(
            name=name,
            uuid=vm_uuid or str(uuid.uuid4()),
            power="off",
            network=network,
            disks=tuple(listed),
            directory=directory,
            created_by=created_by,
        )
        nic = vm.guest_root / "sys" / "class" / "net" / "eth0" / "address"
        if not nic.exists():  # a new VM gets a NIC of its own (a locally administered MAC)
            nic.parent.mkdir(parents=True, exist_ok=True)
            nic.write_text("52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3)) + "\n")
        self._save(vm)
        log.info("local VM defined", site=self.role, vm=name, disks=list(disks))
        return vm

    def power_on(self, name: str, launch: AgentLaunch) -> LocalVm:
        """Start the VM's agent (no-op when it runs); the VM is `on` once the agent is ready."""
        vm = self._require(name)
        running = self._agent(vm)
        if running is None:
            config = self._agent_config(vm, launch)
            launched = launcher.launch(
                AGENT,
                ["--config", str(config)],
                state_dir=vm.agent_dir,
                log_path=vm.directory / "agent.log",
            )
            write_json_atomically(vm.agent_dir / "launched.json", launched.to_json())
            log.info("local VM powered on", site=self.role, vm=name, pid=launched.pid)
        if vm.power != "on":
            vm = self._replace(vm, power="on")
        return vm

    def power_off(self, name: str) -> LocalVm | None:
        """Stop the VM's agent (SIGTERM: it journals every acknowledged write first); no-op when off."""
        vm = self.get_vm(name)
        if vm is None:
            return None
        running = self._agent(vm)
        if running is not None and not launcher.stop(running):
            raise errors.Unavailable(f"the agent of VM {name} did not stop", code="local-vm-stuck")
        if running is not None:
            log.info("local VM powered off", site=self.role, vm=name)
        return self._replace(vm, power="off") if vm.power != "off" else vm

    def is_running(self, name: str) -> bool:
        """Whether the VM's agent runs (which is what `on` means), whatever vm.json says."""
        vm = self.get_vm(name)
        return vm is not None and self._agent(vm) is not None

    def halt(self, name: str) -> None:
        """Stop the VM's agent but keep it `on`: the host went down (`srctl lab down`); power_on resumes it."""
        vm = self._require(name)
        running = self._agent(vm)
        if running is not None and not launcher.stop(running):
            raise errors.Unavailable(f"the agent of VM {name} did not stop", code="local-vm-stuck")

    def discard_replication_state(self, name: str) -> None:
        """Forget what the VM's agent journaled for its old pairs (the VM must be off).

        Failback rewrites the VM's disks from the cloud: journals of the pairs
        that replicated them before describe writes that are no longer the
        disk's, and must not be replayed onto it when the agent starts again.
        """
        vm = self._require(name)
        if self._agent(vm) is not None:
            raise errors.PreconditionFailed(f"VM {name} is running", hint="power it off first", code="vm-running")
        shutil.rmtree(vm.agent_dir / "pairs", ignore_errors=True)

    def delete_vm(self, name: str) -> bool:
        """Power off and remove the VM and its disks; False when there was none."""
        vm = self.get_vm(name)
        if vm is None:
            return False
        self.power_off(name)
        shutil.rmtree(vm.directory)
        fsync_dir(self.vms_dir)
        log.info("local VM deleted", site=self.role, vm=name)
        return True

    # --- helpers ---

    def _require(self, name: str) -> LocalVm:
        vm = self.get_vm(name)
        if vm is None:
            raise errors.NotFound(
                f"the {self.role} site has no VM {name}", hint=f"its VMs are in {self.vms_dir}", code="vm-not-found"
            )
        return vm

    def _agent(self, vm: LocalVm) -> launcher.Launched | None:
        """The VM's running agent: as launched.json records it, or (when whoever started it died
        before writing that) as its own state file says, if that process runs its config."""
        path = vm.agent_dir / "launched.json"
        try:
            launched = launcher.Launched.from_json(json.loads(path.read_text("utf-8")))
            if launched.process() is not None:
                return launched
        except (FileNotFoundError, ValueError):
            pass
        pid = (read_state_file(vm.agent_dir, AGENT) or {}).get("pid")
        try:
            proc = psutil.Process(int(pid)) if pid else None
            if proc is None or str(vm.agent_dir / "source-agent.toml") not in proc.cmdline():
                return None
            adopted = launcher.Launched(AGENT, proc.pid, proc.create_time(), vm.agent_dir, vm.directory / "agent.log")
        except (psutil.Error, ValueError):
            return None
        write_json_atomically(path, adopted.to_json())
        return adopted

    def _agent_config(self, vm: LocalVm, launch: AgentLaunch) -> Path:
        vm.agent_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        passphrase = vm.agent_dir / "passphrase"
        fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(launch.passphrase + "\n")
        config = {
            "server": launch.server,
            "passphrase_file": str(passphrase),
            "state_dir": str(vm.agent_dir),
            "heartbeat_interval": launch.heartbeat_interval,
            "log_level": launch.log_level,
            "listen": "127.0.0.1",
            "port": 0,
            "advertise": "127.0.0.1",
            "nbd_port": 0,
            "hostname": vm.name,
            "machine_uuid": vm.uuid,
            "network_root": str(vm.guest_root),
            "disks": [{"path": str(d.path), "name": d.name} for d in vm.disks],
            **launch.extra,
        }
        path = vm.agent_dir / "source-agent.toml"
        path.write_text(tomli_w.dumps(config), "utf-8")
        return path

    def _replace(self, vm: LocalVm, **changes: object) -> LocalVm:
        from dataclasses import replace

        updated = replace(vm, **changes)
        self._save(updated)
        return updated

    def _save(self, vm: LocalVm) -> None:
        vm.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically(vm.directory / "vm.json", vm.to_json())
