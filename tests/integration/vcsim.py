"""Run the vSphere simulator (vcsim, built into .tools/ by deploy/build-vcsim.sh) for tests.

`running_vcsim(mode, workdir)` starts it on a free loopback port (it binds
port 0 and prints its URL), yields a `Vcsim`, and stops it by closing its
stdin. Its datastores are directories under `workdir`. When the binary is
missing the test is skipped, except in CI (CI=true), where that fails it.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from siterecovery.controller.providers.vsphere.session import Endpoint, Session, Trust

REPO = Path(__file__).resolve().parents[2]
VCSIM = REPO / ".tools" / "vcsim"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Vcsim:
    mode: str
    host: str
    port: int
    cert_file: str
    thumbprint: str
    workdir: Path

    def endpoint(self, username: str = "admin", password: str = "secret", **trust: object) -> Endpoint:
        chosen = Trust(**trust) if trust else Trust(ca_file=self.cert_file)
        return Endpoint(host=self.host, port=self.port, username=username, password=password, trust=chosen)

    def session(self, username: str = "admin", password: str = "secret") -> Session:
        return Session(self.endpoint(username, password)).open()


def require_vcsim() -> None:
    if VCSIM.exists():
        return
    message = f"needs {VCSIM.relative_to(REPO)} (bash deploy/install.sh builds it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextmanager
def running_vcsim(
    mode: str, workdir: Path, *, username: str = "", password: str = "", edition: str = ""
) -> Iterator[Vcsim]:
    require_vcsim()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(workdir)}
    env.pop("VCSIM_USERNAME", None)
    if username:
        env.update(VCSIM_USERNAME=username, VCSIM_PASSWORD=password)
    args = [str(VCSIM), "-mode", mode]
    if edition:
        args += ["-edition", edition]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        line = _first_line(proc)
        info = json.loads(line)
        url = urlparse(info["url"])
        yield Vcsim(
            mode=mode,
            host=url.hostname or "127.0.0.1",
            port=url.port or 443,
            cert_file=info["cert_file"],
            thumbprint=info["thumbprint"],
            workdir=workdir,
        )
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _first_line(proc: subprocess.Popen[str]) -> str:
    """vcsim's first stdout line (its address), waiting on the pipe, not on a timer."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if line:
                    return line
                break
    err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
    raise RuntimeError(f"vcsim did not report its address (exit {proc.poll()}): {err[-2000:]}")
