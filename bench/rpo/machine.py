"""The machine facts bench/RESULTS.md records beside every number."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _disk_of(path: Path) -> str:
    """The file system type and device holding `path` (findmnt, when present)."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
        return f"{out[1]} on {out[0]}" if len(out) >= 2 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def facts(workdir: Path) -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "disk": _disk_of(workdir),
        "python": platform.python_version(),
    }


def load() -> str:
    """The load average now: other work on the machine shows here."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f}"


def describe(workdir: Path) -> str:
    return ", ".join(f"{k} {v}" for k, v in facts(workdir).items())
