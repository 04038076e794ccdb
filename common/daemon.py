"""What every daemon does around its own work: logging, signals, readiness.

The shape of every daemon's entry point (CONVENTIONS 7) is
`main()` → parse flags and the TOML file into settings → `run(settings)`.
`run` binds its ports first, then writes the state file and reports
readiness (the `NOTIFY_SOCKET` protocol of systemd, which the test harness
and the lab also listen on), then works until SIGTERM/SIGINT sets the stop
event, and drains.

Supervisor messages go through the `sdnotify` package (a dependency since the
foundation): READY=1 with a STATUS line when the ports are bound, STATUS= as
the daemon's situation changes (enrolling, registered, configuration server
unreachable), STOPPING=1 when it drains, and WATCHDOG=1 from a small thread
while systemd asks for it (`WatchdogSec=` in the unit sets `WATCHDOG_USEC`).
Without `NOTIFY_SOCKET` every message is dropped silently.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import sdnotify

from siterecovery.common import errors
from siterecovery.common.logging import get_logger

log = get_logger(__name__)


def install_stop_handlers() -> threading.Event:
    """SIGTERM and SIGINT set the returned event; the daemon drains and exits."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def write_json_atomically(path: Path, data: dict[str, Any], *, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_state_dir(state_dir: Path, daemon: str) -> IO[str]:
    """Hold `<state_dir>/<daemon>.lock` for as long as the returned file stays open.

    Two daemons on one state directory would interleave their journals and
    spools; the second is refused (Conflict, exit 4) before it touches
    anything. The lock ends with the process (or when the file is closed), so a
    daemon killed with -9 leaves nothing to clean up.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / f"{daemon}.lock", "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        pid = (read_state_file(state_dir, daemon) or {}).get("pid", "?")
        raise errors.Conflict(
            f"another {daemon} runs with state directory {state_dir} (pid {pid})",
            hint="stop it first: two daemons on one state directory would corrupt what it holds",
            code="state-dir-in-use",
        ) from None
    return handle


def state_file_path(state_dir: Path, daemon: str) -> Path:
    return state_dir / f"{daemon}.state.json"


def report_ready(state_dir: Path, daemon: str, **facts: Any) -> Path:
    """Write `<state_dir>/<daemon>.state.json` and tell the supervisor we are ready."""
    path = state_file_path(state_dir, daemon)
    write_json_atomically(
        path,
        {"daemon": daemon, "pid": os.getpid(), "started_at": datetime.now(UTC).isoformat(), **facts},
    )
    status = " ".join(f"{k}={v}" for k, v in facts.items() if not isinstance(v, (dict, list)))
    sdnotify.SystemdNotifier().notify(f"READY=1\nSTATUS={status}")
    return path


def report_status(text: str) -> None:
    """One line for `systemctl status`; newlines would end the assignment, so they go."""
    sdnotify.SystemdNotifier().notify("STATUS=" + " ".join(text.split())[:400])


def report_stopping() -> None:
    sdnotify.SystemdNotifier().notify("STOPPING=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings systemd asks of this process, or None.

    Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises; None when it is
    unset or not a positive number, or when `WATCHDOG_PID` names another process
    (the variables were inherited by a child, which must not ping for us).
    """
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000


def start_watchdog(stop: threading.Event, environ: Mapping[str, str] | None = None) -> threading.Thread | None:
    """Ping WATCHDOG=1 every half `WATCHDOG_USEC` until `stop` is set; None when not asked to.

    What it proves is modest and stated here so nobody reads more into it: the
    interpreter still schedules threads (not wedged in a C call holding the GIL,
    not frozen or swapped to death). A Python-level deadlock of the daemon's own
    threads does not stop these pings. Started after READY=1, since systemd
    arms the watchdog when start-up completes.
    """
    interval = watchdog_interval(environ)
    if interval is None:
        return None
    notifier = sdnotify.SystemdNotifier()

    def ping() -> None:
        notifier.notify("WATCHDOG=1")
        while not stop.wait(interval):
            notifier.notify("WATCHDOG=1")

    thread = threading.Thread(target=ping, name="systemd-watchdog", daemon=True)
    thread.start()
    log.info("systemd watchdog armed", ping_interval=interval)
    return thread


def read_state_file(state_dir: Path, daemon: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_file_path(state_dir, daemon).read_text())
    except FileNotFoundError:
        return None
