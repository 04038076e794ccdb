"""Start a daemon as a detached process and wait until it reports readiness.

The lab and the integration tests both start daemons through `launch`, so the
tests exercise exactly what a user runs. Readiness arrives over the systemd
notify protocol on a private abstract socket: no polling of log files, no
sleeps. If the process dies first, the error carries the end of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from siterecovery.common import errors
from siterecovery.common.daemon import read_state_file

MODULES = {
    "config-server": "siterecovery.controller.daemon",
    "process-server": "siterecovery.agents.process_server.daemon",
    "master-target": "siterecovery.agents.master_target.daemon",
    "source-agent": "siterecovery.agents.source.daemon",
}


@dataclass
class Launched:
    name: str
    pid: int
    create_time: float
    state_dir: Path
    log_path: Path
    state: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "pid": self.pid,
            "create_time": self.create_time,
            "state_dir": str(self.state_dir),
            "log_path": str(self.log_path),
            "state": self.state,
        }

    @classmethod
    def from_json(cls, data: dict) -> Launched:
        return cls(
            name=data["name"],
            pid=data["pid"],
            create_time=data["create_time"],
            state_dir=Path(data["state_dir"]),
            log_path=Path(data["log_path"]),
            state=data.get("state", {}),
        )

    def process(self) -> psutil.Process | None:
        """The process, if it still runs and is the one we started (not a reused pid)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.Error:
            pass
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def launch(
    daemon: str,
    args: list[str],
    *,
    state_dir: Path,
    log_path: Path,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Launched:
    """Start `daemon` with `args`; return once it is ready (or raise with its log)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    address = f"\0siterecovery-{daemon}-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        environment = {**os.environ, **(env or {}), "NOTIFY_SOCKET": "@" + address[1:]}
        environment.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", MODULES[daemon], *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        notify.settimeout(0.1)
        while True:
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                message = ""
            if "READY=1" in message.split("\n"):
                break
            code = proc.poll()
            if code is not None:
                raise errors.Unavailable(
                    f"{daemon} exited with code {code} before it was ready:\n{tail(log_path)}",
                    hint=f"its whole log is {log_path}",
                    code="daemon-failed",
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise errors.Unavailable(
                    f"{daemon} was not ready after {timeout:.0f} s:\n{tail(log_path)}",
                    hint=f"its whole log is {log_path}",
                    code="daemon-timeout",
                )
    # Reap it when it ends, so a long-lived launcher (the configuration server
    # powering local VMs on) does not collect zombies.
    threading.Thread(target=proc.wait, name=f"reap-{daemon}-{proc.pid}", daemon=True).start()
    state = read_state_file(state_dir, daemon) or {}
    return Launched(
        name=daemon,
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        state_dir=state_dir,
        log_path=log_path,
        state=state,
    )


def stop(launched: Launched, *, grace: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL after `grace`; True when the process is gone.

    "Gone" includes a zombie: a process started by another parent (the
    configuration server starts local VMs' agents) is reaped by that parent.
    """
    proc = launched.process()
    if proc is None:
        return True
    proc.send_signal(signal.SIGTERM)
    if _ended(launched, grace):
        return True
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    return _ended(launched, 5.0)


def _ended(launched: Launched, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while launched.process() is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill9(launched: Launched) -> None:
    proc = launched.process()
    if proc is not None:
        proc.kill()
        proc.wait(5)


def save(path: Path, launched: list[Launched], **extra: object) -> None:
    from siterecovery.common.daemon import write_json_atomically

    write_json_atomically(path, {"daemons": [d.to_json() for d in launched], **extra})


def load(path: Path) -> tuple[list[Launched], dict]:
    data = json.loads(path.read_text())
    return [Launched.from_json(d) for d in data.pop("daemons", [])], data
