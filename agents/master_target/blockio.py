"""Block I/O on target disks and their copies: sparse reads, zeroing, sparse copies.

Everything here works on raw file descriptors with positional I/O (`pread`,
`pwrite`, `copy_file_range` with explicit offsets), so one descriptor can be
shared by threads without a file position to race on.

Zeroing a range punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), which
reads back as zeros and frees the blocks; where the file system or a block
device cannot do that, zeros are written.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from siterecovery.common.daemon import fsync_dir

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
IO_CHUNK = 8 * 1024 * 1024
# Linux caps one POSIX_FADV_WILLNEED at the device's readahead size (read_ahead_kb, 128 KiB by
# default) and silently drops the rest: `read_ahead` asks in pieces no larger than that.
READ_AHEAD_CHUNK = 128 * 1024
_ZEROS = bytes(1024 * 1024)
# fallocate cannot punch here: write zeros instead.
_NO_PUNCH = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.EINVAL, errno.ENOTTY}
# copy_file_range cannot copy between these two files: read and write instead.
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories survive a power cut (each parent is flushed)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False when the file cannot do that."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_PUNCH:
        return False
    raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_ahead(fd: int, offset: int, length: int, chunk: int = READ_AHEAD_CHUNK) -> None:
    """Start reading [offset, offset+length) into the page cache, in large sequential I/O,
    without waiting: later small or backward reads of it then find it there. A hint only.
    `chunk`: the most one hint asks for (see `read_ahead_chunk`)."""
    end = offset + length
    for start in range(offset, end, chunk):
        os.posix_fadvise(fd, start, min(chunk, end - start), os.POSIX_FADV_WILLNEED)


def read_ahead_chunk(fd: int) -> int:
    """The most one POSIX_FADV_WILLNEED reads on the device holding `fd`'s file: Linux caps
    it at the larger of the device's read-ahead and its largest request (read_ahead_kb,
    max_sectors_kb in sysfs), READ_AHEAD_CHUNK when those cannot be read. Fewer, larger
    hints matter on a thread that takes the GIL again between two of them."""
    dev = os.fstat(fd).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (base / "queue", base / ".." / "queue"):  # a disk, or a partition of one
        try:
            kib = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return max(READ_AHEAD_CHUNK, kib * 1024)
    return READ_AHEAD_CHUNK


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros."""
    if punch_hole(fd, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


def pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read at {offset + got}: the file ends early")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `offset` (no allocation: for reads into a reused buffer)."""
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise OSError(errno.EIO, f"short read at {offset}: the file ends early")
        buf = buf[n:]
        offset += n


def is_zero(data: bytes | bytearray) -> bool:
    # Most blocks are not zeros, and their first or last byte says so without a pass over them.
    if data and (data[0] or data[-1]):
        return False
    return data.count(0) == len(data)


def read_range(fd: int, offset: int, length: int) -> bytes | None:
    """The bytes of a range, or None when it reads as zeros (a hole costs no read)."""
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole from `offset` to the end
            return None
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        data_at = offset
    if data_at >= offset + length:
        return None
    data = pread_all(fd, length, offset)
    return None if is_zero(data) else data


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy [offset, offset+length) of `src` to the same place in `dst` (in kernel when possible)."""
    end = offset + length
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, min(end - offset, 1 << 30), offset, offset)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            break
        if n == 0:
            break
        offset += n
    while offset < end:
        n = min(IO_CHUNK, end - offset)
        pwrite_all(dst, pread_all(src, n, offset), offset)
        offset += n


def data_extents(fd: int, size: int):
    """(offset, length) of every range of `fd` below `size` that may hold data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            yield pos, size - pos  # no hole information: everything may be data
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def copy_sparse(src: int, dst: int, size: int) -> int:
    """Copy `size` bytes of `src` into the (empty) `dst`, keeping holes; returns bytes copied."""
    os.ftruncate(dst, size)
    copied = 0
    for offset, length in data_extents(src, size):
        copy_range(src, dst, offset, length)
        copied += length
    return copied


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
