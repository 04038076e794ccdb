"""Point views (pitview.py): an older point read through the target and the undo journal.

Real PairTargets on tmp files, real journals, and - through the master target's
RPCs - the real read-only NBD server read by nbdcopy and qemu-io. Every check
of contents is a SHA-256 against an in-memory reference disk (mt_support).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
from array import array
from pathlib import Path

import grpc
import pytest

from siterecovery.agents.master_target import journal, pitview
from siterecovery.agents.master_target import materialize as materializing
from siterecovery.agents.master_target.extentmap import ZEROS, ExtentMap
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import errors, frames
from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import (
    T0,
    Harness,
    KiB,
    MiB,
    Reference,
    digest,
    make_stream,
    rpc_error,
    send,
    sha256,
    tag_hashes,
)

DISK = 4 * MiB
OPTIONS = TargetOptions(batch_frames=16, segment_bytes=128 * KiB, reserve_bytes=0, prune_interval=1e9)


# -- the index ---------------------------------------------------------------------------


def test_extent_map_keeps_the_first_source_of_every_byte():
    """Against a per-byte model: random ranges (some across 1 MiB chunks), added, some removed."""
    rng = random.Random(7)
    size = 3 * MiB
    model = array("i", [-1]) * size  # which add covered the byte first (-1: none)
    emap = ExtentMap()

    def n_of(segment: int) -> int:  # the record each add named, kept with every piece of it
        return segment + 1000

    for n in range(400):
        length = rng.choice((1, 511, 4096, 70_000, rng.randrange(1, 2 * MiB)))
        start = rng.randrange(0, size - length + 1)
        pieces = emap.add_uncovered(start, start + length, n, n * 10_000_000, n + 1000)
        for a, b in pieces:
            assert model[a:b].count(-1) == b - a
            model[a:b] = array("i", [n]) * (b - a)
        if rng.random() < 0.1:  # roll back this add (a discarded batch)
            emap.remove(pieces)
            for a, b in pieces:
                model[a:b] = array("i", [-1]) * (b - a)
        else:
            assert model[start : start + length].count(-1) == 0
    assert emap.covered_bytes == size - model.count(-1)
    for _ in range(200):
        start = rng.randrange(0, size)
        end = min(size, start + rng.choice((1, 4096, 3 * MiB)))
        pos = start
        for a, b, segment, offset, record in emap.lookup(start, end):
            assert record == n_of(segment)
            assert pos <= a < b <= end
            assert model[pos:a].count(-1) == a - pos
            assert model[a:b].count(segment) == b - a
            assert offset != ZEROS and offset >= segment * 10_000_000
            pos = b
        assert model[pos:end].count(-1) == end - pos


# -- views of a PairTarget ---------------------------------------------------------------


def _target(tmp_path: Path, pair_id: str = "p1") -> PairTarget:
    target = PairTarget(pair_id=pair_id, target_path=tmp_path / "ds" / f"{pair_id}.img",
                        journal_dir=tmp_path / "ret" / pair_id, disk_size=DISK, options=OPTIONS)
    target.open()
    return target


def _apply(target: PairTarget, stream: list[rpb.Frame], batch: int = 7) -> None:
    for i in range(0, len(stream), batch):
        target.apply([(f, frames.payload(f)) for f in stream[i : i + batch]])


def _read_all(view: pitview.PointView, piece: int = 300 * KiB + 17) -> str:
    """The view read whole in odd-sized pieces (ranges that start and end inside extents)."""
    buf = bytearray()
    for offset in range(0, view.size, piece):
        buf += view.read(offset, min(piece, view.size - offset))
    return digest(buf)


@pytest.mark.parametrize("scan_chunk", [8 * MiB, 4099], ids=["default", "records-larger-than-a-read"])
def test_every_point_reads_back_as_the_disk_at_it(tmp_path: Path, monkeypatch, scan_chunk: int):
    monkeypatch.setattr(journal, "_SCAN_CHUNK", scan_chunk)
    stream = make_stream("p1", seed=11, disk_size=DISK, count=400)
    target = _target(tmp_path)
    _apply(target, stream)
    expected = tag_hashes(stream, DISK)
    assert len(target.state["points"]) >= 10
    for tag, (seq, wanted) in expected.items():
        view = pitview.open_view(target, tag, f"v-{tag}")
        assert (view.tag_id, view.seq) == (tag, seq)
        assert _read_all(view) == wanted, tag
        pitview.close_view(target, view)
    latest = pitview.open_view(target, "latest", "v-latest")
    assert latest.seq == target.applied_seq and _read_all(latest) == sha256(target.target_path)
    pitview.close_view(target, latest)
    assert target.views == {} and target.journal.pinned_seqs == []
    target.close()


def test_a_view_keeps_its_point_while_replication_goes_on(tmp_path: Path):
    """Frames keep being applied (and a batch fails half-written and is rolled back) while
    a reader thread reads the view over and over: every read equals the point."""
    first = make_stream("p1", seed=21, disk_size=DISK, count=200)
    target = _target(tmp_path)
    _apply(target, first)
    tag, (seq, wanted) = list(tag_hashes(first, DISK).items())[-1]
    view = pitview.open_view(target, tag, "v1")
    more = make_stream("p1", seed=22, disk_size=DISK, count=300, sync=False, start_seq=first[-1].seq + 1,
                       t0=T0 + 1000)
    digests: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                digests.append(_read_all(view, piece=1 * MiB + 4097))
            except OSError:  # closed with its pair (below) before the next one is opened
                continue

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        _apply(target, more[:150])
        # A batch that fails after part of it reached the target: put back, then discarded.
        failing = [(f, frames.payload(f)) for f in more[150:160]]
        written = [0]

        def hook(step: str) -> None:
            if step == "target-frame":
                written[0] += 1
                if written[0] == 3:
                    raise RuntimeError("the datastore went away")

        target.crash_hook = hook
        with pytest.raises(errors.Unavailable):
            target.apply(failing)
        target.crash_hook = None
        assert _read_all(view) == wanted
        target.ensure_ready()  # reopened: its views are closed with it
        assert view.closed and target.views == {}
        view = pitview.open_view(target, tag, "v2")
        _apply(target, more[150:])
    finally:
        stop.set()
        thread.join()
    assert digests and set(digests) == {wanted}
    assert _read_all(view) == wanted
    final = Reference(DISK)
    for frame in [*first, *more]:
        final.apply(frame)
    assert sha256(target.target_path) == final.digest()  # the target itself went on
    pitview.close_view(target, view)
    target.close()


def test_records_appended_while_the_index_is_built_count_after_it(tmp_path: Path, monkeypatch):
    """Batches applied (one committed, one rolled back half-written) between two pieces of
    the index build: they wait in the view's late list, and the view is still the point."""
    first = make_stream("p1", seed=101, disk_size=DISK, count=250)
    target = _target(tmp_path)
    _apply(target, first)
    tag, (_seq, wanted) = next(iter(tag_hashes(first, DISK).items()))
    more = make_stream("p1", seed=102, disk_size=DISK, count=60, sync=False, start_seq=first[-1].seq + 1,
                       t0=T0 + 1000)
    real = journal.UndoJournal.undo_extents_after
    meddled = []

    def meddling(self, *args):
        for n, piece in enumerate(real(self, *args)):
            yield piece
            if n == 0:
                _apply(target, more[:30])
                target.crash_hook = _fail_at_third_frame()
                with pytest.raises(errors.Unavailable):
                    target.apply([(f, frames.payload(f)) for f in more[30:40]])
                target.crash_hook = None
                meddled.append(True)

    monkeypatch.setattr(journal.UndoJournal, "undo_extents_after", meddling)
    view = pitview.open_view(target, tag, "v1")
    assert meddled and _read_all(view) == wanted
    pitview.close_view(target, view)
    target.close()


def _fail_at_third_frame():
    written = [0]

    def hook(step: str) -> None:
        if step == "target-frame":
            written[0] += 1
            if written[0] == 3:
                raise RuntimeError("the datastore went away")

    return hook


def test_pruning_keeps_what_a_view_needs_and_closing_releases_it(tmp_path: Path):
    stream = make_stream("p1", seed=31, disk_size=DISK, count=500)
    target = _target(tmp_path)
    _apply(target, stream)
    tags = tag_hashes(stream, DISK)
    tag, (seq, wanted) = list(tags.items())[len(tags) // 2]
    view = pitview.open_view(target, tag, "v1")
    segments_before = sorted(p.name for p in target.journal_dir.glob("*.seg"))
    assert len(segments_before) > 3
    target.retention_window = 0  # everything is past the window
    with target.lock:
        removed = target.prune_locked(T0 + 10**6)
    kept = sorted(p.name for p in target.journal_dir.glob("*.seg"))
    assert 0 < removed < len(segments_before) and kept == segments_before[removed:]
    assert target.journal.floor_seq <= seq and target.find_point(tag) is not None
    assert _read_all(view) == wanted
    pitview.close_view(target, view)
    with target.lock:
        target.prune_locked(T0 + 10**6)
    assert target.find_point(tag) is None and target.journal.floor_seq > seq
    assert len(list(target.journal_dir.glob("*.seg"))) < len(kept)
    with pytest.raises(errors.NotFound) as raised:
        pitview.open_view(target, tag, "v2")
    assert raised.value.code == "point-not-found"
    target.close()


def _record_in_an_older_segment(target: PairTarget, after_seq: int) -> journal.UndoRef:
    """An undo record with data, newer than `after_seq`, in a segment that is not the active one."""
    undo = target.journal
    for segment in undo.segments[:-1]:
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            for ref in undo._refs(segment, fd, os.fstat(fd).st_size):
                if ref.seq > after_seq and not ref.zeros and ref.length >= 4 * KiB:
                    return ref
        finally:
            os.close(fd)
    pytest.skip("no record with data in an older segment")


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def test_damaged_data_fails_the_reads_that_use_it_and_nothing_else(tmp_path: Path):
    """A record's data is checked at the first read that touches it: the view opens, a read
    of a range the record serves fails with EIO (and keeps failing), reads elsewhere give the
    point, and no byte of the damaged record is ever served."""
    stream = make_stream("p1", seed=81, disk_size=DISK, count=200)
    target = _target(tmp_path)
    _apply(target, stream)
    tag, (seq, _wanted) = next(iter(tag_hashes(stream, DISK).items()))
    point = Reference(DISK)
    for frame in stream:
        if frame.seq <= seq:
            point.apply(frame)
    ref = _record_in_an_older_segment(target, seq)
    _flip_byte(target.journal.segment_path(ref.segment), ref.data_offset + ref.length // 2)
    view = pitview.open_view(target, tag, "v1")
    served = [(a, b) for a, b, segment, _src, record in view._map.lookup(0, DISK)
              if (segment, record) == (ref.segment, ref.offset)]
    if not served:
        pytest.skip("an older record covers the damaged one's whole range")
    bad_from, bad_to = served[0]
    for _ in range(2):
        with pytest.raises(OSError) as raised:
            view.read(bad_from, bad_to - bad_from)
        assert raised.value.errno == errno.EIO and "is damaged at offset" in str(raised.value)
    with pytest.raises(OSError):  # a larger read that includes one byte of it fails whole
        view.read(max(0, bad_from - 64 * KiB), min(DISK, bad_to + 64 * KiB) - max(0, bad_from - 64 * KiB))
    # Everything the damaged record does not serve reads as the point.
    pieces, pos = [], 0
    for a, b in sorted(served):
        if a > pos:
            pieces.append((pos, a))
        pos = b
    pieces.append((pos, DISK))
    for a, b in pieces:
        for offset in range(a, b, 256 * KiB):
            n = min(256 * KiB, b - offset)
            assert view.read(offset, n) == bytes(point.disk[offset : offset + n])
    pitview.close_view(target, view)
    assert target.views == {} and target.journal.pinned_seqs == [] and target.journal._watchers == []
    target.close()


@pytest.mark.parametrize("where", ["target-offset", "undo-length", "body-length"])
def test_a_damaged_header_is_found_when_the_view_is_opened_and_nothing_stays_pinned(tmp_path: Path, where: str):
    """What the index is built from is checked at open: a record whose range or length is
    damaged fails the open, and the view leaves nothing behind."""
    stream = make_stream("p1", seed=81, disk_size=DISK, count=200)
    target = _target(tmp_path)
    _apply(target, stream)
    tag, (seq, _wanted) = next(iter(tag_hashes(stream, DISK).items()))
    ref = _record_in_an_older_segment(target, seq)
    at = {"target-offset": ref.offset + 20 + 10, "undo-length": ref.offset + 20 + 17, "body-length": ref.offset + 9}
    _flip_byte(target.journal.segment_path(ref.segment), at[where])
    with pytest.raises(errors.Integrity) as raised:
        pitview.open_view(target, tag, "v1")
    assert raised.value.code == "journal-corrupt"
    assert f"is damaged at offset {ref.offset}" in str(raised.value)
    assert target.views == {} and target.journal.pinned_seqs == [] and target.journal._watchers == []
    target.close()


def test_the_disk_is_not_put_back_in_place_while_a_view_reads_it(tmp_path: Path):
    stream = make_stream("p1", seed=91, disk_size=DISK, count=120)
    target = _target(tmp_path)
    _apply(target, stream)
    tag, (_seq, wanted) = next(iter(tag_hashes(stream, DISK).items()))
    before = sha256(target.target_path)
    view = pitview.open_view(target, tag, "v1")
    with pytest.raises(errors.Conflict) as raised:
        materializing.revert(target, tag)
    assert raised.value.code == "views-open" and sha256(target.target_path) == before
    pitview.close_view(target, view)
    materializing.revert(target, tag)
    assert sha256(target.target_path) == wanted
    target.close()


def test_a_view_refuses_to_be_written(tmp_path: Path):
    target = _target(tmp_path)
    _apply(target, make_stream("p1", seed=41, disk_size=DISK, count=40))
    view = pitview.open_view(target, "latest", "v1")
    with pytest.raises(OSError):
        view.write(0, b"x", fua=False)
    pitview.close_view(target, view)
    with pytest.raises(OSError):
        view.read(0, 1)
    target.close()


# -- through the master target's RPCs and NBD ----------------------------------------------------


@pytest.fixture
def mt(tmp_path: Path):
    harness = Harness(tmp_path, options=OPTIONS)
    yield harness
    harness.close()


def _nbd_digest(uri: str, out: Path) -> str:
    subprocess.run(["nbdcopy", uri, str(out)], check=True, capture_output=True, timeout=120)
    try:
        return sha256(out)
    finally:
        out.unlink()


def _journal_files(mt: Harness, pair_id: str) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (mt.retention / pair_id).glob("*.seg")}


def test_open_view_over_rpc_reads_the_point_through_nbd(mt: Harness, tmp_path: Path):
    stream = make_stream("p1", seed=51, disk_size=DISK, count=300)
    mt.assign("p1", DISK)
    send(mt.stub(), "p1", DISK, stream)
    tags = tag_hashes(stream, DISK)
    tag, (seq, wanted) = list(tags.items())[len(tags) // 2]
    admin = mt.admin()
    reply = admin.OpenView(rpb.OpenViewRequest(pair_id="p1", point=tag), timeout=30)
    assert (reply.tag_id, reply.seq, reply.size_bytes) == (tag, seq, DISK)
    assert reply.nbd_uri.startswith("nbd://127.0.0.1:") and reply.nbd_uri.endswith(reply.view_id)
    assert reply.journal_bytes_read > 0 and reply.journal_records > 0
    # The index settles chunk by chunk at first reads: the open's reply does not guess its extents.
    assert (reply.index_settled, reply.extents, reply.bytes_from_journal) == (False, 0, 0)
    # Replication goes on with the view open.
    more = make_stream("p1", seed=52, disk_size=DISK, count=200, sync=False, start_seq=stream[-1].seq + 1,
                       t0=T0 + 1000)
    send(mt.stub(), "p1", DISK, more)
    assert _nbd_digest(reply.nbd_uri, tmp_path / "copy.img") == wanted
    # Read-only: qemu-io cannot write it.
    wrote = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", reply.nbd_uri], capture_output=True,
                           text=True, timeout=60)
    assert wrote.returncode != 0 or "failed" in (wrote.stdout + wrote.stderr).lower()
    # The exports are not listed, and the empty name is no default.
    listed = subprocess.run(["nbdinfo", "--list", reply.nbd_uri.rsplit("/", 1)[0]], capture_output=True,
                            text=True, timeout=60)
    assert reply.view_id not in listed.stdout
    closed = admin.CloseView(rpb.CloseViewRequest(pair_id="p1", view_id=reply.view_id), timeout=30)
    assert list(closed.closed_view_ids) == [reply.view_id]
    gone = subprocess.run(["nbdcopy", reply.nbd_uri, str(tmp_path / "gone.img")], capture_output=True, timeout=60)
    assert gone.returncode != 0
    assert mt.pairs.target("p1").journal.pinned_seqs == []


def test_bad_view_requests_are_refused_and_change_nothing(mt: Harness):
    s1 = make_stream("p1", seed=61, disk_size=DISK, count=150)
    s2 = make_stream("p2", seed=62, disk_size=DISK, count=150)
    mt.assign("p1", DISK)
    mt.assign("p2", DISK)
    send(mt.stub(), "p1", DISK, s1)
    send(mt.stub(), "p2", DISK, s2)
    other_tag = next(iter(tag_hashes(s2, DISK)))
    before = (_journal_files(mt, "p1"), sha256(mt.datastore / "host" / "p1.img"))
    admin = mt.admin()
    cases = [
        (rpb.OpenViewRequest(pair_id="p1", point="no-such-tag"), grpc.StatusCode.NOT_FOUND, "point-not-found"),
        (rpb.OpenViewRequest(pair_id="p1", point=other_tag), grpc.StatusCode.NOT_FOUND, "point-not-found"),
        (rpb.OpenViewRequest(pair_id="nope", point="latest"), grpc.StatusCode.NOT_FOUND, "pair-not-assigned"),
    ]
    for request, status, code in cases:
        got = rpc_error(lambda request=request: admin.OpenView(request, timeout=30))
        assert got[:2] == (status, code), got
    got = rpc_error(lambda: admin.CloseView(rpb.CloseViewRequest(pair_id="p1", view_id="view-x"), timeout=30))
    assert got[:2] == (grpc.StatusCode.NOT_FOUND, "view-not-found")
    # Another role may not open views.
    got = rpc_error(lambda: mt.stub().OpenView(rpb.OpenViewRequest(pair_id="p1", point="latest"), timeout=30))
    assert got[0] == grpc.StatusCode.PERMISSION_DENIED
    target = mt.pairs.target("p1")
    assert target.views == {} and target.journal.pinned_seqs == []
    assert (_journal_files(mt, "p1"), sha256(mt.datastore / "host" / "p1.img")) == before
    # A pruned point: gone from the journal, refused the same way.
    oldest = next(iter(tag_hashes(s1, DISK)))
    target.retention_window = 0
    with target.lock:
        target.prune_locked(T0 + 10**6)
    got = rpc_error(lambda: admin.OpenView(rpb.OpenViewRequest(pair_id="p1", point=oldest), timeout=30))
    assert got[:2] == (grpc.StatusCode.NOT_FOUND, "point-not-found")
    assert target.views == {}


# -- kill -9 with a view open -------------------------------------------------------------------------


def _spec(tmp_path: Path) -> dict:
    return {"target_path": str(tmp_path / "ds" / "p1.img"), "journal_dir": str(tmp_path / "ret" / "p1"),
            "disk_size": DISK}


def test_kill_9_with_a_view_open_leaves_nothing_broken(tmp_path: Path):
    stream = make_stream("p1", seed=71, disk_size=DISK, count=300)
    tags = tag_hashes(stream, DISK)
    tag, (seq, wanted) = next(iter(tags.items()))
    spec = _spec(tmp_path) | {"seed": 71, "count": 300, "upto": 200, "tag": tag}
    child = subprocess.Popen([sys.executable, "-m", "tests.unit.test_master_target_views", json.dumps(spec)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert child.stdout is not None
    try:
        uri = next(line.split()[1] for line in child.stdout if line.startswith("view "))
        assert _nbd_digest(uri, tmp_path / "copy.img") == wanted
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    target = PairTarget(pair_id="p1", target_path=Path(spec["target_path"]), journal_dir=Path(spec["journal_dir"]),
                        disk_size=DISK, options=OPTIONS)
    target.open()
    assert target.views == {} and target.journal.pinned_seqs == []
    resume = [f for f in stream if f.seq > target.applied_seq]
    _apply(target, resume)
    assert sha256(target.target_path) == _final_digest(stream)
    view = pitview.open_view(target, tag, "again")
    assert _read_all(view) == wanted
    pitview.close_view(target, view)
    target.close()


def _final_digest(stream: list[rpb.Frame]) -> str:
    ref = Reference(DISK)
    for frame in stream:
        ref.apply(frame)
    return ref.digest()


def _child(spec: dict) -> None:
    """Apply part of a stream, open a view served over NBD, say where, then apply the rest
    slowly (one frame at a time) until killed."""
    from siterecovery.agents.master_target.views import ViewExports

    stream = make_stream("p1", seed=spec["seed"], disk_size=DISK, count=spec["count"])
    target = PairTarget(pair_id="p1", target_path=Path(spec["target_path"]), journal_dir=Path(spec["journal_dir"]),
                        disk_size=DISK, options=OPTIONS)
    target.open()
    _apply(target, stream[: spec["upto"]])
    exports = ViewExports()
    reply = exports.open(target, spec["tag"])
    print("view", reply.nbd_uri, flush=True)
    for frame in stream[spec["upto"] :]:
        target.apply([(frame, frames.payload(frame))])
    signal.pause()  # the parent kills us


if __name__ == "__main__":
    from siterecovery.common import logging

    logging.configure(level="warning")
    _child(json.loads(sys.argv[1]))
