"""Re-apply a recorded network identity on this machine (a network order, at failback).

Steps, all checked before anything is written:

1. **Match** every recorded interface to one of the machine's devices
   (`sys/class/net/*/address` under the network root; on Windows, psutil): by MAC
   address first (failback to the original VM: it keeps its MACs), then by name,
   then — for a new VM, whose MACs are new — by position: the recorded interfaces
   still unmatched, in order, to the devices still unmatched, sorted by name, and
   only when there are as many of each. An interface that matches nothing refuses
   the whole order, and nothing is written. The result says how each matched.
2. **Choose the configuration system**: the order's target system when the
   controller names one; else Windows on Windows; else the system the identity was
   recorded from when the machine has it; else NetworkManager > netplan > ifcfg,
   whichever the machine has (its directory exists under the root).
3. **Render** (render.py) the matched interfaces, under the machine's own device
   names and MACs.
4. **Write** each file atomically (temporary file in the same directory, fsync,
   rename, fsync of the directory). A file already holding exactly that content and
   mode is left alone; any other file it replaces is first copied to
   `.<name>.sr-backup` beside it — hidden, because NetworkManager loads every file in
   its keyfile directory and initscripts every `ifcfg-*`, but both skip dot-files.
5. **Activate** only when `network_apply_command` is set (run without a shell, with
   a timeout); otherwise the result and the log say what an administrator runs.

An order is carried out once: its result is kept in `<state_dir>/network-orders.json`
(the newest 64) and an order id seen before is answered from there. A crash between
writing the files and recording the result is harmless: the next attempt finds the
files already in place and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

from siterecovery.common import errors, logging
from siterecovery.common.daemon import fsync_dir, write_json_atomically
from siterecovery.common.netidentity import (
    Identity,
    Interface,
    System,
    normalise_mac,
    system_from_proto,
)
from siterecovery.common.pb import agent_pb2

from .capture import IFCFG_DIR, NETPLAN_DIR, NM_DIR, SYSFS_NET, LiveInterface, live_interfaces
from .render import RenderedFile, activation_hint, render

log = logging.get_logger(__name__)

STATE_FILE = "network-orders.json"
KEEP_RESULTS = 64
BACKUP_SUFFIX = ".sr-backup"
APPLY_COMMAND_TIMEOUT = 120.0
MAX_ORDER_ID = 128


@dataclass(frozen=True)
class Order:
    order_id: str
    identity: Identity
    target_system: System = System.UNSPECIFIED

    @classmethod
    def from_proto(cls, message: agent_pb2.NetworkOrder) -> Order:
        identity = Identity.from_proto(message.identity)
        if not identity.interfaces:
            raise errors.InvalidInput("the order names no interface", code="network-identity-invalid")
        return cls(
            order_id=message.order_id,
            identity=identity,
            target_system=system_from_proto(message.target_system),
        )


@dataclass(frozen=True)
class Result:
    order_id: str
    ok: bool
    message: str
    files: tuple[str, ...] = ()

    def to_proto(self) -> agent_pb2.NetworkOrderResult:
        return agent_pb2.NetworkOrderResult(
            order_id=self.order_id, ok=self.ok, message=self.message, files=list(self.files)
        )


@dataclass(frozen=True)
class Match:
    recorded: Interface
    device: LiveInterface
    how: str  # "MAC", "name" or "position"

    @property
    def interface(self) -> Interface:
        """The recorded settings under this machine's device name and MAC."""
        return dataclasses.replace(self.recorded, name=self.device.name, mac=self.device.mac)

    def describe(self) -> str:
        if self.recorded.name == self.device.name:
            return f"{self.device.name} (by {self.how})"
        return f"{self.recorded.name} → {self.device.name} (by {self.how})"


def devices(root: Path) -> list[LiveInterface]:
    """This machine's network devices: sysfs under the root; psutil where there is no sysfs (Windows)."""
    if (root / SYSFS_NET).is_dir() or Path(root).resolve() != Path("/").resolve():
        return live_interfaces(root)
    found = []
    for name, entries in sorted(psutil.net_if_addrs().items()):
        for entry in entries:
            if entry.family == psutil.AF_LINK:
                try:
                    mac = normalise_mac(entry.address)
                except errors.InvalidInput:
                    continue
                if mac and mac != "00:00:00:00:00:00":
                    found.append(LiveInterface(name, mac))
    return found


def match_interfaces(recorded: Sequence[Interface], live: Sequence[LiveInterface]) -> list[Match]:
    """Every recorded interface to a device of its own, or InvalidInput naming what did not match."""
    matched: dict[str, Match] = {}
    free = list(live)

    def take(interface: Interface, device: LiveInterface, how: str) -> None:
        matched[interface.name] = Match(interface, device, how)
        free.remove(device)

    for interface in recorded:
        device = next((d for d in free if interface.mac and d.mac == interface.mac), None)
        if device is not None:
            take(interface, device, "MAC")
    for interface in recorded:
        if interface.name not in matched:
            device = next((d for d in free if d.name == interface.name), None)
            if device is not None:
                take(interface, device, "name")
    unmatched = [i for i in recorded if i.name not in matched]
    if unmatched and len(unmatched) == len(free):
        for interface, device in zip(unmatched, sorted(free, key=lambda d: d.name), strict=True):
            take(interface, device, "position")
        unmatched = []
    if unmatched:
        present = ", ".join(f"{d.name} ({d.mac})" for d in live) or "none"
        missing = ", ".join(f"{i.name} ({i.mac or 'no MAC'})" for i in unmatched)
        raise errors.PreconditionFailed(
            f"recorded interface(s) {missing} match no network device of this machine by MAC address or name, "
            f"and the unmatched devices are not as many to pair by position; devices here: {present}",
            hint="give the VM the recorded network adapters (or as many adapters as were recorded), "
            "then send a new network order",
            code="network-interface-unmatched",
        )
    return [matched[i.name] for i in recorded]


_SYSTEM_DIRS = (
    (System.NETWORKMANAGER, NM_DIR),
    (System.NETPLAN, NETPLAN_DIR),
    (System.IFCFG, IFCFG_DIR),
)


def choose_system(order: Order, root: Path, *, windows: bool = os.name == "nt") -> System:
    if order.target_system is not System.UNSPECIFIED:
        return order.target_system
    if windows:
        return System.WINDOWS
    present = [system for system, directory in _SYSTEM_DIRS if (root / directory).is_dir()]
    if order.identity.system in present:
        return order.identity.system
    if present:
        return present[0]
    raise errors.PreconditionFailed(
        f"no network configuration system found under {root} (NetworkManager, netplan or network-scripts)",
        hint="have the order name the target system, or install the machine's network configuration tools",
        code="network-system-unknown",
    )


def _checked_path(root: Path, relative: PurePosixPath) -> Path:
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise errors.InvalidInput(f"refusing to write {relative}: not a plain path under the network root",
                                  code="network-path-unsafe")
    return root.joinpath(*relative.parts)


def _write_atomically(path: Path, content: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # made 0600
    try:
        os.chmod(tmp, mode)  # before any content is in it
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)


def backup_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{BACKUP_SUFFIX}")


def write_files(root: Path, files: Sequence[RenderedFile], written: list[Path] | None = None) -> list[Path]:
    """Write what differs (backing up what it replaces); the paths written, also appended to
    `written` as they are, so a caller knows them when a later write fails."""
    targets = [(_checked_path(root, f.path), f) for f in files]  # every path checked before any write
    written = [] if written is None else written
    for path, rendered in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise errors.PreconditionFailed(f"{path} is not a regular file; not replacing it",
                                            code="network-path-unsafe")
        if path.exists():
            old = path.read_bytes()
            old_mode = path.stat().st_mode & 0o7777
            if old == rendered.content and old_mode == rendered.mode:
                continue
            _write_atomically(backup_path(path), old, old_mode)
        _write_atomically(path, rendered.content, rendered.mode)
        written.append(path)
    return written


class AppliedOrders:
    """Results of the orders carried out, by order id (`<state_dir>/network-orders.json`)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self._results: dict[str, Result] = {}
        try:
            data = json.loads(self.path.read_text())
            self._results = {r["order_id"]: Result(**{**r, "files": tuple(r["files"])}) for r in data["results"]}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            # Forgetting results can only make an order run again, which writes nothing new.
            log.warning("the network-orders file is unreadable; starting afresh", path=str(self.path), error=str(exc))

    def get(self, order_id: str) -> Result | None:
        return self._results.get(order_id)

    def record(self, result: Result) -> None:
        self._results.pop(result.order_id, None)
        self._results[result.order_id] = result
        while len(self._results) > KEEP_RESULTS:
            self._results.pop(next(iter(self._results)))
        write_json_atomically(self.path, {"results": [dataclasses.asdict(r) for r in self._results.values()]})


Runner = Callable[..., subprocess.CompletedProcess]


def _activate(command: str, run: Runner) -> str:
    """Run network_apply_command; '' when it worked, else what went wrong."""
    args = shlex.split(command, posix=os.name != "nt")
    try:
        done = run(args, capture_output=True, text=True, timeout=APPLY_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network_apply_command {command!r} could not run: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip()[-300:]
        return f"network_apply_command {command!r} exited {done.returncode}: {tail}"
    return ""


def carry_out(
    order: Order,
    *,
    root: Path,
    apply_command: str = "",
    live: Sequence[LiveInterface] | None = None,
    windows: bool = os.name == "nt",
    run: Runner = subprocess.run,
) -> Result:
    """Match, render, write, optionally activate. Refusals become a failed Result with nothing written."""
    bound = log.bind(order=order.order_id)
    written: list[Path] = []
    try:
        matches = match_interfaces(order.identity.interfaces, devices(root) if live is None else live)
        system = choose_system(order, root, windows=windows)
        write_files(root, render([m.interface for m in matches], system), written)
    except errors.SiteRecoveryError as exc:
        bound.warning("network order refused", error=exc.message, code=exc.code)
        return Result(order.order_id, False, f"{exc.message} ({exc.hint})" if exc.hint else exc.message,
                      tuple(str(p) for p in written))
    except OSError as exc:
        # Each file is whole (old or new, with its backup); the result lists those already written.
        bound.error("writing the network configuration failed", error=str(exc), written=[str(p) for p in written])
        return Result(order.order_id, False, f"writing the network configuration failed: {exc}",
                      tuple(str(p) for p in written))
    files = tuple(str(p) for p in written)
    interfaces = ", ".join(m.describe() for m in matches)
    done = (f"wrote {len(files)} file(s) for {system.value}" if files
            else f"the {system.value} configuration was already in place; nothing written")
    done += f"; interfaces: {interfaces or 'none'}"
    if not apply_command:
        hint = activation_hint(system, written)
        bound.info("network configuration written; an administrator activates it", files=files, run=hint)
        return Result(order.order_id, True, f"{done}; to activate: {hint}", files)
    problem = _activate(apply_command, run)
    if problem:
        bound.error("activating the network configuration failed", files=files, error=problem)
        return Result(order.order_id, False, f"{done}; {problem}", files)
    bound.info("network configuration written and activated", files=files, command=apply_command)
    return Result(order.order_id, True, f"{done}; activated with {apply_command}", files)
