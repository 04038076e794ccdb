"""Cold reads: empty the page cache of some files, check it, and time a plain sequential read.

`echo 3 > /proc/sys/vm/drop_caches` needs root outside a container; where it is
refused, each file's own pages are dropped instead (fsync, then
posix_fadvise(DONTNEED)), which needs no privilege and is what both sides of a
comparison get. `resident_bytes` (util-linux's fincore) shows whether it worked.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from bench.common import uncache

READ_CHUNK = 4 * 1024 * 1024


def drop_caches() -> str:
    """Try the global drop; return what happened, for the report."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches worked"
    except OSError as e:
        return f"drop_caches refused ({e.strerror}); per-file fadvise(DONTNEED) instead"


def make_cold(paths: list[Path]) -> str:
    how = drop_caches()
    uncache(*paths)
    return how


def resident_bytes(paths: Iterable[Path]) -> int:
    """Bytes of these files in the page cache now (fincore)."""
    names = [str(p) for p in paths]
    if not names:
        return 0
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *names],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return sum(int(line) for line in out.split())


def timed_read(paths: Iterable[Path]) -> tuple[int, float]:
    """Read every file start to end, in order, as `cat` would; (bytes, seconds)."""
    buf = bytearray(READ_CHUNK)
    total = 0
    started = time.monotonic()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.monotonic() - started
