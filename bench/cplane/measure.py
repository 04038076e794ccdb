"""CPU and memory of processes over a window, and percentiles, with psutil."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil


def cpu_seconds(processes: Sequence[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each process (all its threads) so far."""
    out = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[proc.pid] = times.user + times.system
    return out


def rss_bytes(processes: Sequence[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass
class Usage:
    """CPU as % of one core over the window (and in seconds), and the largest RSS seen in it."""

    cpu_percent: float
    rss_peak: int
    cpu_seconds: float = 0.0


class Window:
    """Samples a group of processes from `begin()` to `end()`; `sample()` in between tracks RSS.

    `group` is called at every sample, so processes that start inside the window
    (a new PostgreSQL backend) are counted from their start.
    """

    def __init__(self, group: Callable[[], Sequence[psutil.Process]]) -> None:
        self._group = group
        self._start: dict[int, float] = {}
        self._began = 0.0
        self._rss_peak = 0

    def begin(self) -> None:
        self._began = time.monotonic()
        self._start = cpu_seconds(self._group())
        self.sample()

    def sample(self) -> None:
        self._rss_peak = max(self._rss_peak, rss_bytes(self._group()))

    def end(self) -> Usage:
        self.sample()
        now = cpu_seconds(self._group())
        wall = time.monotonic() - self._began
        used = sum(seconds - self._start.get(pid, 0.0) for pid, seconds in now.items())
        return Usage(cpu_percent=100.0 * used / wall, rss_peak=self._rss_peak, cpu_seconds=used)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation): the value below which `fraction` of samples lie."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
