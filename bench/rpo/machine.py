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


def cpu_times() -> dict[str, float]:
    """The whole machine's CPU seconds so far, by kind (user, system, iowait, idle ...)."""
    return dict(psutil.cpu_times()._asdict())


def cpu_split(before: dict[str, float], after: dict[str, float]) -> str:
    """How the whole machine's CPU went between two `cpu_times` readings: a saturated
    machine (idle near 0) bounds every daemon on it, whatever each one needs alone."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    total = sum(spent.values()) or 1.0
    shown = ("user", "system", "iowait", "softirq", "idle")
    return " / ".join(f"{name} {spent.get(name, 0.0) / total:.0%}" for name in shown)
