"""Facts an agent reports about its host, its disks and its directories."""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

import siterecovery
from siterecovery.common import errors
from siterecovery.common.daemon import write_json_atomically
from siterecovery.common.pb import common_pb2


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def host_addresses() -> list[str]:
    addresses = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(entry.address.split("%")[0])
            if not address.is_link_local:
                addresses.append(str(address))
    return sorted(set(addresses))


def bios_uuid() -> str:
    """The machine's SMBIOS UUID when this process may read it (root, on Linux), else ""."""
    try:
        return Path("/sys/class/dmi/id/product_uuid").read_text("ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return ""


def host_facts(*, hostname: str = "", machine_uuid: str = "") -> common_pb2.HostFacts:
    return common_pb2.HostFacts(
        hostname=hostname or socket.gethostname(),
        os=os_name(),
        addresses=host_addresses(),
        agent_version=siterecovery.__version__,
        machine_uuid=machine_uuid,
    )


def directory_size(path: Path) -> int:
    """Bytes allocated to the files under `path` (a walk: its cost grows with the files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


class DirectorySizes:
    """`directory_size` of each directory, walked again only once `max_age` seconds old.

    Every heartbeat reports each directory, and a master target heartbeats at every
    change of a pair too. Walking a datastore of many disks or a retention directory of
    many segments each time cost the daemon's time for a figure that is informational
    (how much of the volume is the agent's). Free space, which the warnings are about,
    is read at every call."""

    def __init__(self, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[str, tuple[float, int]] = {}  # path -> (walked at, bytes)

    def size(self, path: Path) -> int:
        key = str(path)
        now = self._clock()
        with self._lock:
            walked = self._known.get(key)
            if walked is not None and now - walked[0] < self.max_age:
                return walked[1]
        size = directory_size(path)
        with self._lock:
            self._known[key] = (now, size)
        return size


DIRECTORY_SIZES = DirectorySizes()


def directory_facts(
    kind: int, path: Path, *, used_by_agent: int | None = None, sizes: DirectorySizes = DIRECTORY_SIZES
) -> common_pb2.DirectoryFacts:
    path.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(path)
    return common_pb2.DirectoryFacts(
        kind=kind,
        path=str(path),
        total_bytes=usage.total,
        free_bytes=usage.free,
        used_by_agent_bytes=sizes.size(path) if used_by_agent is None else used_by_agent,
    )


def disk_size(path: Path) -> int:
    info = os.stat(path)
    if stat.S_ISBLK(info.st_mode):
        with open(path, "rb") as handle:
            return handle.seek(0, os.SEEK_END)
    return info.st_size


def _block_device_identity(path: Path) -> str | None:
    by_id = Path("/dev/disk/by-id")
    if not by_id.is_dir():
        return None
    target = path.resolve()
    names = sorted(link.name for link in by_id.iterdir() if link.resolve() == target)
    preferred = [n for n in names if n.startswith("wwn-")] or names
    return preferred[0] if preferred else None


class DiskIdentities:
    """Stable identities for protected disks.

    A block device is known by its /dev/disk/by-id name (WWN first), which
    survives a renamed device node. An image file gets a UUID the first time
    it is seen, kept in `<state_dir>/disk-ids.json` under its real path.
    """

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / "disk-ids.json"

    def identity(self, disk: Path) -> str:
        if stat.S_ISBLK(os.stat(disk).st_mode):
            found = _block_device_identity(disk)
            if found:
                return found
        known = json.loads(self._path.read_text()) if self._path.exists() else {}
        key = str(disk.resolve())
        if key not in known:
            known[key] = f"file-{uuid.uuid4()}"
            write_json_atomically(self._path, known)
        return known[key]


def disk_facts(identities: DiskIdentities, path: Path, name: str = "") -> common_pb2.DiskFacts:
    if not path.exists():
        raise errors.InvalidInput(
            f"protected disk {path} does not exist",
            hint="fix the disks list in the source agent's config file",
            code="disk-missing",
        )
    return common_pb2.DiskFacts(
        identity=identities.identity(path),
        path=str(path),
        size_bytes=disk_size(path),
        name=name or path.name,
    )


# Free space below these fractions of a directory's file system is a problem.
# `srctl doctor` (controller/diagnostics.py) uses the same two numbers, so a
# directory its check calls low is one the server's health calls low too.
SPACE_WARNING_FRACTION = 0.15
SPACE_CRITICAL_FRACTION = 0.05
_KIND_WORDS = {
    common_pb2.DIRECTORY_KIND_DATASTORE: "datastore",
    common_pb2.DIRECTORY_KIND_RETENTION: "retention directory",
    common_pb2.DIRECTORY_KIND_SPOOL: "spool directory",
    common_pb2.DIRECTORY_KIND_STATE: "state directory",
}


def space_problems(directories: Sequence[common_pb2.DirectoryFacts]) -> list[common_pb2.Problem]:
    """A warning below 15 % free, critical below 5 %, naming the directory and what to do."""
    problems = []
    for directory in directories:
        if not directory.total_bytes:
            continue
        fraction = directory.free_bytes / directory.total_bytes
        if fraction >= SPACE_WARNING_FRACTION:
            continue
        severity = (
            common_pb2.SEVERITY_CRITICAL if fraction < SPACE_CRITICAL_FRACTION else common_pb2.SEVERITY_WARNING
        )
        what = _KIND_WORDS.get(directory.kind, "directory")
        problems.append(
            common_pb2.Problem(
                code="low-free-space",
                severity=severity,
                message=f"{what} {directory.path} has {fraction:.0%} free; free space or move it to a larger volume",
            )
        )
    return problems
