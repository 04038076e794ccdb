"""Real daemons as subprocesses on port 0, started the way the lab starts them.

`Site` starts a configuration server and agents through controller/launcher.py
(readiness over the notify socket, no sleeps), runs srctl as a process of its
own per call (forked from a helper that has imported it already:
tests/srctl_forkserver.py), and stops everything it started when the test ends.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w

from siterecovery.common.pb import admin_pb2_grpc
from siterecovery.controller import launcher
from siterecovery.controller.cli.client import Profile
from tests.srctl_forkserver import SrctlForkServer

HEARTBEAT = 0.3
SRCTL_COLUMNS = "200"  # wide enough that no table row or message is wrapped
_srctl_server: SrctlForkServer | None = None


def srctl_server() -> SrctlForkServer:
    """The fork server srctl runs from, started at the first call (one per test process)."""
    global _srctl_server
    if _srctl_server is None:
        log_dir = Path(tempfile.mkdtemp(prefix="sr-srctl-"))
        env = {**os.environ, "COLUMNS": SRCTL_COLUMNS}
        env.pop("SRCTL_CONFIG", None)
        _srctl_server = SrctlForkServer(log_dir / "forkserver.log", env)
        atexit.register(_srctl_server.close)
        atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
    return _srctl_server


def wait_for(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`.

    Between polls it waits 50 ms, or as long as the last poll took if that was longer:
    a condition that runs srctl then keeps at most half a core busy, and the daemons
    under test (on a 2-core CI machine) get the rest."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        result = condition()
        if result:
            return result
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(max(0.05, now - started))


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[launcher.Launched] = []
        self.cs: launcher.Launched | None = None
        self.cs_port = 0
        self._admin: admin_pb2_grpc.AdminStub | None = None
        self._admin_channel: grpc.Channel | None = None

    # -- configuration server ------------------------------------------------
    @property
    def cs_dir(self) -> Path:
        return self.root / "config-server"

    @property
    def profile(self) -> Path:
        return self.cs_dir / "admin" / "srctl.toml"

    def start_config_server(self, *, port: int = 0, **extra: Any) -> launcher.Launched:
        self._close_admin()  # a new server may listen elsewhere
        config = self._write("config-server.toml", {
            "state_dir": str(self.cs_dir), "listen": "127.0.0.1", "port": port,
            "heartbeat_interval": HEARTBEAT, **extra,
        })
        self.cs = launcher.launch("config-server", ["--config", str(config)], state_dir=self.cs_dir, log_path=self.root / "logs" / "config-server.log")
        self.daemons.append(self.cs)
        self.cs_port = self.cs.state["port"]
        return self.cs

    def passphrase(self) -> str:
        return self.srctl_json("passphrase", "show")["passphrase"]

    def passphrase_file(self, text: str | None = None) -> Path:
        path = self.root / "passphrase"
        path.write_text((text if text is not None else self.passphrase()) + "\n")
        os.chmod(path, 0o600)
        return path

    # -- agents ---------------------------------------------------------------
    def agent_config(self, daemon: str, name: str, *, passphrase_file: Path | None = None, **extra: Any) -> tuple[Path, Path]:
        state_dir = self.root / name
        data: dict[str, Any] = {
            "state_dir": str(state_dir),
            "server": f"127.0.0.1:{self.cs_port}",
            "passphrase_file": str(passphrase_file or self.passphrase_file()),
            "heartbeat_interval": HEARTBEAT,
        }
        data.update(listen="127.0.0.1", port=0, advertise="127.0.0.1")
        if daemon == "source-agent" and "disks" not in extra:
            disk = self.root / f"{name}-disk0.img"
            with open(disk, "wb") as image:
                image.truncate(8 * 1024 * 1024)
            data["disks"] = [{"path": str(disk), "name": "disk0"}]
        if daemon == "source-agent":
            data["nbd_port"] = 0
            # The network identity is read under an empty directory, not this host's /etc.
            data["network_root"] = str(self.root / f"{name}-network-root")
        data.update(extra)
        return self._write(f"{name}.toml", data), state_dir

    def start_agent(self, daemon: str, name: str | None = None, **extra: Any) -> launcher.Launched:
        name = name or daemon
        config, state_dir = self.agent_config(daemon, name, **extra)
        launched = launcher.launch(daemon, ["--config", str(config)], state_dir=state_dir, log_path=self.root / "logs" / f"{name}.log")
        self.daemons.append(launched)
        return launched

    def run_agent(self, daemon: str, name: str, **extra: Any) -> subprocess.CompletedProcess:
        """Run an agent in the foreground, for failures that must end it."""
        config, _ = self.agent_config(daemon, name, **extra)
        return subprocess.run(
            [sys.executable, "-m", launcher.MODULES[daemon], "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )

    # -- srctl ----------------------------------------------------------------
    def srctl(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
        """`srctl ARGS` as a process of its own, with this site's profile and a HOME of its own."""
        env = {**os.environ, "COLUMNS": SRCTL_COLUMNS, "HOME": str(self.root / "home")}
        env.pop("SRCTL_CONFIG", None)
        options: list[str] = []
        if config is not None or self.cs is not None:
            options += ["--config", str(config or self.profile)]
        return srctl_server().run([*options, *args], env=env, cwd=Path.cwd(), output_dir=self.root / "srctl", timeout=60)

    def srctl_json(self, *args: str) -> Any:
        result = self.srctl(*args, "--output", "json")
        for _ in range(2):
            # Exit 6 is "cannot reach the server": on a loaded 2-core CI machine a
            # handshake can miss its deadline once; a server that is down fails thrice.
            # (The message says "cannot reach the configuration server"; the text once matched here
            # did not, so no call was ever retried: exit 6 alone is the test now.)
            if result.returncode != 6:
                break
            result = self.srctl(*args, "--output", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def admin(self) -> admin_pb2_grpc.AdminStub:
        """The Admin API on one channel kept for this site, for tests that poll it directly:
        a new channel per poll costs the server a TLS handshake each time, and on a busy
        2-core machine a handshake can miss a short deadline."""
        if self._admin is None:
            self._admin_channel = Profile.load(self.profile).channel()
            self._admin = admin_pb2_grpc.AdminStub(self._admin_channel)
        return self._admin

    def servers(self) -> list[dict]:
        """The agents' rows of `srctl servers list` (the configuration server's own row left out)."""
        return [s for s in self.srctl_json("servers", "list") if s["role"] != "config-server"]

    def _close_admin(self) -> None:
        if self._admin_channel is not None:
            self._admin_channel.close()
        self._admin = self._admin_channel = None

    def stop_all(self) -> None:
        self._close_admin()
        for daemon in reversed(self.daemons):
            launcher.stop(daemon, grace=10)

    def _write(self, name: str, data: dict) -> Path:
        path = self.root / "config" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(data))
        return path


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


# --- the sites most tests start (imported late: those modules import this one) ---------


@pytest.fixture(scope="module")
def azurite() -> Iterator[Any]:
    """A real Azurite (blob service) for the tests of one module; skipped, or failed in CI, without it."""
    from tests.azurite import skip_or_fail_without_azurite, start_azurite

    skip_or_fail_without_azurite()
    with start_azurite() as server:
        yield server


@pytest.fixture
def rsite(tmp_path: Path) -> Iterator[Any]:
    """A ReplicatingSite (replication_site.py), stopped when the test ends."""
    from .replication_site import ReplicatingSite

    site = ReplicatingSite(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[Any]:
    """A FailbackSite (failback_site.py) with app01 protected in PG1, stopped when the test ends."""
    from .failback_site import FailbackSite

    site = FailbackSite(tmp_path)
    try:
        site.start()
        site.protect()
        yield site
    finally:
        site.stop_all()
