"""The arithmetic and fio parsing of bench/continuous.py and bench/point_in_time.py."""

from __future__ import annotations

import json
import math

import pytest

from bench.continuous import carried
from bench.rpo import fio
from bench.rpo.machine import cpu_split
from bench.rpo.sampler import Sample, Samples
from bench.rpo.stats import parse_size, percentile, slope_per_minute


def test_sizes_are_binary():
    assert parse_size("4G") == 4 * 1024**3
    assert parse_size("512M") == parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_trend_is_per_minute():
    assert slope_per_minute([(t, 2.0 * t) for t in range(10)]) == pytest.approx(120.0)
    assert slope_per_minute([(0, 5.0)]) == 0.0


def test_fio_json_with_a_note_before_it():
    report = {"jobs": [{
        "usr_cpu": 1.5, "sys_cpu": 2.5,
        "write": {"runtime": 2000, "io_bytes": 32 * 1024**2, "total_ios": 2048,
                  "clat_ns": {"max": 9e6, "percentile": {"50.000000": 1_000_000, "99.000000": 4_000_000}}},
        "sync": {"lat_ns": {"percentile": {"50.000000": 500_000, "99.000000": 2_000_000}}},
    }]}
    result = fio.parse("file", "note: both iodepth >= 1 and synchronous I/O engine are selected\n" + json.dumps(report))
    assert (result.seconds, result.ios, result.written) == (2.0, 2048, 32 * 1024**2)
    assert (result.clat_p50_ms, result.clat_p99_ms, result.clat_max_ms) == (1.0, 4.0, 9.0)
    assert (result.sync_p50_ms, result.sync_p99_ms, result.cpu_percent) == (0.5, 2.0, 4.0)
    assert result.bytes_per_second == 16 * 1024**2


def test_what_the_pipeline_carried_during_the_load_and_alone_after_it():
    samples = Samples(pair=[
        Sample(at=at, rpo_known=True, rpo_seconds=1.0, source_backlog=0, spool_backlog=int(at * 30e6))
        for at in range(11)
    ])
    # fio wrote 100 MB/s for 10 s while the backlog grew by 30 MB/s: 70 MB/s went through;
    # the 300 MB left drained in 2.5 s: 120 MB/s alone.
    line = carried(samples, 0, 11, 2.5, 100e6)
    assert line.startswith("the pipeline behind the source carried 70.0 MB/s during the load, and 120.0 MB/s alone")
    assert "upper bound" not in line
    samples.pair[5].reason_code = "journal-full"
    assert "upper bound" in carried(samples, 0, 11, 2.5, 100e6)
    assert carried(samples, 20, 30, 2.5, 100e6) == ""


def test_the_machine_cpu_split_is_shares_of_the_time_between_two_readings():
    before = {"user": 10.0, "system": 5.0, "iowait": 1.0, "softirq": 0.0, "idle": 84.0, "nice": 0.0}
    after = {"user": 57.0, "system": 43.0, "iowait": 9.0, "softirq": 4.0, "idle": 87.0, "nice": 0.0}
    assert cpu_split(before, after) == "user 47% / system 38% / iowait 8% / softirq 4% / idle 3%"
