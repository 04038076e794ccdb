"""The machine facts bench/RESULTS.md records beside every number (as bench/common.py words them)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from bench.common import disk_of, tool_version


def facts(where: Path) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return [
        f"cpu: {cpu}, {os.cpu_count()} cores; {load()}",
        f"ram: {psutil.virtual_memory().total / 2**30:.1f} GiB",
        f"kernel: {platform.system()} {platform.release()}; python {platform.python_version()}",
        f"disk: {disk_of(where)}",
        f"tools: {tool_version(['fio', '--version'])}",
    ]


def load() -> str:
    """The load average now: other work on the machine shows here."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
