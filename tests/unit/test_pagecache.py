"""common/pagecache.py: a pass drops whole aligned spans behind it, never what a read returns."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from bench.common import uncache
from siterecovery.common import pagecache
from siterecovery.common.pagecache import DIRECT_ALIGN, DROP_ALIGN, DropBehind

from ..page_residency import PAGE, resident_pages

SPAN_PAGES = DROP_ALIGN // PAGE
DIRECT_BUFFER = 256 * 1024


def cached_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        assert os.pread(fd, size, 0) == data
    finally:
        os.close(fd)
    if resident_pages(path) != size // PAGE:
        pytest.skip("this file system keeps no droppable page cache (tmpfs?)")
    return data


def test_a_pass_drops_whole_spans_behind_it_and_finish_drops_the_rest(tmp_path: Path):
    path = tmp_path / "disk.img"
    cached_file(path, 4 * DROP_ALIGN)
    fd = os.open(path, os.O_RDONLY)
    try:
        behind = DropBehind(fd)
        behind.passed(2 * DROP_ALIGN - 1)  # the second span is not wholly behind yet
        assert resident_pages(path, 0, DROP_ALIGN) == 0
        assert resident_pages(path, DROP_ALIGN) == 3 * SPAN_PAGES
        behind.passed(3 * DROP_ALIGN)
        assert resident_pages(path) == SPAN_PAGES
        behind.finish()
        assert resident_pages(path) == 0
    finally:
        os.close(fd)


def test_a_restarted_pass_drops_from_its_new_position_only(tmp_path: Path):
    path = tmp_path / "disk.img"
    cached_file(path, 4 * DROP_ALIGN)
    fd = os.open(path, os.O_RDONLY)
    try:
        behind = DropBehind(fd, DROP_ALIGN + 5)  # starts inside the second span: from its start
        behind.passed(3 * DROP_ALIGN)
        assert resident_pages(path, 0, DROP_ALIGN) == SPAN_PAGES
        assert resident_pages(path, DROP_ALIGN, 2 * DROP_ALIGN) == 0
        assert resident_pages(path, 3 * DROP_ALIGN) == SPAN_PAGES
        behind.restart(0)
        behind.passed(DROP_ALIGN)
        assert resident_pages(path) == SPAN_PAGES  # the last span only
    finally:
        os.close(fd)


def test_dropping_dirty_pages_loses_nothing(tmp_path: Path):
    path = tmp_path / "disk.img"
    cached_file(path, 2 * DROP_ALIGN)
    fresh = os.urandom(DROP_ALIGN)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, fresh, 0)  # not synced: dirty pages
        pagecache.drop(fd, 0, 0)
        assert os.pread(fd, DROP_ALIGN, 0) == fresh
    finally:
        os.close(fd)


def test_a_descriptor_without_a_page_cache_is_ignored():
    read_end, write_end = os.pipe()
    try:
        pagecache.drop(read_end, 0, 0)
        DropBehind(write_end).passed(2 * DROP_ALIGN)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_direct_reader_reads_exactly_the_file_and_caches_none_of_it(tmp_path: Path):
    size = 3 * DIRECT_BUFFER + 5000  # the last read ends inside an aligned block
    path = tmp_path / "disk.img"
    data = os.urandom(size)
    path.write_bytes(data)
    uncache(path)
    if resident_pages(path) != 0:
        pytest.skip("this file system keeps pages it was asked to drop")
    reader = pagecache.DirectReader(path, DIRECT_BUFFER)
    try:
        assert reader.direct
        got = b"".join(bytes(reader.read(at, min(DIRECT_BUFFER, size - at))) for at in range(0, size, DIRECT_BUFFER))
        assert got == data
        assert resident_pages(path) == 0
        with pytest.raises(ValueError):
            reader.read(512, 4096)  # O_DIRECT needs aligned offsets
        with pytest.raises(OSError, match="ends early"):
            reader.read(3 * DIRECT_BUFFER, DIRECT_BUFFER)  # past the end of the file
    finally:
        reader.close()


def test_a_direct_reader_reads_through_the_cache_where_o_direct_is_refused():
    version = Path("/proc/version")  # procfs refuses O_DIRECT (EINVAL), and this file does not change
    expected = version.read_bytes()
    reader = pagecache.DirectReader(version, DIRECT_ALIGN)
    try:
        assert not reader.direct
        assert bytes(reader.read(0, len(expected))) == expected
    finally:
        reader.close()


def test_a_direct_read_refused_with_einval_goes_on_through_the_cache(tmp_path: Path, monkeypatch):
    # Say the device's logical blocks are larger than DIRECT_ALIGN: the kernel refuses the read.
    path = tmp_path / "disk.img"
    data = os.urandom(2 * DIRECT_BUFFER)
    path.write_bytes(data)
    reader = pagecache.DirectReader(path, DIRECT_BUFFER)
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    try:
        assert reader.direct
        monkeypatch.setattr(os, "preadv", preadv)
        assert bytes(reader.read(DIRECT_BUFFER, DIRECT_BUFFER)) == data[DIRECT_BUFFER:]
        assert not reader.direct
        assert bytes(reader.read(0, DIRECT_BUFFER)) == data[:DIRECT_BUFFER]
    finally:
        reader.close()
