"""common/rates.py: the recent-throughput figure the shipper and forwarder report."""

from __future__ import annotations

from siterecovery.common.rates import RateWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_the_last_window_and_forgets_older_seconds() -> None:
    clock = Clock()
    rate = RateWindow(10.0, clock)
    assert rate.rate() == 0.0
    for _ in range(1000):  # many frames within one second: one bucket
        rate.add(1024)
    clock.now += 5
    rate.add(24 * 1024)
    assert rate.rate() == (1000 + 24) * 1024 / 10
    clock.now += 6  # the first second is now more than 10 s old
    assert rate.rate() == 24 * 1024 / 10
    clock.now += 10
    assert rate.rate() == 0.0
