"""A recent-throughput figure that costs the same however many frames made it.

The shipper and the forwarders used to keep one (time, bytes) sample per frame
and sum the last ten seconds of them for every status: at 16 KiB writes that is
thousands of samples per heartbeat, and the source agent's profile under the
continuous benchmark showed the sum among its largest Python costs. A
`RateWindow` keeps one count per whole second instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateWindow:
    """Bytes per second over the last `window` seconds, counted in one-second buckets."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: deque[list[int]] = deque()  # [whole second, bytes]

    def add(self, nbytes: int) -> None:
        second = int(self._clock())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += nbytes
                return
            self._buckets.append([second, nbytes])
            self._trim(second)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - self.window:
            self._buckets.popleft()

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            return sum(count for _second, count in self._buckets) / self.window
