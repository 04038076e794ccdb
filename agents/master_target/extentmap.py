"""Which byte ranges of a disk a point view reads from the undo journal, and from where.

An `ExtentMap` holds disjoint extents `[start, end)` of the disk, each with the
place of its bytes: a journal segment and the offset there of the extent's
first byte, or ZEROS; and the record they belong to (an opaque number kept
with every piece of the extent: the view checks that record at its first
read, see pitview.py). It only ever fills gaps (`add_uncovered`): a range
already covered keeps its source. That is the rule a view needs - for every
byte the *first* pre-image after the point wins - when undo records are fed in
journal order, oldest first.

The extents are kept per 1 MiB chunk of the disk (a dict of small sorted
lists, an extent never crossing a chunk boundary), so inserting stays cheap
however many extents there are: one big sorted list would move half of itself
on every insert.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

CHUNK_SHIFT = 20
CHUNK = 1 << CHUNK_SHIFT
ZEROS = -1  # the source of an extent whose old contents were zeros

# (start, end, segment, journal offset of `start` or ZEROS, record)
Extent = tuple[int, int, int, int, int]


class ExtentMap:
    def __init__(self) -> None:
        # chunk number -> (starts, extents), both sorted by start
        self._chunks: dict[int, tuple[list[int], list[Extent]]] = {}
        self.extents = 0
        self.covered_bytes = 0

    def add_uncovered(self, start: int, end: int, segment: int, offset: int, record: int = -1) -> list[tuple[int, int]]:
        """Give the not yet covered parts of [start, end) the source (segment, offset of
        `start`, or ZEROS) and `record`; returns the pieces added (for `remove`)."""
        chunk = start >> CHUNK_SHIFT
        if (end - 1) >> CHUNK_SHIFT == chunk:  # the common cases first: within one chunk, no overlap
            found = self._chunks.get(chunk)
            if found is None:
                self._chunks[chunk] = ([start], [(start, end, segment, offset, record)])
                self.extents += 1
                self.covered_bytes += end - start
                return [(start, end)]
            starts, extents = found
            i = bisect_right(starts, start)
            if (i == 0 or extents[i - 1][1] <= start) and (i == len(starts) or starts[i] >= end):
                starts.insert(i, start)
                extents.insert(i, (start, end, segment, offset, record))
                self.extents += 1
                self.covered_bytes += end - start
                return [(start, end)]
        added: list[tuple[int, int]] = []
        for chunk in range(start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
            lo = max(start, chunk << CHUNK_SHIFT)
            hi = min(end, (chunk + 1) << CHUNK_SHIFT)
            starts, extents = self._chunks.setdefault(chunk, ([], []))
            gaps = _gaps(starts, extents, lo, hi)
            for a, b in gaps:
                i = bisect_right(starts, a)
                starts.insert(i, a)
                extents.insert(i, (a, b, segment, offset if offset == ZEROS else offset + (a - start), record))
                self.extents += 1
                self.covered_bytes += b - a
            added.extend(gaps)
        return added

    def add_many(self, extents: Iterable[Extent]) -> None:
        """`add_uncovered` of each extent in order, when the pieces added are not needed:
        the common case (within one chunk, no overlap) inline, for a view's first index.
        The extent's own tuple is stored (no new one), and an extent past every other of
        its chunk (the common case when writes go forward) is appended without a search."""
        chunks, add = self._chunks, self.add_uncovered
        count = covered = 0
        for extent in extents:
            start, end = extent[0], extent[1]
            chunk = start >> CHUNK_SHIFT
            if (end - 1) >> CHUNK_SHIFT == chunk:
                found = chunks.get(chunk)
                if found is None:
                    chunks[chunk] = ([start], [extent])
                    count += 1
                    covered += end - start
                    continue
                starts, extents_ = found
                if not extents_ or extents_[-1][1] <= start:  # past the last one
                    starts.append(start)
                    extents_.append(extent)
                    count += 1
                    covered += end - start
                    continue
                i = bisect_right(starts, start)
                if (i == 0 or extents_[i - 1][1] <= start) and starts[i] >= end:
                    starts.insert(i, start)
                    extents_.insert(i, extent)
                    count += 1
                    covered += end - start
                    continue
            add(*extent)
        self.extents += count
        self.covered_bytes += covered

    def remove(self, pieces: list[tuple[int, int]]) -> None:
        """Forget extents `add_uncovered` returned (whole pieces only)."""
        for a, b in pieces:
            starts, extents = self._chunks[a >> CHUNK_SHIFT]
            i = bisect_right(starts, a) - 1
            assert i >= 0 and extents[i][0] == a and extents[i][1] == b, "not a piece add_uncovered returned"
            del starts[i]
            del extents[i]
            self.extents -= 1
            self.covered_bytes -= b - a

    def lookup(self, start: int, end: int) -> list[Extent]:
        """The covered parts of [start, end), in order, clipped to it."""
        out: list[Extent] = []
        for chunk in range(start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
            found = self._chunks.get(chunk)
            if not found:
                continue
            starts, extents = found
            lo = max(start, chunk << CHUNK_SHIFT)
            hi = min(end, (chunk + 1) << CHUNK_SHIFT)
            i = max(bisect_right(starts, lo) - 1, 0)
            while i < len(extents) and extents[i][0] < hi:
                a, b, segment, offset, record = extents[i]
                i += 1
                if b <= lo:
                    continue
                ca, cb = max(a, lo), min(b, hi)
                out.append((ca, cb, segment, offset if offset == ZEROS else offset + (ca - a), record))
        return out


def _gaps(starts: list[int], extents: list[Extent], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) no extent of one chunk covers."""
    gaps: list[tuple[int, int]] = []
    i = bisect_right(starts, lo)
    pos = lo
    if i > 0 and extents[i - 1][1] > pos:
        pos = extents[i - 1][1]
    while pos < hi:
        if i < len(extents) and extents[i][0] < hi:
            a, b = extents[i][0], extents[i][1]
            if a > pos:
                gaps.append((pos, a))
            pos = max(pos, b)
            i += 1
        else:
            gaps.append((pos, hi))
            pos = hi
    return gaps
