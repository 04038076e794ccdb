"""Keeping streaming passes over a disk out of the page cache.

A sync reads (at the source) or writes (at the master target) a whole disk in
1 MiB pieces, once. Left alone, the kernel keeps those pages cached as large
folios (up to 2 MiB each: a 1 MiB write makes 1 MiB folios, readahead makes
them as large as it can), and the small writes of continuous replication that
follow land in them. ext4 tracks a large folio's blocks with one buffer head
per 4 KiB and walks all of a folio's buffer heads on every buffered write into
it, so a 16 KiB pwrite into a sync's cached folios costs several times one into
small folios (`bench/page_cache_folios.py`: 17-26 us after 1 MiB writes, 32-50 us
after 1 MiB reads, 4-6 us into folios the small writes made themselves).
That was an eighth of all CPU on the machine during the continuous benchmark.

So a pass drops the pages behind it (`DropBehind`) and a large write is dropped
once it is durable (`drop`): later small writes then make small folios. Dropping
is a hint (POSIX_FADV_DONTNEED): the kernel forgets clean, unmapped pages and
leaves dirty or busy ones alone, so it never changes what a read returns.

A scan-mode pass (agents/source/scan.py) reads around the page cache instead
(`DirectReader`, O_DIRECT). Its disk is often a live block device of the protected
machine, read whole every few minutes: buffered, each pass would fill memory with
the device's pages and push the applications' cache out, and dropping them behind
would also drop the file system's metadata buffers, which live in the same device
mapping. Worse, the device's page cache is not kept coherent with what a mounted
file system writes through its own files: a block cached by an earlier pass could
be read stale, and a change missed. A direct read goes to the device each time
(after the kernel writes back any dirty cached pages of the range, so writes made
through the page cache are seen too).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path

# Larger than, and a multiple of, the largest folio the page cache makes (the PMD
# size: 2 MiB with 4 KiB pages). The kernel drops only folios wholly inside the range
# it is given, so a pass drops whole aligned spans behind it.
DROP_ALIGN = 4 * 1024 * 1024
# A write at least this large is a sync's (or a sequential writer's): once durable, the
# master target drops it. A write's folios lie within its own range, so no alignment is needed.
LARGE_WRITE = 256 * 1024


def drop(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to forget the clean cached pages of a range (`length` 0: to the end)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # no page cache to drop (a pipe) or no fadvise here: it was only a hint


class DropBehind:
    """Drops the pages of a file behind a forward pass over it, a DROP_ALIGN span at a time."""

    def __init__(self, fd: int, position: int = 0) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._from = position - position % DROP_ALIGN

    def restart(self, position: int) -> None:
        """The pass goes on from `position` (a rewind or a new pass)."""
        with self._lock:
            self._from = position - position % DROP_ALIGN

    def passed(self, position: int) -> None:
        """Every byte below `position` was read and is not needed again soon."""
        with self._lock:
            to = position - position % DROP_ALIGN
            if to <= self._from:
                return
            start, self._from = self._from, to
        drop(self._fd, start, to - start)

    def finish(self) -> None:
        """The pass reached the end of the file: drop what is left behind it."""
        with self._lock:
            start = self._from
        drop(self._fd, start, 0)


# O_DIRECT wants the file offset, the length and the buffer aligned to the device's logical
# block size: 4096 covers 512-byte and 4K-sector devices (an mmap'd buffer is page aligned).
DIRECT_ALIGN = 4096


class DirectReader:
    """Reads a file or device around the page cache (O_DIRECT) into one reused buffer.

    Where the file system refuses O_DIRECT (EINVAL: procfs, tmpfs before Linux 6.6) it reads through the page
    cache instead (`direct` False), and so it does from the first direct read refused with
    EINVAL (a device whose logical blocks are larger than DIRECT_ALIGN). A read returns a view
    of the buffer, valid until the next read; offsets must be DIRECT_ALIGN-aligned, lengths at
    most `buffer_bytes`."""

    def __init__(self, path: Path, buffer_bytes: int) -> None:
        if buffer_bytes % DIRECT_ALIGN:
            raise ValueError(f"buffer of {buffer_bytes} bytes is not a multiple of {DIRECT_ALIGN}")
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            self.direct = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
        self._buf = mmap.mmap(-1, buffer_bytes)

    def read(self, offset: int, length: int) -> memoryview:
        """[offset, offset+length) of the file; OSError(EIO) when it ends before that."""
        if offset % DIRECT_ALIGN or length > len(self._buf):
            raise ValueError(f"read of {length} bytes at {offset}: unaligned or larger than the buffer")
        view = memoryview(self._buf)
        # A direct read asks for whole aligned blocks; at the end of the file it returns less.
        want = min(len(self._buf), -(-length // DIRECT_ALIGN) * DIRECT_ALIGN) if self.direct else length
        got = 0
        while got < length:
            try:
                n = os.preadv(self._fd, [view[got:want]], offset + got)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._read_buffered()  # a device whose blocks are larger than DIRECT_ALIGN
                return self.read(offset, length)
            if n == 0 or (self.direct and got + n < length and (got + n) % DIRECT_ALIGN):
                raise OSError(errno.EIO, f"short read at {offset + got + n}: the file ends early")
            got += n
        return view[:length]

    def _read_buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        os.close(self._fd)
        try:
            self._buf.close()
        except BufferError:  # a caller still holds a view: the mapping goes with it
            pass
