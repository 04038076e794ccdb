"""Once a second: the pair's RPO and backlog, and every daemon's resident memory.

The sampling loop is the measurement itself (a sample per second), not a way to
wait for something. A sample whose status call fails is counted, not guessed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from siterecovery.common.pb import admin_pb2


@dataclass
class Sample:
    at: float  # seconds since the sampler started
    rpo_known: bool
    rpo_seconds: float
    source_backlog: int
    spool_backlog: int
    reason_code: str = ""  # journal-full: the source tracks changed blocks (its journal is at its limit)

    @property
    def backlog(self) -> int:
        return self.source_backlog + self.spool_backlog


@dataclass
class Samples:
    pair: list[Sample] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (at, bytes per daemon)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.pair if start <= s.at < end]

    def failed_between(self, start: float, end: float) -> int:
        return sum(1 for at in self.failed_at if start <= at < end)

    def max_rss(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        """The largest RSS each daemon had between `start` and `end`."""
        most: dict[str, int] = {}
        for at, by_name in self.rss:
            if start <= at < end:
                for name, rss in by_name.items():
                    most[name] = max(rss, most.get(name, 0))
        return most


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a daemon and any processes it started."""
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each daemon has used so far, its own processes included."""
    used = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            times = [p.cpu_times() for p in (proc, *proc.children(recursive=True))]
        except psutil.Error:
            continue
        used[name] = sum(t.user + t.system for t in times)
    return used


class Sampler:
    """Samples `view()` and the RSS of `pids` every `interval` seconds on a thread of its own."""

    def __init__(self, view: Callable[[], admin_pb2.PairView], pids: dict[str, int], interval: float = 1.0):
        self._view = view
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.samples = Samples()
        self.started = 0.0

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.started

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._sample()
            tick += 1
            # The next tick on the fixed schedule, however long this sample took.
            self._stop.wait(max(0.0, self.started + tick * self._interval - time.monotonic()))

    def _sample(self) -> None:
        at = self.now()
        by_name = {}
        for name, proc in self._procs.items():
            try:
                by_name[name] = tree_rss(proc)
            except psutil.Error:
                continue
        self.samples.rss.append((at, by_name))
        try:
            pair = self._view()
        except Exception:  # a missed deadline on a loaded machine: counted, not fatal
            self.samples.failed_at.append(at)
            return
        self.samples.pair.append(Sample(
            at=at, rpo_known=pair.rpo_known, rpo_seconds=pair.rpo_seconds,
            source_backlog=pair.source_backlog_bytes, spool_backlog=pair.spool_backlog_bytes,
            reason_code=pair.reason_code,
        ))
