"""Whether this machine's disks were rewritten from elsewhere while the agent was down.

At start the agent replays its pairs' journals onto the disks (capture.py):
frames journaled before a crash may not have reached the disk file. That is
right after a crash, and wrong after a failback: failback rewrites the
original VM's disks from the cloud while the VM is off, and replaying old
frames onto them would put stale blocks back — silently.

Failback therefore stamps a new *disk generation* on the VM before it
rewrites the disks (vSphere: the `guestinfo.siterecovery.disk-generation`
advanced setting, which a guest reads through VMware Tools:
`vmware-rpctool "info-get guestinfo.siterecovery.disk-generation"`). The agent
asks for it at start with `disk_generation_command` and keeps the last value
it saw in `<state_dir>/disk-generation`. A new non-empty value means the disks
are no longer the ones its journals describe: the pairs' directories are
removed before anything is replayed (those pairs were removed from the
configuration server when failover ended them, and a reprotect makes new
ones). An empty answer, or no command, changes nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from siterecovery.common import daemon
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

RECORD = "disk-generation"
GUESTINFO_KEY = "guestinfo.siterecovery.disk-generation"
TIMEOUT = 30.0


def current(command: str) -> str:
    """The generation the command prints ("" when there is no command, or it fails: nothing is dropped)."""
    if not command.strip():
        return ""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("disk generation unknown: the command could not run", command=command, error=str(exc))
        return ""
    if done.returncode != 0:
        log.warning("disk generation unknown: the command failed", command=command, exit=done.returncode,
                    stderr=done.stderr.strip()[-200:])
        return ""
    return done.stdout.strip()


def drop_stale_pairs(state_dir: Path, pairs_dir: Path, command: str) -> list[str]:
    """Remove the pairs' directories when the disk generation changed; returns the names removed."""
    generation = current(command)
    record = state_dir / RECORD
    seen = record.read_text().strip() if record.exists() else ""
    dropped: list[str] = []
    if generation and generation != seen and pairs_dir.exists():
        for directory in sorted(p for p in pairs_dir.iterdir() if p.is_dir()):
            shutil.rmtree(directory)
            dropped.append(directory.name)
        daemon.fsync_dir(pairs_dir)
        log.warning("the disks were rewritten by a failback since the last start: the old pairs' journals "
                    "are dropped, not replayed", generation=generation, previous=seen or "(none)", pairs=dropped)
    if generation and generation != seen:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{RECORD}.tmp")
        with open(tmp, "w") as f:
            f.write(generation + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(record)
        daemon.fsync_dir(state_dir)
    return dropped
