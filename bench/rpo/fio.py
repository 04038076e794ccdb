"""fio jobs the benchmarks run, and what they read from fio's JSON report.

One job shape, random 16 KiB writes of fresh random data, run either through the
source agent's NBD export (fio's nbd engine) or at a plain file (psync engine).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FioResult:
    engine: str
    seconds: float
    written: int  # bytes
    ios: int
    clat_p50_ms: float
    clat_p99_ms: float
    clat_max_ms: float
    cpu_percent: float = 0.0  # fio's own, of one core
    sync_p50_ms: float = 0.0  # fdatasync after each write (psync with --fdatasync), else 0
    sync_p99_ms: float = 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"fio {self.engine}: {self.written / 1e6:.0f} MB in {self.seconds:.0f} s "
            f"({self.bytes_per_second / 1e6:.1f} MB/s, {self.ios} writes, fio CPU {self.cpu_percent:.0f}%), "
            f"clat p50 {self.clat_p50_ms:.2f} ms, p99 {self.clat_p99_ms:.2f} ms, max {self.clat_max_ms:.1f} ms"
            + (f"; fdatasync p50 {self.sync_p50_ms:.2f} ms, p99 {self.sync_p99_ms:.2f} ms" if self.sync_p99_ms else "")
        )


def job(
    *, size: int, seconds: float, rate: int | None = None, seed: int = 1, iodepth: int = 16,
    bs: str = "16k", name: str = "rand16k",
) -> list[str]:
    """The engine-independent part: random writes over `size` bytes for `seconds` at `rate` bytes/s."""
    args = [
        f"--name={name}", "--rw=randwrite", f"--bs={bs}", f"--size={size}", f"--randseed={seed}",
        "--refill_buffers", f"--iodepth={iodepth}", "--time_based", f"--runtime={max(1, round(seconds))}",
    ]
    if rate:
        args.append(f"--rate={rate}")
    return args


def through_nbd(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def at_file(path: Path, *extra: str) -> list[str]:
    """psync straight at a file through the page cache; `extra` e.g. --fdatasync=1."""
    return ["--ioengine=psync", f"--filename={path}", "--direct=0", *extra]


def run(engine: str, args: list[str], *, timeout: float) -> FioResult:
    done = subprocess.run(
        ["fio", "--output-format=json", *args], capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"fio failed ({done.returncode}): {done.stderr.strip() or done.stdout[-2000:]}")
    return parse(engine, done.stdout)


def parse(engine: str, output: str) -> FioResult:
    # fio may print notes before the JSON document.
    report = json.loads(output[output.index("{"):])
    first = report["jobs"][0]
    write = first["write"]
    clat = write["clat_ns"]
    pct = clat.get("percentile", {})
    sync = first.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    return FioResult(
        engine=engine,
        seconds=write["runtime"] / 1000,
        written=write["io_bytes"],
        ios=write["total_ios"],
        clat_p50_ms=pct.get("50.000000", 0) / 1e6,
        clat_p99_ms=pct.get("99.000000", 0) / 1e6,
        clat_max_ms=clat["max"] / 1e6,
        cpu_percent=first.get("usr_cpu", 0.0) + first.get("sys_cpu", 0.0),
        sync_p50_ms=sync.get("50.000000", 0) / 1e6,
        sync_p99_ms=sync.get("99.000000", 0) / 1e6,
    )
