"""What a small buffered write costs in the page cache a sync leaves behind (no daemons).

    .venv/bin/python -m bench.page_cache_folios [--dir DIR] [--size 1G] [--writes 20000] [--rounds 3]

A file of random data is written with 1 MiB writes and fsynced (as a master
target's initial sync does), then the same seeded random 16 KiB pwrites are
timed into it four ways, 256 at a time like one apply group:

- into the cache the 1 MiB writes left (large folios);
- after 1 MiB sequential reads of the whole file (as a source's sync reads its disk);
- after POSIX_FADV_DONTNEED of the file (what common/pagecache.py does): each
  write makes its own small folios;
- after DONTNEED, each write preceded by a pread of its old contents (the master
  target's undo), one by one and with the group read ahead first
  (POSIX_FADV_WILLNEED, target.py `_prefetch_old`).

The cases take turns for `--rounds` rounds (the cost of a fresh page varies
with the machine's free memory and writeback); medians are printed in
microseconds per write (and per read), and on its last line the
ratio of a write into large folios to one into small ones. The numbers depend
on the kernel's large-folio support (ext4 since Linux 6.x).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.rpo import machine

from .common import MiB, parse_size

WRITE = 16 * 1024
GROUP = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.page_cache_folios", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="where the test file goes (default: the temp dir)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--writes", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3, help="rounds of all cases, taking turns; medians printed")
    return p.parse_args(argv)


def _timed_writes(fd: int, offsets: list[int], *, read: bool = False, prefetch: bool = False) -> tuple[float, float]:
    """Microseconds per write and per old-contents read (0 when not reading)."""
    data = os.urandom(WRITE)
    reading = writing = 0.0
    for at in range(0, len(offsets), GROUP):
        group = offsets[at:at + GROUP]
        started = time.perf_counter()
        if prefetch:
            for offset in group:
                os.posix_fadvise(fd, offset, WRITE, os.POSIX_FADV_WILLNEED)
        if read:
            for offset in group:
                os.pread(fd, WRITE, offset)
        between = time.perf_counter()
        for offset in group:
            os.pwrite(fd, data, offset)
        reading += between - started
        writing += time.perf_counter() - between
    return writing / len(offsets) * 1e6, reading / len(offsets) * 1e6


def _uncache(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


CASES = ("written", "read", "small", "undo", "ahead")


def _case(name: str, fd: int, size: int, chunk: bytes, offsets: list[int]) -> tuple[float, float]:
    """Set the file's cache up as the case says (from fresh data), then time the writes."""
    for offset in range(0, size, MiB):
        os.pwrite(fd, chunk, offset)
    os.fsync(fd)
    if name != "written":
        _uncache(fd)
    if name == "read":
        for offset in range(0, size, MiB):
            os.pread(fd, MiB, offset)
    result = _timed_writes(fd, offsets, read=name in ("undo", "ahead"), prefetch=name == "ahead")
    _uncache(fd)
    return result


def _median(values: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = args.dir or Path(tempfile.gettempdir())
    print("\n".join(machine.facts(where)))
    rng = random.Random(1)
    offsets = [rng.randrange(args.size // WRITE) * WRITE for _ in range(args.writes)]
    chunk = os.urandom(MiB)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    with tempfile.NamedTemporaryFile(dir=where, prefix="sr-bench-folios-") as f:
        fd = f.fileno()
        for _round in range(args.rounds):  # the cases take turns: memory and writeback vary over time
            for name in CASES:
                runs[name].append(_case(name, fd, args.size, chunk, offsets))
    large_written, _ = _median(runs["written"])
    large_read, _ = _median(runs["read"])
    small, _ = _median(runs["small"])
    undo_write, undo_read = _median(runs["undo"])
    ahead_write, ahead_read = _median(runs["ahead"])
    print(f"16 KiB pwrite into folios 1 MiB writes made: {large_written:.1f} us")
    print(f"16 KiB pwrite after 1 MiB sequential reads: {large_read:.1f} us")
    print(f"16 KiB pwrite after DONTNEED (small folios): {small:.1f} us")
    print(f"after DONTNEED, old contents read first: read {undo_read:.1f} us + write {undo_write:.1f} us")
    print(f"after DONTNEED, the group read ahead first: read {ahead_read:.1f} us + write {ahead_write:.1f} us")
    print(f"page_cache_folios: a small write into a sync's large folios costs {large_written / small:.1f}x "
          f"(after reads {large_read / small:.1f}x) one into small folios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
