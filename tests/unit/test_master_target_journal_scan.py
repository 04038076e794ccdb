"""The point views' journal scan (journal.undo_extents_after, _RecordScanner) on real journals.

Every test writes a real UndoJournal, scans it with the piece size cut small and
odd (records, and even headers, cut across pieces) and compares what the scan
found with the journal's other reader (`undo_after`: a header pass, then every
record read and checked on its own), or checks that damage is reported with the
segment and offset and nothing is returned for it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from siterecovery.agents.master_target import journal
from siterecovery.agents.master_target.extentmap import ExtentMap
from siterecovery.common import errors

KiB = 1024
SEGMENT = 96 * KiB


def _write(directory: Path, records: int, seed: int) -> journal.UndoJournal:
    """A closed-and-reopened journal of `records` undo records of mixed sizes (some zeros,
    some of a few bytes, one larger than a piece), a commit every few of them."""
    rng = random.Random(seed)
    state = {"applied_seq": 0, "newest_captured_at_ns": 0, "points": []}
    undo = journal.UndoJournal(directory, segment_bytes=SEGMENT, reserve_bytes=0)
    undo.open(state)
    for seq in range(1, records + 1):
        length = rng.choice((1, 7, 512, 4096, 16 * KiB, 40 * KiB if seq == records // 2 else 4096))
        old = None if rng.random() < 0.15 else rng.randbytes(length)
        undo.append_undo(seq, rng.randrange(0, 1 << 20), length, old)
        if seq % 3 == 0 or seq == records:
            delta = {"applied_seq": seq, "newest_captured_at_ns": seq, "points_added": []}
            undo.commit(delta)
            state = journal.merge(state, delta)
            undo.maybe_rotate(state)
    undo.close()
    reopened = journal.UndoJournal(directory, segment_bytes=SEGMENT, reserve_bytes=0)
    reopened.open({"applied_seq": 0, "points": []})
    return reopened


def _scan(undo: journal.UndoJournal, after: int) -> list[journal.UndoExtent]:
    out: list[journal.UndoExtent] = []
    for _segment, _read, found in undo.undo_extents_after(after, undo.cut(), list(undo.segments)):
        out += found
    return out


def _expected(undo: journal.UndoJournal, after: int) -> list[journal.UndoExtent]:
    """The same, from undo_after (newest first there), each record's data read and checked."""
    out = []
    with undo.reading():
        for ref, data in undo.undo_after(after, undo.cut()):
            assert (data is None) == ref.zeros
            source = journal.UNDO_ZEROS if ref.zeros else ref.data_offset
            record = journal.UNDO_CHECKED if ref.zeros else ref.offset  # data: checked at first read
            out.append((ref.target_offset, ref.target_offset + ref.length, ref.segment, source, record))
    return out[::-1]


@pytest.mark.parametrize("piece", [4 * 1024 * 1024, 64 * KiB, 4099, 23], ids=["default", "64k", "4099", "23"])
def test_the_scan_finds_what_the_journal_holds_whatever_the_piece_size(tmp_path: Path, monkeypatch, piece: int):
    monkeypatch.setattr(journal, "_SCAN_CHUNK", piece)
    undo = _write(tmp_path / "j", records=120, seed=3)
    assert len(undo.segments) > 3
    for after in (0, 1, 40, 119, 120):
        if undo.segments[0].applied_seq > after:
            continue
        found = _scan(undo, after)
        assert found == _expected(undo, after)
        assert len(found) == 120 - after
    undo.close()


def test_the_scan_reads_every_byte_and_the_old_data_is_where_it_says(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(journal, "_SCAN_CHUNK", 5000)
    undo = _write(tmp_path / "j", records=60, seed=5)
    read = sum(n for _s, n, _f in undo.undo_extents_after(0, undo.cut(), list(undo.segments)))
    assert read == undo.size_bytes
    with undo.reading():
        data = {(r.target_offset, r.segment, r.data_offset): d for r, d in undo.undo_after(0, undo.cut())}
    for start, end, segment, source, _record in _scan(undo, 0):
        if source == journal.UNDO_ZEROS:
            continue
        with open(undo.segment_path(segment), "rb") as f:
            f.seek(source)
            assert f.read(end - start) == data[(start, segment, source)]
    undo.close()


def _flip(path: Path, offset: int, bit: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ bit]))


def _records(undo: journal.UndoJournal, number: int) -> list[journal.UndoRef]:
    segment = next(s for s in undo.segments if s.number == number)
    fd = os.open(segment.path, os.O_RDONLY)
    try:
        return list(undo._refs(segment, fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


# Every byte of an undo record's header and fields but the body checksum (checked with the
# data, at the first read): (name, offset in the record). The 3 zero bytes after the kind
# are not read by anything.
_HEADER_BYTES = [("magic", 0), ("kind", 4), ("length", 9), ("length-high", 11), ("seq", 20), ("target-offset", 29),
                 ("undo-length", 37), ("flags-zeros", 44), ("flags-sum", 44), ("fields-pad", 46), ("fields-sum", 49)]


@pytest.mark.parametrize("where", [name for name, _ in _HEADER_BYTES])
@pytest.mark.parametrize("piece", [4 * 1024 * 1024, 4099], ids=["default", "4099"])
def test_a_damaged_header_is_found_when_the_segment_is_scanned(tmp_path: Path, monkeypatch, where: str, piece: int):
    """What the index is built from is checked at open, without the data: any damaged byte
    of it is reported with the record's place, never indexed."""
    monkeypatch.setattr(journal, "_SCAN_CHUNK", piece)
    undo = _write(tmp_path / "j", records=90, seed=7)
    number = undo.segments[1].number
    ref = next(r for r in _records(undo, number) if not r.zeros and r.length > 100)
    bit = {"flags-zeros": 0x01, "flags-sum": 0x02}.get(where, 0x01)
    _flip(undo.segment_path(number), ref.offset + dict(_HEADER_BYTES)[where], bit)
    with pytest.raises(errors.Integrity) as raised:
        _scan(undo, 0)
    assert raised.value.code == "journal-corrupt"
    assert f"{undo.segment_path(number)} is damaged at offset {ref.offset}" in str(raised.value)
    undo.close()


@pytest.mark.parametrize("where", ["data", "body-checksum"])
def test_damaged_data_is_left_to_the_first_read_and_found_there(tmp_path: Path, where: str):
    """The scan does not hash the data of a record with a fields sum; check_undo does, and
    names the segment and the record."""
    undo = _write(tmp_path / "j", records=90, seed=7)
    number = undo.segments[1].number
    ref = next(r for r in _records(undo, number) if not r.zeros and r.length > 100)
    _flip(undo.segment_path(number), ref.data_offset + ref.length // 2 if where == "data" else ref.offset + 13)
    found = _scan(undo, 0)
    assert [e for e in found if e[2] == number and e[4] == ref.offset]  # indexed, to be checked
    fd = os.open(undo.segment_path(number), os.O_RDONLY)
    try:
        with pytest.raises(errors.Integrity) as raised:
            journal.check_undo(fd, undo.segment_path(number), ref.offset)
        for other in _records(undo, number):
            if other.offset != ref.offset and not other.zeros:
                journal.check_undo(fd, undo.segment_path(number), other.offset)
    finally:
        os.close(fd)
    assert raised.value.code == "journal-corrupt"
    assert f"{undo.segment_path(number)} is damaged at offset {ref.offset}" in str(raised.value)
    undo.close()


def _as_before_fields_sums(undo: journal.UndoJournal) -> None:
    """Rewrite every undo record in place as written before fields sums (flags bit 1 clear,
    the 4 bytes zero, the checksum over that)."""
    for segment in undo.segments:
        for ref in _records(undo, segment.number):
            with open(segment.path, "r+b") as f:
                f.seek(ref.offset + journal._HEAD.size)
                body = bytearray(f.read(ref.body_length))
                body[24] &= ~journal.FLAG_FIELDS_SUM
                body[28:32] = bytes(4)
                f.seek(ref.offset)
                f.write(journal._HEAD.pack(journal.MAGIC, journal.KIND_UNDO, len(body),
                                           journal._checksum(journal.KIND_UNDO, len(body), body)) + body)


def test_records_without_a_fields_sum_are_checked_whole_at_open(tmp_path: Path, monkeypatch):
    """A journal written before fields sums: every record's data is hashed by the scan, as
    before, and a damaged one fails the scan; nothing is left to the first read."""
    monkeypatch.setattr(journal, "_SCAN_CHUNK", 4099)
    undo = _write(tmp_path / "j", records=90, seed=7)
    _as_before_fields_sums(undo)
    found = _scan(undo, 0)
    assert len(found) == 90 and all(e[4] == journal.UNDO_CHECKED for e in found)
    assert [e[:4] for e in found] == [e[:4] for e in _expected(undo, 0)]
    number = undo.segments[1].number
    ref = next(r for r in _records(undo, number) if not r.zeros and r.length > 100)
    _flip(undo.segment_path(number), ref.data_offset + ref.length // 2)
    with pytest.raises(errors.Integrity) as raised:
        _scan(undo, 0)
    assert f"{undo.segment_path(number)} is damaged at offset {ref.offset}" in str(raised.value)
    undo.close()


def test_a_segment_cut_short_is_damage_not_an_end(tmp_path: Path, monkeypatch):
    """An older segment that lost its tail (a record cut in half): reported, never skipped."""
    monkeypatch.setattr(journal, "_SCAN_CHUNK", 4099)
    undo = _write(tmp_path / "j", records=60, seed=9)
    first = undo.segments[0]
    last = _records(undo, first.number)[-1]
    os.truncate(first.path, last.offset + 30)
    with pytest.raises(errors.Integrity) as raised:
        _scan(undo, 0)
    assert raised.value.code == "journal-corrupt"
    undo.close()


def test_an_undo_record_too_short_for_its_fields_is_damage(tmp_path: Path):
    """A record whose checksum is right but whose body cannot hold the undo fields."""
    undo = _write(tmp_path / "j", records=6, seed=11)
    segment = undo.segments[-1]
    body = b"\x00" * 10
    head = journal._HEAD.pack(journal.MAGIC, journal.KIND_UNDO, len(body),
                              journal._checksum(journal.KIND_UNDO, len(body), body))
    with open(segment.path, "ab") as f:
        f.write(head + body)
    end = segment.path.stat().st_size
    with pytest.raises(errors.Integrity):
        list(undo.undo_extents_after(0, journal.Cut(segment.number, end), list(undo.segments)))
    undo.close()


def test_add_many_keeps_the_first_source_of_every_byte(tmp_path: Path):
    """add_many equals add_uncovered one by one, overlaps and chunk crossings included."""
    rng = random.Random(13)
    extents = []
    for n in range(3000):
        start = rng.randrange(0, 8 << 20)
        length = rng.choice((1, 4096, 16384, 70_000, 3 << 20))
        extents.append((start, start + length, n % 5, journal.UNDO_ZEROS if n % 7 == 0 else n * 100_000, n))
    one, many = ExtentMap(), ExtentMap()
    for e in extents:
        one.add_uncovered(*e)
    many.add_many(extents)
    assert one.lookup(0, 12 << 20) == many.lookup(0, 12 << 20)
    assert (one.extents, one.covered_bytes) == (many.extents, many.covered_bytes)


def test_unsettled_extents_settle_as_if_added_one_by_one():
    """add_many leaves its extents unsettled until a chunk is used: lookups of parts, later
    add_uncovered calls and their removal in between give what add_uncovered one by one gives."""
    rng = random.Random(17)
    one, lazy = ExtentMap(), ExtentMap()
    n = 0
    for _round in range(6):
        batch = []
        for _ in range(500):
            start = rng.randrange(0, 8 << 20)
            length = rng.choice((1, 4096, 16384, 70_000, 3 << 20))
            batch.append((start, start + length, n % 5, journal.UNDO_ZEROS if n % 7 == 0 else n * 100_000, n))
            n += 1
        for e in batch:
            one.add_uncovered(*e)
        lazy.add_many(batch)
        assert lazy.extents >= 1 and lazy.covered_bytes >= one.covered_bytes  # an upper bound until settled
        for _ in range(20):  # settles some chunks only
            a = rng.randrange(0, 12 << 20)
            b = a + rng.choice((1, 4096, 1 << 20, 3 << 20))
            assert one.lookup(a, b) == lazy.lookup(a, b)
        start = rng.randrange(0, 8 << 20)  # an add of the apply path, then its rollback
        e = (start, start + 2_000_000, 9, 42, n)
        n += 1
        pieces = one.add_uncovered(*e)
        assert lazy.add_uncovered(*e) == pieces
        if rng.random() < 0.5:
            one.remove(pieces)
            lazy.remove(pieces)
    lazy.settle()
    assert one.lookup(0, 12 << 20) == lazy.lookup(0, 12 << 20)
    assert (one.extents, one.covered_bytes) == (lazy.extents, lazy.covered_bytes)


def test_append_undos_writes_a_group_past_iov_max_like_single_appends(tmp_path: Path, monkeypatch):
    """A group's records go in one write, cut at IOV_MAX buffers: after a reopen every record
    reads back with its old contents, in order, and as committed."""
    monkeypatch.setattr(journal, "_IOV_MAX", 7)  # 3 buffers a record: chunks cut inside records
    rng = random.Random(5)
    undo = journal.UndoJournal(tmp_path, segment_bytes=1 << 30, reserve_bytes=0)
    undo.open({"applied_seq": 0, "newest_captured_at_ns": 0, "points": []})
    records = [(seq, rng.randrange(0, 1 << 20), n, None if seq % 5 == 0 else rng.randbytes(n))
               for seq, n in enumerate((rng.choice((1, 512, 16 * KiB)) for _ in range(40)), start=1)]
    refs = undo.append_undos(records)
    assert [r.seq for r in refs] == list(range(1, 41)) and undo.pending_records == 40
    undo.commit({"applied_seq": 40, "newest_captured_at_ns": 40, "points_added": []})
    undo.close()
    reopened = journal.UndoJournal(tmp_path, segment_bytes=1 << 30, reserve_bytes=0)
    state, uncommitted = reopened.open({"applied_seq": 0, "points": []})
    assert state["applied_seq"] == 40 and uncommitted == []
    with reopened.reading():
        got = sorted(((ref.seq, ref.target_offset, ref.length, data) for ref, data in reopened.undo_after(0, reopened.cut())))
    assert got == records
    reopened.close()
