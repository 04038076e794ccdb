"""Agents hand freed heap back to the kernel once a second (common/memory.py)."""

from __future__ import annotations

import platform
import threading

import pytest

from siterecovery.common import memory


def test_glibc_has_malloc_trim():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory._malloc_trim() is not None


def test_trimming_runs_until_stopped():
    stop = threading.Event()
    thread = memory.start_trimming(stop, interval=0.01)
    if thread is None:
        pytest.skip("this C library has no malloc_trim")
    assert thread.is_alive() and thread.daemon
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
