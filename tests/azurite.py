"""Azurite (the Azure Storage emulator) as a real daemon for tests.

deploy/install.sh installs Azurite with npm into deploy/azurite/node_modules
(the version pinned in deploy/azurite/package.json). `start_azurite()` runs
`azurite-blob --loose --skipApiVersionCheck` on port 0 with in-memory storage
and telemetry off, reads the port it bound from its start-up line (readiness
is that line, waited for with a deadline, never a sleep), and stops it when
the context ends. When Azurite is not installed, `azurite_unavailable()` skips
the test, except in CI, where it fails it: there a missing Azurite is a broken
install, not a reason to test less.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = ROOT / "deploy" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's documented development account; a public constant, not a secret.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"listens on (http://[0-9.]+:(\d+))")
# At load 20-40 on two cores Azurite once took longer than 30 s to listen.
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class Azurite:
    port: int
    workdir: Path

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def credential(self) -> dict[str, str]:
        return {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}


def azurite_unavailable() -> str | None:
    """Why Azurite cannot run here, or None."""
    if shutil.which("node") is None:
        return "needs node (bash deploy/install.sh installs Azurite; node comes with the machine or nodejs)"
    if not AZURITE_BLOB.exists():
        return "needs Azurite in deploy/azurite/node_modules (bash deploy/install.sh installs it)"
    return None


def skip_or_fail_without_azurite() -> None:
    reason = azurite_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Azurite unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@contextmanager
def start_azurite() -> Iterator[Azurite]:
    workdir = Path(tempfile.mkdtemp(prefix="sr-azurite-"))
    log = (workdir / "azurite.log").open("w")
    proc = subprocess.Popen(
        [
            str(AZURITE_BLOB),
            "--loose",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "1024",
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keep reading so Azurite never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="azurite-output", daemon=True)
    reader.start()
    try:
        port = None
        deadline = time.monotonic() + START_TIMEOUT
        seen: list[str] = []
        while port is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"Azurite did not report listening within {START_TIMEOUT} s: {''.join(seen)}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"Azurite exited with {proc.wait()} before listening: {''.join(seen)}")
            seen.append(line)
            match = _LISTENING.search(line)
            if match:
                port = int(match.group(2))
        yield Azurite(port=port, workdir=workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        reader.join(timeout=5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
