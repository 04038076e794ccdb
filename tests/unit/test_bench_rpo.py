"""The arithmetic and fio parsing of bench/continuous.py and bench/point_in_time.py."""

from __future__ import annotations

import json
import math

import pytest

from bench.rpo import fio
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
