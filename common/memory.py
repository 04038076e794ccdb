"""Hand freed heap memory back to the kernel, which glibc's allocator otherwise keeps.

The data path moves buffers of about 1 MiB (frames, gRPC messages, zstd output)
through several threads. glibc's malloc serves them from per-thread arenas and,
once such a buffer has been freed, raises its mmap threshold so that later ones
come from the arenas too; freed arena memory stays in the process. A process
server that held some tens of MiB of live buffers during a full sync so ended
at 260-350 MiB RSS (bench/continuous.py). Fixing the mmap threshold instead
(M_MMAP_THRESHOLD) kept it under 100 MiB but made every buffer an mmap, a
munmap and fresh zeroed pages: the full sync ran 4x slower. `malloc_trim(0)`
once a second returns the free pages of every arena (madvise) and costs a few
milliseconds of CPU.

Where the C library has no malloc_trim (musl, Windows, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from siterecovery.common.logging import get_logger

log = get_logger(__name__)

TRIM_INTERVAL = 1.0


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def start_trimming(stop: threading.Event, interval: float = TRIM_INTERVAL) -> threading.Thread | None:
    """Call malloc_trim(0) every `interval` seconds until `stop` is set; None where there is none."""
    trim = _malloc_trim()
    if trim is None:
        return None

    def loop() -> None:
        while not stop.wait(interval):
            trim(0)

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread
