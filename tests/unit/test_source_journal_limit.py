"""The source journal's limit (agents/source/capture.py, "Journal limit"): past it, or on a full state
volume, writes are tracked as changed blocks (dirtymap.py) instead of failing, and the pair's catch-up
(catchup.py) sends them once the process server acknowledges again; the target ends equal."""

from __future__ import annotations

import os
import random
import threading

import pytest

from siterecovery.agents.source import capture
from siterecovery.agents.source.capture import DiskCapture, PairJournal
from siterecovery.agents.source.dirtymap import BLOCK_BYTES, DIRTY_FILE, DirtyMap
from siterecovery.agents.source.pairstate import TagSpec
from siterecovery.common.pb import replication_pb2 as rpb

from ..tmpfs import tmpfs
from .source_support import MiB, Site, paused_copy, wait_for
from .test_source_replicator import PAIR, SEED, Source, caught_up, make_image, sha

B = BLOCK_BYTES


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


@pytest.fixture(autouse=True)
def check_every_commit(monkeypatch):
    """The journal's limit is checked at every commit (not every ROOM_CHECK_SECONDS)."""
    monkeypatch.setattr(capture, "ROOM_CHECK_SECONDS", 0.0)


def _synced_pair(site, tmp_path, size, *, data_bytes, state_dir=None, **options):
    """A source on a disk of `size` (`data_bytes` of it data) whose pair finished its initial sync:
    (source, assignment, image). Options go to ReplicationOptions (window 1 MiB unless given)."""
    image = make_image(tmp_path / "disk0.img", size, data_bytes=data_bytes, seed=SEED)
    source = Source(site, state_dir or tmp_path / "source", image, **{"window": MiB, **options})
    assignment = site.assignment(PAIR, "disk0", size)
    try:
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the initial sync")
    except BaseException:
        source.close()
        raise
    return source, assignment, image


# -- the changed-block map ------------------------------------------------------------------

def test_the_map_marks_whole_blocks_finds_runs_and_keeps_them_across_reopening(tmp_path):
    path = tmp_path / DIRTY_FILE
    dirty = DirtyMap(path, 10 * B + 5)
    try:
        assert dirty.count == 0 and dirty.since_ns == 0 and dirty.next_run(0, MiB) is None
        dirty.mark(B + 10, 20, 7)  # inside block 1
        dirty.mark(3 * B, 2 * B + 1, 7)  # blocks 3, 4 and 5
        dirty.mark(10 * B, 5, 9)  # the short last block
        assert dirty.count == 5 and dirty.since_ns > 0 and dirty.applied_through == 9
        assert dirty.next_run(0, MiB) == (B, B)
        assert dirty.next_run(2 * B, MiB) == (3 * B, 3 * B)
        assert dirty.next_run(2 * B, B) == (3 * B, B)  # at most max_bytes
        assert dirty.next_run(7 * B, MiB) == (10 * B, 5)  # ends at the disk's end
    finally:
        dirty.close()
    dirty = DirtyMap(path, 10 * B + 5)  # what a restart (or a kill -9: the page cache) finds
    try:
        assert dirty.count == 5 and dirty.applied_through == 9
        dirty.clear(3 * B, 3 * B)
        assert dirty.count == 2 and dirty.next_run(2 * B, MiB) == (10 * B, 5)
    finally:
        dirty.close()


@pytest.mark.parametrize("damage", ["other-size", "bad-header"])
def test_a_map_that_does_not_fit_marks_every_block(tmp_path, damage):
    path = tmp_path / DIRTY_FILE
    DirtyMap(path, 8 * B).close()
    if damage == "other-size":
        size = 20 * B
    else:
        size = 8 * B
        with open(path, "r+b") as raw:
            raw.write(b"garbage!")
    dirty = DirtyMap(path, size)
    try:
        assert dirty.count == size // B and dirty.since_ns > 0  # nothing it tracked can be missed
    finally:
        dirty.close()


# -- the committer past the limit -----------------------------------------------------------

def _attached(tmp_path, state_dir=None, disk_size=8 * MiB, **limits) -> tuple[DiskCapture, PairJournal]:
    image = tmp_path / "disk.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(disk_size)
    disk = DiskCapture("disk0", image)
    journal = PairJournal(state_dir or tmp_path / "pair", "pair-1", boot_id="boot-a", **limits)
    disk.attach(journal)
    return disk, journal


def test_past_the_limit_writes_succeed_and_their_blocks_are_marked_not_journaled(tmp_path):
    disk, journal = _attached(tmp_path, limit_bytes=MiB)
    rng = random.Random(SEED)
    try:
        written: list[tuple[int, bytes]] = []
        for i in range(48):  # 3 MiB of 64 KiB writes, nothing acknowledged
            data = rng.randbytes(B)
            disk.write(i * B + 4096, data, fua=False)  # straddles two blocks
            written.append((i * B + 4096, data))
        assert journal.tracking
        assert MiB - 2 * B <= journal.log.pending_bytes <= MiB
        journaled = journal.log.last_seq
        assert journaled < 16
        assert "journal_limit_bytes" in journal.full_reason
        # Every write after the last journaled one is marked (block-aligned, both blocks it touches).
        dirty = journal.dirty
        assert dirty.next_run(0, 64 * MiB) == (journaled * B, (48 - journaled + 1) * B)
        assert dirty.count == 48 - journaled + 1
        for offset, data in written:  # and every write is on the disk file
            assert os.pread(disk.fd, len(data), offset) == data
        # Tracking goes on while blocks are marked, whatever the journal holds.
        journal.log.release_through(journal.log.last_seq)
        disk.write(0, b"x" * 4096, fua=True)
        assert journal.log.last_seq == journaled and dirty.count == 48 - journaled + 2
    finally:
        journal.close()
        disk.close()


def test_a_restart_does_not_replay_journaled_frames_over_a_write_tracked_after_them(tmp_path):
    """The journal still holds frames the next hop has not acknowledged, and a write tracked after
    them changed the same block: replaying them at attach would put the older contents back."""
    disk, journal = _attached(tmp_path, limit_bytes=MiB)
    try:
        disk.write(0, b"old" * 4096, fua=False)  # journaled
        for i in range(1, 20):  # past the limit
            disk.write(i * B, bytes([i]) * B, fua=False)
        assert journal.tracking
        disk.write(0, b"new" * 4096, fua=False)  # tracked, and newer than the journaled write
        journaled = journal.log.last_seq
    finally:
        journal.log.close()  # as a kill -9 leaves it: nothing released, the journal not closed cleanly
        journal.dirty.close()
        disk.close()
    disk, journal = _attached(tmp_path, limit_bytes=MiB)
    try:
        assert journal.log.last_seq == journaled and journal.log.first_pending_seq == 1  # still to be sent
        assert os.pread(disk.fd, 3 * 4096, 0) == b"new" * 4096
        assert journal.dirty.next_run(0, B) == (0, B)  # and the catch-up will send it
    finally:
        journal.close()
        disk.close()


def test_a_clean_close_makes_the_map_durable_before_it_says_the_journal_is_clean(tmp_path, monkeypatch):
    """After a clean close a power loss no longer means a resync, so a mark still only in the page
    cache then would be a block never sent."""
    disk, journal = _attached(tmp_path, reserve_fraction=0.9999)  # every write is tracked
    events: list[str] = []
    monkeypatch.setattr(DirtyMap, "sync", lambda self: events.append("map synced"))
    real_boot = PairJournal._write_boot
    monkeypatch.setattr(PairJournal, "_write_boot",
                        lambda self, *, clean: (events.append(f"clean={clean}"), real_boot(self, clean=clean)))
    try:
        disk.write(0, b"a" * 4096, fua=False)
        assert journal.tracking
    finally:
        journal.close()
        disk.close()
    assert events == ["map synced", "clean=True"]


def test_without_write_back_a_tracked_write_is_durable_and_so_is_what_the_map_promises(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    disk = DiskCapture("disk0", image)
    journal = PairJournal(tmp_path / "pair", "pair-1", boot_id="", limit_bytes=MiB)  # no boot id: no write-back
    disk.attach(journal)
    try:
        disk.write(0, b"j" * 4096, fua=False)  # journaled (and the journal synced)
        synced.clear()
        disk.write(B, b"t" * MiB, fua=False)  # past the limit: tracked
        assert journal.tracking and journal.dirty.applied_through == journal.log.last_seq == 1
        # The disk file before the map promises frame 1 is on it, and after the tracked write.
        assert synced == [disk.fd, disk.fd]
        synced.clear()
        disk.write(2 * MiB, b"u" * 4096, fua=False)  # nothing new journaled: one sync, after
        assert synced == [disk.fd]
    finally:
        journal.close()
        disk.close()


@pytest.mark.parametrize("fua", [True, False])
def test_with_write_back_tracking_syncs_the_disk_file_first_only_behind_a_durable_journal(tmp_path, monkeypatch, fua):
    """A FUA write is durable in the journal, and a restart will not replay it once a tracked write
    followed it: the disk file must hold it durably before the mark. A written-back one needs no
    sync (only a power loss takes it, and that resyncs the pair)."""
    disk, journal = _attached(tmp_path, limit_bytes=MiB)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    try:
        disk.write(0, b"j" * 4096, fua=fua)
        synced.clear()
        disk.write(B, b"t" * MiB, fua=False)  # past the limit: tracked
        assert journal.tracking
        assert synced == ([disk.fd] if fua else [])
        synced.clear()
        disk.write(2 * MiB, b"u" * 4096, fua=False)
        assert synced == []
    finally:
        journal.close()
        disk.close()


def test_a_clean_stop_syncs_the_disk_file_before_the_journal_is_marked_clean(tmp_path, monkeypatch):
    disk, journal = _attached(tmp_path, reserve_fraction=0.9999)
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("disk" if fd == disk.fd else "other"), real_fsync(fd)))
    real_boot = PairJournal._write_boot
    monkeypatch.setattr(PairJournal, "_write_boot",
                        lambda self, *, clean: (events.append(f"clean={clean}"), real_boot(self, clean=clean)))
    try:
        disk.write(0, b"a" * 4096, fua=False)
        assert disk.detach() is journal
    finally:
        journal.close()
        disk.close()
    assert "disk" in events and events.index("disk") < events.index("clean=True")


def test_the_state_volumes_reserve_starts_tracking(tmp_path):
    disk, journal = _attached(tmp_path, reserve_fraction=0.9999)
    try:
        disk.write(0, b"a" * 4096, fua=False)
        assert journal.tracking and journal.log.last_seq == 0
        assert "journal_reserve_percent" in journal.full_reason
    finally:
        journal.close()
        disk.close()


def test_a_full_state_volume_tracks_instead_of_failing_the_writes(tmp_path):
    with tmpfs(tmp_path / "state", "8m", "source state volume") as volume:
        disk, journal = _attached(tmp_path, state_dir=volume / "pair", disk_size=16 * MiB)  # no limit: ENOSPC
        rng = random.Random(SEED)
        try:
            for i in range(192):  # 12 MiB into an 8 MiB volume
                disk.write(i * B, rng.randbytes(B), fua=i % 8 == 0)
            assert journal.tracking and "full" in journal.full_reason
            assert journal.log.last_seq > 0
            assert journal.dirty.count + journal.log.last_seq == 192
            assert not journal.failed
        finally:
            journal.close()
            disk.close()


# -- a pair past its limit ----------------------------------------------------------------

def test_a_journal_that_filled_its_state_volume_makes_room_for_the_catch_up(site, tmp_path):
    """The journal itself took the state volume down to its reserve. Once the process server has it
    all, the records are released but the journal's one segment is still on disk (only the next
    append deletes it): the catch-up must count that space, or it would wait for it forever."""
    size = 32 * MiB
    with tmpfs(tmp_path / "state", "8m", "source state volume") as volume:
        source, _assignment, image = _synced_pair(site, tmp_path, size, data_bytes=4 * MiB,
                                                  state_dir=volume / "source", journal_reserve_fraction=0.25)
        rng = random.Random(SEED + 5)
        try:
            pair = source.replication.pair(PAIR)
            site.ps.accepting.clear()
            _write_randomly(source.disk, size, 600, rng)  # 9.4 MiB into an 8 MiB volume
            assert pair.journal.tracking and "journal_reserve_percent" in pair.journal.full_reason
            site.ps.accepting.set()
            wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60,
                     what="the catch-up on a volume the journal filled")
            assert sha(site.ps.record(PAIR).target) == sha(image)
        finally:
            source.close()


def _write_randomly(disk: DiskCapture, size: int, count: int, rng: random.Random) -> None:
    for _ in range(count):
        disk.write(rng.randrange(0, size - 16384, 4096), rng.randbytes(16384), fua=False)


def _markers(site: Site) -> list[int]:
    return [f.sync.phase for f in site.ps.record(PAIR).frames if f.WhichOneof("body") == "sync"]


def test_a_pair_past_its_limit_tracks_then_catches_up_and_the_target_ends_equal(site, tmp_path):
    size = 128 * MiB
    source, _assignment, image = _synced_pair(site, tmp_path, size, data_bytes=8 * MiB, journal_limit_bytes=2 * MiB)
    rng = random.Random(SEED)
    try:
        pair = source.replication.pair(PAIR)
        assert _markers(site) == [rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE]

        site.ps.accepting.clear()  # the process server stops reading: the journal fills
        _write_randomly(source.disk, size, 400, rng)  # 6.25 MiB, about three times the limit
        assert pair.journal.tracking
        marked = pair.journal.dirty.dirty_bytes
        status = source.status()
        assert status.state == rpb.PAIR_STATE_INITIAL_SYNC and status.reason_code == "journal-full"
        assert "journal_limit_bytes" in status.reason and "no recovery point" in status.reason
        assert status.backlog_bytes >= marked > 0
        assert status.HasField("oldest_pending_captured_at")
        assert 0 < status.sync_done_bytes < status.sync_total_bytes == size
        assert not pair.consistent
        with pytest.raises(Exception, match="catching up"):
            pair.insert_tag(pair_tag("while-tracking"))

        site.ps.accepting.set()
        wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60,
                 what="the catch-up of the changed blocks")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        assert not pair.journal.tracking and pair.consistent
        # The catch-up was bracketed by markers, and sent the marked blocks, not the disk.
        assert _markers(site) == [rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE] * 2
        assert 0 < pair.catchup.sent_bytes <= marked < size // 4
        # Writes are journaled again, and a point can be taken.
        seq = pair.journal.log.last_seq
        source.disk.write(0, b"after" * 1000, fua=False)
        assert pair.journal.log.last_seq == seq + 1
        pair.insert_tag(pair_tag("after-catch-up"))
        wait_for(lambda: caught_up(site, source), what="the last write")
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()


def pair_tag(tag_id: str) -> TagSpec:
    return TagSpec(tag_id, rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)


def test_writes_during_the_catch_up_and_a_restart_mid_way_still_end_equal(site, tmp_path):
    """A guest keeps writing while the pair catches up, the agent stops mid-way (the map and the owed
    INITIAL_DONE are found again), and the pipeline overflows once more after the restart."""
    size = 64 * MiB
    state_dir = tmp_path / "source"
    options = {"window": MiB, "journal_limit_bytes": 2 * MiB}
    source, assignment, image = _synced_pair(site, tmp_path, size, data_bytes=8 * MiB, **options)
    rng = random.Random(SEED + 1)
    try:
        site.ps.accepting.clear()
        _write_randomly(source.disk, size, 300, rng)
        pair = source.replication.pair(PAIR)
        assert pair.journal.tracking
        steps = threading.Semaphore(4)  # the catch-up gets four runs, then waits for room forever
        room = pair.catchup._room
        pair.catchup._room = lambda: room() and steps.acquire(blocking=False)
        site.ps.accepting.set()
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                _write_randomly(source.disk, size, 1, rng)
                stop.wait(0.003)  # a guest's pace

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for(lambda: pair.catchup.sent_bytes > 0, what="the catch-up to begin")
        finally:
            stop.set()
            thread.join()
        assert pair.state.catchup_marked and pair.journal.tracking
    finally:
        source.close()  # a stop mid-way (what a kill -9 leaves is the same: the map is in the page cache)

    source = Source(site, state_dir, image, **options)
    try:
        pair = source.replication.pair(PAIR)
        assert pair.journal.dirty.count > 0 and pair.state.catchup_marked
        source.replication.apply_assignments([assignment], [])
        site.ps.accepting.clear()
        _write_randomly(source.disk, size, 300, rng)  # the journal overflows again
        site.ps.accepting.set()
        wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60,
                 what="the catch-up after the restart")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        markers = _markers(site)
        assert markers[-1] == rpb.SYNC_PHASE_INITIAL_DONE
        assert markers.count(rpb.SYNC_PHASE_INITIAL_DONE) >= markers.count(rpb.SYNC_PHASE_INITIAL_STARTED)
    finally:
        source.close()


def test_a_paused_pair_past_its_limit_says_it_tracks_and_resumes_to_an_equal_target(site, tmp_path):
    size = 32 * MiB
    source, assignment, image = _synced_pair(site, tmp_path, size, data_bytes=4 * MiB, journal_limit_bytes=2 * MiB)
    rng = random.Random(SEED + 4)
    try:
        source.replication.apply_assignments([paused_copy(assignment)], [])
        _write_randomly(source.disk, size, 200, rng)
        status = source.status()
        assert status.state == rpb.PAIR_STATE_PAUSED
        assert "tracked as changed blocks" in status.reason and "once the pair resumes" in status.reason
        source.replication.apply_assignments([assignment], [])
        pair = source.replication.pair(PAIR)
        wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60, what="the catch-up")
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()


def test_blocks_marked_during_the_initial_sync_hold_its_done_back_until_they_are_sent(site, tmp_path):
    size = 32 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=16 * MiB, seed=SEED)
    source = Source(site, tmp_path / "source", image, window=MiB, journal_limit_bytes=2 * MiB)
    rng = random.Random(SEED + 2)
    try:
        site.ps.accepting.clear()  # the sync's first window goes out; nothing is acknowledged
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        pair = source.replication.pair(PAIR)
        _write_randomly(source.disk, size, 300, rng)
        assert pair.journal.tracking and not pair.sync.done
        site.ps.accepting.set()
        wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60,
                 what="the sync and the catch-up")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        # The sync's own markers bracket the catch-up: one STARTED, one DONE, after the last block.
        assert _markers(site) == [rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE]
    finally:
        source.close()


def test_a_catch_up_whose_first_append_fails_journals_its_start_marker_on_the_next_try(site, tmp_path):
    size = 32 * MiB
    source, _assignment, image = _synced_pair(site, tmp_path, size, data_bytes=4 * MiB, journal_limit_bytes=2 * MiB)
    rng = random.Random(SEED + 3)
    try:
        pair = source.replication.pair(PAIR)
        site.ps.accepting.clear()
        _write_randomly(source.disk, size, 200, rng)
        assert pair.journal.tracking
        real = pair.journal.append_read_back
        failures = []

        def fails_once(records):
            if not failures:
                failures.append(len(records))
                raise OSError(5, "the state volume failed once")
            real(records)

        pair.journal.append_read_back = fails_once
        site.ps.accepting.set()
        wait_for(lambda: caught_up(site, source) and not pair.catchup.pending, timeout=60, what="the catch-up")
        assert failures == [2]  # the first try carried the STARTED marker and the first run
        assert _markers(site) == [rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE] * 2
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()
