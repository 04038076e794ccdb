"""Freeze and thaw hook scripts around an app-consistent recovery point.

The source agent runs the configured freeze script, inserts the tag as soon as
it exits 0, and then runs the thaw script. A script gets its context in the
environment (SR_HOOK=freeze|thaw, SR_PAIR_ID, SR_DISK, SR_TAG_ID) and runs in
its own process group, which is killed whole when it outlives the timeout. Its
output is kept (the last 4 KiB) for the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from siterecovery.common.logging import get_logger

log = get_logger(__name__)

_OUTPUT_TAIL = 4096


@dataclass(frozen=True)
class HookResult:
    ok: bool
    exit_code: int | None  # None: it did not finish (timed out, or could not start)
    timed_out: bool = False
    output: str = ""
    error: str = ""

    def describe(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.exit_code is None:
            return self.error or "could not start"
        return f"exit {self.exit_code}"


def run_hook(script: Path, *, timeout: float, env: Mapping[str, str]) -> HookResult:
    """Run `script` with `env` added to the environment; never raises."""
    try:
        process = subprocess.Popen(
            [str(script)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(ok=False, exit_code=None, error=f"cannot run {script}: {exc.strerror or exc}")
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = process.communicate()
        return HookResult(ok=False, exit_code=None, timed_out=True, output=_tail(output))
    return HookResult(ok=process.returncode == 0, exit_code=process.returncode, output=_tail(output))


def _tail(output: bytes | None) -> str:
    return (output or b"")[-_OUTPUT_TAIL:].decode("utf-8", "replace")
