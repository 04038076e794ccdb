"""Which pages of a file the page cache holds (mincore(2) over a mapping: nothing is read)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: Path, offset: int = 0, length: int | None = None) -> int:
    """How many pages of [offset, offset + length) (default: to the end) the page cache holds."""
    start = offset - offset % PAGE
    end = os.path.getsize(path) if length is None else offset + length
    if end <= start:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer((end - start + PAGE - 1) // PAGE)
            if _libc.mincore(addr, end - start, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(byte & 1 for byte in vec.raw)
        finally:
            _libc.munmap(addr, end - start)
    finally:
        os.close(fd)
