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

A view's first index (`add_many`, every undo record newer than the point) is
not placed at once: each extent is appended, in journal order, to its chunk's
list of *unsettled* extents, and a chunk is settled (its extents placed by the
same first-wins rule, in the same order) when something first looks at it or
adds to it otherwise (`lookup`, `add_uncovered`, `remove`). Placing cost about
as much CPU per record as the whole journal scan besides (a bisect and two list
inserts in a chunk's lists, mostly cache misses for random writes), and most
chunks of a view are never read; so opening a view pays one append per record
and a read pays for the chunks it touches, once. The result is the same map:
settling a chunk replays its extents in the order they were added.
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
        # chunk number -> extents add_many gave it, in order, not placed yet (each within the chunk)
        self._unsettled: dict[int, list[Extent]] = {}
        self._extents = 0  # placed
        self._covered = 0
        self._unsettled_extents = 0
        self._unsettled_bytes = 0

    @property
    def extents(self) -> int:
        """Entries of the map: the placed extents, and each unsettled one as one (it may
        split in pieces, or vanish under an earlier one, when its chunk is settled)."""
        return self._extents + self._unsettled_extents

    @property
    def covered_bytes(self) -> int:
        """Bytes the entries cover: exact once settled (`settle`), an upper bound before
        (unsettled extents may overlap each other or placed ones)."""
        return self._covered + self._unsettled_bytes

    @property
    def settled(self) -> bool:
        """Whether every extent is placed, so `extents` and `covered_bytes` are exact."""
        return not self._unsettled

    def settle(self) -> None:
        """Place every unsettled extent (what a lookup of the whole disk would do)."""
        for chunk in list(self._unsettled):
            self._settle(chunk)

    def _settle(self, chunk: int) -> None:
        """Place the extents add_many left unsettled in `chunk`, in the order they came."""
        pending = self._unsettled.pop(chunk, None)
        if pending is None:
            return
        count = covered = 0
        found = self._chunks.get(chunk)
        if found is None:
            found = self._chunks[chunk] = ([], [])
        starts, extents = found
        for extent in pending:
            start, end = extent[0], extent[1]
            self._unsettled_extents -= 1
            self._unsettled_bytes -= end - start
            if not extents or extents[-1][1] <= start:  # past the last one
                starts.append(start)
                extents.append(extent)
                count += 1
                covered += end - start
                continue
            i = bisect_right(starts, start)
            if (i == 0 or extents[i - 1][1] <= start) and (i == len(starts) or starts[i] >= end):
                starts.insert(i, start)
                extents.insert(i, extent)
                count += 1
                covered += end - start
                continue
            for a, b in _gaps(starts, extents, start, end):
                j = bisect_right(starts, a)
                starts.insert(j, a)
                offset = extent[3]
                extents.insert(j, (a, b, extent[2], offset if offset == ZEROS else offset + (a - start), extent[4]))
                count += 1
                covered += b - a
        self._extents += count
        self._covered += covered

    def add_uncovered(self, start: int, end: int, segment: int, offset: int, record: int = -1) -> list[tuple[int, int]]:
        """Give the not yet covered parts of [start, end) the source (segment, offset of
        `start`, or ZEROS) and `record`; returns the pieces added (for `remove`)."""
        if self._unsettled:
            for chunk in range(start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
                self._settle(chunk)
        chunk = start >> CHUNK_SHIFT
        if (end - 1) >> CHUNK_SHIFT == chunk:  # the common cases first: within one chunk, no overlap
            found = self._chunks.get(chunk)
            if found is None:
                self._chunks[chunk] = ([start], [(start, end, segment, offset, record)])
                self._extents += 1
                self._covered += end - start
                return [(start, end)]
            starts, extents = found
            i = bisect_right(starts, start)
            if (i == 0 or extents[i - 1][1] <= start) and (i == len(starts) or starts[i] >= end):
                starts.insert(i, start)
                extents.insert(i, (start, end, segment, offset, record))
                self._extents += 1
                self._covered += end - start
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
                self._extents += 1
                self._covered += b - a
            added.extend(gaps)
        return added

    def add_many(self, extents: Iterable[Extent]) -> None:
        """`add_uncovered` of each extent in order, when the pieces added are not needed
        (a view's first index): each is appended to its chunk's unsettled list, placed
        when the chunk is first looked at (module docstring). The extent's own tuple is
        kept (no new one) unless it crosses a chunk boundary (then one piece a chunk)."""
        unsettled = self._unsettled
        count = covered = 0
        for extent in extents:
            start, end = extent[0], extent[1]
            chunk = start >> CHUNK_SHIFT
            if (end - 1) >> CHUNK_SHIFT == chunk:
                pending = unsettled.get(chunk)
                if pending is None:
                    unsettled[chunk] = [extent]
                else:
                    pending.append(extent)
                count += 1
                covered += end - start
                continue
            segment, offset, record = extent[2], extent[3], extent[4]
            for part in range(chunk, ((end - 1) >> CHUNK_SHIFT) + 1):
                lo = max(start, part << CHUNK_SHIFT)
                hi = min(end, (part + 1) << CHUNK_SHIFT)
                piece = (lo, hi, segment, offset if offset == ZEROS else offset + (lo - start), record)
                unsettled.setdefault(part, []).append(piece)
                count += 1
                covered += hi - lo
        self._unsettled_extents += count
        self._unsettled_bytes += covered

    def remove(self, pieces: list[tuple[int, int]]) -> None:
        """Forget extents `add_uncovered` returned (whole pieces only)."""
        for a, b in pieces:
            self._settle(a >> CHUNK_SHIFT)  # pieces add_uncovered returned are placed; a no-op then
            starts, extents = self._chunks[a >> CHUNK_SHIFT]
            i = bisect_right(starts, a) - 1
            assert i >= 0 and extents[i][0] == a and extents[i][1] == b, "not a piece add_uncovered returned"
            del starts[i]
            del extents[i]
            self._extents -= 1
            self._covered -= b - a

    def lookup(self, start: int, end: int) -> list[Extent]:
        """The covered parts of [start, end), in order, clipped to it."""
        out: list[Extent] = []
        unsettled = self._unsettled
        for chunk in range(start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
            if unsettled and chunk in unsettled:
                self._settle(chunk)
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
