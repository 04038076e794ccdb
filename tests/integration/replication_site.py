"""A replicating site for the data-path tests: real daemons, real NBD clients.

`ReplicatingSite` extends the integration `Site` with one source agent that
protects a disk image, a process server and a master target, and helpers to
write through the source agent's NBD export with qemu-io, fio and nbdcopy, to
take recovery points, and to kill -9 and restart any daemon.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from siterecovery.common import daemon as daemon_state
from siterecovery.controller import launcher
from tests.tcp_proxy import TcpProxy

from .conftest import Site, wait_for

MiB = 1024 * 1024
SYNC_TIMEOUT = 180.0
SOURCE = "source-agent"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def make_image(path: Path, size: int, *, data_bytes: int, seed: int, extent: int = MiB) -> None:
    """A sparse image of `size` with `data_bytes` of random data in `extent`-sized pieces."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    slots = rng.sample(range(size // extent), data_bytes // extent)
    with open(path, "wb") as image:
        image.truncate(size)
        for slot in sorted(slots):
            image.seek(slot * extent)
            image.write(rng.randbytes(extent))
        image.flush()
        os.fsync(image.fileno())


def _daemon_of(name: str) -> str:
    """Agents here are named after their daemon, except the source agents (any name)."""
    return name if name in ("process-server", "master-target") else "source-agent"


def faketime_library() -> str:
    """libfaketime from Debian's faketime package, wherever the architecture puts it."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing (bash deploy/install.sh installs Debian's faketime)"
    return str(found[0])


class ReplicatingSite(Site):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.agents: dict[str, launcher.Launched] = {}
        self.configs: dict[str, Path] = {}
        self.disk = root / "disks" / "disk0.img"
        self.proxy: TcpProxy | None = None

    def start(
        self, *, disk_size: int, data_bytes: int, seed: int = 1, source_extra: dict | None = None,
        sources: tuple[str, ...] = (SOURCE,), ps_extra: dict | None = None, mt_proxy: bool = False,
        faked_clocks: tuple[str, ...] = (), mt_extra: dict | None = None, master_target: bool = True,
        cs_extra: dict | None = None,
    ) -> None:
        """The configuration server, a process server, a master target (unless not
        `master_target`: forward protection to Azure needs none), and one source
        agent per name in `sources`, each protecting its own image (`disk_of(name)`)."""
        self.start_config_server(**(cs_extra or {}))
        for name in faked_clocks:
            self.step_clock(name, "+0")
        passphrase = self.passphrase_file()
        extras: dict[str, dict[str, Any]] = {"process-server": dict(ps_extra or {})}
        if master_target:
            extras["master-target"] = dict(mt_extra or {})
        if mt_proxy:  # the process server reaches the master target through a proxy we control
            self.proxy = TcpProxy()
            extras["master-target"].update(advertise="127.0.0.1", advertise_port=self.proxy.port)
        for number, name in enumerate(sources):
            disk = self.disk_of(name)
            make_image(disk, disk_size, data_bytes=data_bytes, seed=seed + number)
            # Its live metrics tell `wait_caught_up` what the source has produced (heartbeats lag).
            extras[name] = {"disks": [{"path": str(disk), "name": "disk0"}], "nbd_port": 0,
                            "metrics_listen": "127.0.0.1:0", **(source_extra or {})}
        for name, extra in extras.items():
            config, _state_dir = self.agent_config(_daemon_of(name), name, passphrase_file=passphrase, **extra)
            self.configs[name] = config
            self.agents[name] = self._launch(name)
            if name == "master-target" and self.proxy is not None:
                self.proxy.target = ("127.0.0.1", self.agents[name].state["port"])
        expected = len(extras)
        wait_for(
            lambda: len(self.servers()) == expected and all(s["health"] == "healthy" for s in self.servers()),
            what="healthy agents",
        )

    # -- clocks ----------------------------------------------------------------------
    def clock_file(self, name: str) -> Path:
        return self.root / "clocks" / name

    def step_clock(self, name: str, offset: str) -> None:
        """Step `name`'s wall clock to `offset` from the real one ("+2d", "-2m", "+0").

        The daemon runs under libfaketime (Debian's faketime), which re-reads this
        file on every call; monotonic clocks are left alone, as a real step does."""
        path = self.clock_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(offset + "\n")

    def _clock_env(self, name: str) -> dict[str, str] | None:
        if not self.clock_file(name).exists():
            return None
        return {
            "LD_PRELOAD": faketime_library(),
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file(name)),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def stop_all(self) -> None:
        super().stop_all()
        if self.proxy is not None:
            self.proxy.close()

    def disk_of(self, source: str) -> Path:
        return self.disk if source == SOURCE else self.root / "disks" / source / "disk0.img"

    def _launch(self, name: str) -> launcher.Launched:
        launched = launcher.launch(
            _daemon_of(name), ["--config", str(self.configs[name])], state_dir=self.root / name,
            log_path=self.root / "logs" / f"{name}.log", env=self._clock_env(name),
        )
        self.daemons.append(launched)
        return launched

    @property
    def machine(self) -> str:
        return self.machine_of(SOURCE)

    def machine_of(self, source: str) -> str:
        return self.agents[source].state["agent_id"]

    def nbd_uri(self, source: str = SOURCE) -> str:
        state = daemon_state.read_state_file(self.root / source, "source-agent") or {}
        return state["nbd"]["disk0"]

    # -- replication ------------------------------------------------------------
    def add_azure_site(self, name: str, *, storage_account: str, container: str) -> dict:
        """An Azure site in the configuration server (placeholder ids: nothing here calls Azure Compute)."""
        secret = self.root / "azure-sp-secret"
        secret.write_text("not-used-by-these-tests\n")
        os.chmod(secret, 0o600)
        return self.srctl_json(
            "azure", "add", name, "--subscription", "11111111-2222-3333-4444-555555555555",
            "--tenant", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "--client-id", "99999999-8888-7777-6666-555555555555",
            "--secret-file", str(secret), "--resource-group", "rg-dr", "--region", "westeurope",
            "--vnet", "vnet-dr", "--subnet", "default", "--storage-account", storage_account,
            "--container", container,
        )

    def enable(self, *extra: str, source: str = SOURCE) -> dict:
        (pair,) = self.srctl_json("replication", "enable", self.machine_of(source), "--disk", "disk0", *extra)
        return pair

    def pair(self, source: str = SOURCE) -> dict:
        (pair,) = self.srctl_json("replication", "status", self.machine_of(source))
        return pair

    def wait_replicating(self, timeout: float = SYNC_TIMEOUT, *, source: str = SOURCE) -> dict:
        def replicating():
            pair = self.pair(source)
            assert pair["state"] != "error", pair
            return pair if pair["state"] == "replicating" else None

        return wait_for(replicating, timeout=timeout, what="initial sync")

    def source_last_seq(self, source: str = SOURCE) -> int:
        """The highest seq the source agent has produced, read from it now (its metrics page;
        0 when it does not answer). A write acknowledged before this call has a seq at or below it."""
        state = daemon_state.read_state_file(self.root / source, "source-agent") or {}
        port = state.get("metrics_port")
        if not port:
            return 0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                text = page.read().decode()
        except OSError:
            return 0
        seqs = re.findall(r"^siterecovery_pair_last_seq\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
        return max((int(float(seq)) for seq in seqs), default=0)

    def wait_caught_up(self, timeout: float = 60.0, *, source: str = SOURCE) -> dict:
        """Until the master target applied everything the source produced before this call (the
        source's own count, not only its last heartbeat, which may predate the latest writes)."""
        produced = self.source_last_seq(source)

        def caught_up():
            pair = self.pair(source)
            done = (
                pair["state"] == "replicating"
                and int(pair.get("applied_seq", 0)) >= max(int(pair.get("source_seq", 0)), produced) > 0
                and pair.get("rpo_seconds") == 0
            )
            return pair if done else None

        return wait_for(caught_up, timeout=timeout, what="the target to catch up")

    def create_point(self, kind: str = "crash-consistent", *, source: str = SOURCE) -> str:
        (view,) = self.srctl_json("recovery-points", "create", self.machine_of(source), "--kind", kind)
        return view["point"]["tag_id"]

    def create_group_point(self, group: str) -> list[dict]:
        """One multi-VM-consistent point across the group; its views, one per pair."""
        return self.srctl_json("recovery-points", "create", "--group", group)

    def points(self, source: str = SOURCE) -> list[dict]:
        return self.srctl_json("recovery-points", "list", self.machine_of(source))

    def materialize(self, point: str, *, source: str = SOURCE) -> dict:
        return self.srctl_json("recovery-points", "materialize", self.machine_of(source), "--point", point)["result"]

    # -- writing through NBD ---------------------------------------------------------
    def qemu_io(self, *commands: str, target: str | None = None) -> None:
        """qemu-io through the NBD export, or straight at `target` (a file nothing fronts)."""
        args = ["qemu-io", "-f", "raw"]
        for command in commands:
            args += ["-c", command]
        result = subprocess.run([*args, target or self.nbd_uri()], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "error" not in result.stdout.lower(), result.stdout + result.stderr

    def fio(
        self, *, size: str, bs: str = "16k", seed: int = 1, rw: str = "randwrite", extra: tuple[str, ...] = (),
        target: Path | None = None,
    ) -> None:
        """fio's nbd engine through the export, or its psync engine straight at `target`."""
        engine = ["--ioengine=nbd", f"--uri={self.nbd_uri()}"] if target is None else [
            "--ioengine=psync", f"--filename={target}", "--direct=0",
        ]
        result = subprocess.run(
            [
                "fio", "--name=w", *engine, f"--rw={rw}", f"--bs={bs}",
                f"--size={size}", f"--randseed={seed}", "--refill_buffers", "--iodepth=4", *extra,
            ],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def nbdcopy(self, source: Path) -> None:
        result = subprocess.run(["nbdcopy", str(source), self.nbd_uri()], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

    # -- faults ----------------------------------------------------------------------
    def kill9(self, name: str) -> None:
        launched = self.agents[name]
        proc = launched.process()
        assert proc is not None, f"{name} is not running"
        os.kill(launched.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self, name: str) -> launcher.Launched:
        self.agents[name] = self._launch(name)
        return self.agents[name]
