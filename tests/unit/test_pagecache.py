"""common/pagecache.py: a pass drops whole aligned spans behind it, never what a read returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.common import pagecache
from siterecovery.common.pagecache import DROP_ALIGN, DropBehind

from ..page_residency import PAGE, resident_pages

SPAN_PAGES = DROP_ALIGN // PAGE


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
