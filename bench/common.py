"""What the replication benchmarks share: a site of real daemons, images, peers, RSS, machine facts.

The daemons are started exactly as the integration tests start them
(`tests/integration/replication_site.py::ReplicatingSite`: a configuration
server, a process server, a master target and a source agent as subprocesses
over mutual TLS on 127.0.0.1, port 0), with the tests' heartbeat interval
(0.3 s), so a pair's state is seen at most a heartbeat or two after it changes.

Everything a run writes lives under its work directory: the site, the images,
the peers' output files, and the temporary files of srctl's helper (TMPDIR).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import xxhash
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1_000_000
CHUNK = 8 * MiB
RSS_TARGET = 200 * MiB
RSS_INTERVAL = 0.1
POLL_INTERVAL = 0.1


# -- arguments and the work directory ---------------------------------------------------
def parse_size(text: str) -> int:
    """"4G", "512M", "1073741824" -> bytes (binary units)."""
    match = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 4G, 512M")
    scale = {"": 1, "K": 1024, "M": MiB, "G": GiB}[match.group(2).upper()]
    size = int(match.group(1)) * scale
    if size < 64 * MiB or size % (64 * 1024):
        raise argparse.ArgumentTypeError("the size must be at least 64M and a multiple of 64K")
    return size


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=parse_size, default=4 * GiB, help="image size (default 4G)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (and the daemons' logs)")
    parser.add_argument("--seed", type=int, default=20261128, help="seed of the image data and the changes")
    return parser


@contextlib.contextmanager
def work_dir(path: Path | None, *, keep: bool, needs: int) -> Iterator[Path]:
    """The run's directory (`path`, new or empty, or a new one under /tmp): everything the run
    writes goes here, and it is emptied (or, made here, removed) at the end unless `keep`."""
    made = path is None or not path.exists()
    root = Path(tempfile.mkdtemp(prefix="sr-bench-sync-", dir="/tmp")) if path is None else path.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not made and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: give a new or empty directory (the run empties it at the end)")
    try:
        fstype = filesystem(root)[1]
        if fstype in ("tmpfs", "ramfs"):
            raise SystemExit(f"{root} is in memory ({fstype}): give --dir a directory on a disk")
        free = shutil.disk_usage(root).free
        if free < needs:
            raise SystemExit(f"{root} has {free / GiB:.1f} GiB free; this run needs {needs / GiB:.1f} GiB")
        tmp = root / "tmp"
        tmp.mkdir()
        os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)  # srctl's helper and the daemons' temporary files
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the repository either
        sys.dont_write_bytecode = True
        yield root
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)  # the last line of stdout stays the result
        elif made:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


# -- images ---------------------------------------------------------------------------
def keystream(seed: int | str) -> Callable[[int], bytes]:
    """Seeded incompressible bytes, fast: AES-256-CTR over zeros (GB/s with AES-NI;
    os.urandom and random.randbytes run at tens of MB/s on a busy VM)."""
    key = hashlib.sha256(f"siterecovery-bench:{seed}".encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return lambda n: encryptor.update(bytes(n))


def write_image(path: Path, size: int, *, seed: int | None) -> None:
    """Fill `path` (created, or overwritten in place) with `size` bytes, every one allocated:
    seeded random data, or zeros when `seed` is None. Flushed to the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = keystream(seed) if seed is not None else bytes
    with open(path, "r+b" if path.exists() else "wb") as f:
        for at in range(0, size, CHUNK):
            f.write(fill(min(CHUNK, size - at)))
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def uncache(*paths: Path) -> None:
    """Write out and drop these files' pages, so the next reader reads the disk (only these
    files: other processes' caches on the machine are left alone)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def digest(path: Path) -> str:
    """xxh3-128 of a whole file (a check that two files are equal, not a security hash)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


# -- peers --------------------------------------------------------------------------------
def timed(args: list[str], *, fsync: Path | None = None) -> tuple[float, str]:
    """Run a peer; seconds it took (including an fsync of `fsync`, when given) and its output."""
    started = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if fsync is not None:
        uncache(fsync)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed, result.stdout + result.stderr


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: bash deploy/install.sh installs them")


# -- the site -------------------------------------------------------------------------------
@contextlib.contextmanager
def site(root: Path, disk_size: int) -> Iterator[object]:
    """A ReplicatingSite whose source agent fronts a `disk_size` image (sparse: fill it with
    `write_image` before enabling a pair), stopped when the block ends."""
    from tests.integration.replication_site import ReplicatingSite

    s = ReplicatingSite(root)
    try:
        s.start(disk_size=disk_size, data_bytes=0)
        yield s
    finally:
        s.stop_all()


def daemons(s) -> dict[str, int]:
    """Every daemon of the site by name: its pid."""
    return {"config-server": s.cs.pid, **{name: launched.pid for name, launched in s.agents.items()}}


def poll(condition: Callable[[], object], *, timeout: float, what: str) -> object:
    """Ask `condition` every POLL_INTERVAL until it returns something truthy (the daemons
    report every 0.3 s: asking more often would only load the configuration server)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        pause.wait(POLL_INTERVAL)
    return result


def _pairs(s) -> list:
    from siterecovery.common.pb import admin_pb2

    return list(s.admin().ListPairs(admin_pb2.ListPairsRequest(machine=s.machine), timeout=10).pairs)


def wait_synced(s, *, timeout: float) -> dict:
    """Until the pair replicates and the master target applied everything the source made
    (polled over the site's one admin channel: cheap); the pair's view as a dict."""
    from google.protobuf.json_format import MessageToDict

    from siterecovery.common.pb import replication_pb2 as rpb

    def synced():
        (pair,) = _pairs(s)
        if pair.state == rpb.PAIR_STATE_ERROR:
            raise SystemExit(f"the pair failed: {pair.reason} ({pair.reason_code})")
        done = pair.state == rpb.PAIR_STATE_REPLICATING and pair.applied_seq >= pair.source_seq > 0
        return pair if done else None

    pair = poll(synced, timeout=timeout, what="the pair to replicate with everything applied")
    return MessageToDict(pair, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def wait_no_pairs(s) -> None:
    poll(lambda: not _pairs(s), timeout=30, what="the disabled pair to be gone")


class RssSampler:
    """Samples each daemon's RSS (with its children's) every 0.1 s; keeps the maximum."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self._watched: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, pids: dict[str, int]) -> None:
        """Watch these daemons (one of the same name watched before is done with)."""
        with self._lock:
            self._watched.update({name: psutil.Process(pid) for name, pid in pids.items()})
        if not self._thread.is_alive():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            with self._lock:
                for name, proc in self._watched.items():
                    with contextlib.suppress(psutil.Error):
                        rss = proc.memory_info().rss
                        for child in proc.children(recursive=True):
                            with contextlib.suppress(psutil.Error):
                                rss += child.memory_info().rss
                        self.peak[name] = max(self.peak.get(name, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def line(self) -> str:
        worst = max(self.peak.values(), default=0)
        rss = ", ".join(f"{name} {peak / MiB:.0f}" for name, peak in sorted(self.peak.items()))
        return f"max RSS MiB: {rss} (target <= {RSS_TARGET // MiB}: {'ok' if worst <= RSS_TARGET else 'OVER'})"


def own_cpu_seconds() -> float:
    """CPU-seconds (user + system) of this process so far, every thread counted."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each daemon has used so far."""
    times = {name: psutil.Process(pid).cpu_times() for name, pid in pids.items()}
    return {name: t.user + t.system for name, t in times.items()}


def read_bytes(pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Bytes each daemon has read so far: (through read calls, from storage) (/proc/PID/io)."""
    out = {}
    for name, pid in pids.items():
        io = psutil.Process(pid).io_counters()
        out[name] = (io.read_chars, io.read_bytes)
    return out


def read_line(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """What each daemon read during a timed run: read calls / storage, in MiB."""
    parts = ", ".join(
        f"{name} {(after[name][0] - before[name][0]) / MiB:.1f} / {(after[name][1] - before[name][1]) / MiB:.1f}"
        for name in sorted(after)
    )
    return f"daemon reads MiB (read calls / from storage): {parts}"


def cpu_line(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """Where the CPU went during a timed run: each daemon's CPU seconds (and share of one core)."""
    used = {name: after[name] - before[name] for name in after}
    parts = ", ".join(f"{name} {cpu:.1f} s ({cpu / seconds:.0%})" for name, cpu in sorted(used.items()))
    return f"daemon CPU over {seconds:.1f} s: {parts}"


# -- machine facts ----------------------------------------------------------------------------
def machine_facts(where: Path) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"cpu: {cpu}, {os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"ram: {psutil.virtual_memory().total / GiB:.1f} GiB",
        f"kernel: {platform.system()} {platform.release()}; python {platform.python_version()}",
        f"disk: {disk_of(where)}",
        f"tools: {tool_version(['dd', '--version'])}; {tool_version(['rsync', '--version'])}",
    ]


def filesystem(where: Path) -> tuple[str, str, str]:
    """(device, filesystem type, mount point) holding `where`; "?" for what findmnt does not say."""
    found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", "-T", str(where)],
                           capture_output=True, text=True, check=False).stdout.split()
    return (found[0], found[1], found[2]) if len(found) >= 3 else ("?", "?", "?")


def disk_of(where: Path) -> str:
    """The filesystem and block device that hold `where`, and whether it spins."""
    source, fstype, mount = filesystem(where)
    if source == "?":
        return "unknown"
    device = Path(source).name
    parent = Path(f"/sys/class/block/{device}/..").resolve().name if Path(f"/sys/class/block/{device}/partition").exists() else device
    rotational = Path(f"/sys/block/{parent}/queue/rotational")
    kind = {"0": "non-rotational", "1": "rotational"}.get(rotational.read_text().strip() if rotational.exists() else "", "")
    model = Path(f"/sys/block/{parent}/device/model")
    described = model.read_text().strip() if model.exists() else ""
    return ", ".join(x for x in (f"{source} ({fstype} on {mount})", described, kind) if x)


def tool_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return f"{args[0]} missing"
    return out.splitlines()[0].strip() if out else args[0]


def mbps(size: int, seconds: float) -> float:
    return size / seconds / MB
