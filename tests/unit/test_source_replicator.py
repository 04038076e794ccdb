"""The source agent's replication (initial sync, shipping, resume, scan mode, pause, forget)
against a minimal in-process process server over mutual TLS (tests/unit/source_support.py)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.common import uncache
from siterecovery.agents.source import capture
from siterecovery.agents.source.capture import DiskCapture
from siterecovery.agents.source.replicator import ReplicationOptions, SourceReplication
from siterecovery.agents.source.sync import CHUNK_BYTES
from siterecovery.common.nbd import NbdServer
from siterecovery.common.pb import replication_pb2 as rpb

from ..page_residency import resident_pages
from .source_support import MiB, Site, content_digest, paused_copy, wait_for

PAIR = "pair-1"
SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))


def make_image(path: Path, size: int, *, data_bytes: int, seed: int, extent: int = MiB) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as image:
        image.truncate(size)
        for slot in sorted(rng.sample(range(size // extent), data_bytes // extent)):
            image.seek(slot * extent)
            image.write(rng.randbytes(extent))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Source:
    """A source agent's replication, as daemon.py wires it, on one disk."""

    def __init__(self, site: Site, state_dir: Path, image: Path, *, window: int = 64 * MiB, **options) -> None:
        self.site = site
        self.disk = DiskCapture("disk0", image)
        self.replication = SourceReplication(
            state_dir, {"disk0": self.disk}, connect=site.connect,
            options=ReplicationOptions(window_bytes=window, **options), **self._extra(options),
        )
        self.replication.recover()

    @staticmethod
    def _extra(options: dict) -> dict:
        return {}

    def status(self, pair_id: str = PAIR) -> rpb.PairStatus:
        return next(s for s in self.replication.pair_statuses() if s.pair_id == pair_id)

    def close(self) -> None:
        self.replication.close()
        self.disk.close()


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


def caught_up(site: Site, source: Source) -> bool:
    status = source.status()
    record = site.ps.pairs.get(PAIR)
    return (
        status.state == rpb.PAIR_STATE_REPLICATING
        and record is not None
        and record.durable >= status.last_seq
        and status.backlog_frames == 0
    )


def test_initial_sync_with_concurrent_writes_then_replication_in_order(site, tmp_path):
    image = make_image(tmp_path / "disk0.img", 64 * MiB, data_bytes=24 * MiB, seed=1)
    source = Source(site, tmp_path / "source", image)
    stop = threading.Event()
    rng = random.Random(2)

    def writer() -> None:
        while not stop.is_set():
            source.disk.write(rng.randrange(0, 64 * MiB - 65536, 4096), rng.randbytes(65536), fua=False)

    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", 64 * MiB)], [])
        status = source.status()
        assert status.state == rpb.PAIR_STATE_INITIAL_SYNC and status.sync_total_bytes == 64 * MiB
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for(lambda: source.status().state == rpb.PAIR_STATE_REPLICATING, what="initial sync")
        finally:
            stop.set()
            thread.join()
        # Writes after the sync, through a real NBD client.
        server = NbdServer("127.0.0.1", 0)
        server.add_export("disk0", source.disk)
        server.start()
        try:
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "write -z 4M 1M", "-c", "discard 8M 2M",
                 server.uri("disk0")], check=True, capture_output=True, timeout=60,
            )
        finally:
            server.stop()
        wait_for(lambda: caught_up(site, source), what="the process server to hold everything")
        record = site.ps.record(PAIR)
        assert sha(record.target) == sha(image)
        seqs = [f.seq for f in record.frames]
        assert seqs == sorted(seqs)
        first = record.frames[0]
        assert first.WhichOneof("body") == "sync" and first.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED
        done = [f for f in record.frames if f.WhichOneof("body") == "sync" and f.sync.phase == rpb.SYNC_PHASE_INITIAL_DONE]
        assert len(done) == 1
        status = source.status()
        assert status.acked_seq == status.last_seq and status.sync_done_bytes == 64 * MiB
        assert not status.HasField("oldest_pending_captured_at")
        assert status.bytes_sent >= 24 * MiB and status.throughput_bytes_per_second > 0
        assert not site.ps.errors
    finally:
        source.close()


def test_sparse_image_moves_only_its_data(site, tmp_path):
    size, data = 10 * 1024 * MiB, 100 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=data, seed=3)
    source = Source(site, tmp_path / "source", image)
    try:
        started = time.monotonic()
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        wait_for(lambda: caught_up(site, source), timeout=120, what="the initial sync of a sparse 10 GiB image")
        elapsed = time.monotonic() - started
        record = site.ps.record(PAIR)
        status = source.status()
        assert data <= status.bytes_sent <= data + CHUNK_BYTES, status.bytes_sent
        assert record.data_bytes == status.bytes_sent
        assert content_digest(record.target) == content_digest(image)
        print(f"[sync] 10 GiB sparse image with {data // MiB} MiB of data: {status.bytes_sent / MiB:.1f} MiB sent "
              f"in {len(record.frames)} frames, {elapsed:.2f} s")
    finally:
        source.close()


def test_a_restart_resumes_from_the_acknowledged_cursor(site, tmp_path):
    """Acks are lost, the source stops (as after kill -9), and starts again: what it sends again
    is at most the unacknowledged window plus one chunk."""
    rng = random.Random(f"{SEED}-resume")
    size, window = 64 * MiB, 8 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=size, seed=rng.randrange(1 << 20))
    state_dir = tmp_path / "source"
    source = Source(site, state_dir, image, window=window)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        threshold = rng.randrange(8, 40) * MiB
        wait_for(lambda: PAIR in site.ps.pairs and site.ps.record(PAIR).data_bytes >= threshold, what="sync progress")
        site.ps.send_acks.clear()  # the process server keeps receiving; its acks are lost
        held = site.ps.record(PAIR).data_bytes
        wait_for(lambda: site.ps.record(PAIR).data_bytes >= held + window - 2 * CHUNK_BYTES, what="the window to fill")
        cursor = source.status().sync_done_bytes
    finally:
        source.close()  # no acknowledgement arrives after this: as good as a kill -9 for the state on disk
    received_before = site.ps.record(PAIR).data_bytes
    site.ps.send_acks.set()
    source = Source(site, state_dir, image, window=window)
    try:
        assert source.status().sync_done_bytes == cursor
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        wait_for(lambda: caught_up(site, source), what="the sync to finish after the restart")
        record = site.ps.record(PAIR)
        resent = record.data_bytes - size
        assert sha(record.target) == sha(image)
        assert resent <= window + CHUNK_BYTES, f"{resent} bytes sent again"
        assert received_before - cursor > 0  # there was something unacknowledged to resend
        print(f"[resume] stopped at {cursor // MiB} MiB acked, {received_before // MiB} MiB received: "
              f"{resent / MiB:.1f} MiB sent again (window {window // MiB} MiB, seed {SEED})")
    finally:
        source.close()


def test_a_broken_stream_is_resumed_after_the_durable_seq(site, tmp_path):
    size = 32 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=16 * MiB, seed=5)
    source = Source(site, tmp_path / "source", image)
    try:
        site.ps.break_after = 7
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        wait_for(lambda: caught_up(site, source), what="replication after a broken stream")
        for i in range(20):
            source.disk.write(i * MiB, bytes([i + 1]) * 8192, fua=False)
        site.ps.break_after = 5
        wait_for(lambda: caught_up(site, source) and site.ps.record(PAIR).streams >= 3, what="the writes")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        assert not site.ps.errors
    finally:
        source.close()


def test_the_initial_sync_leaves_the_disk_out_of_the_page_cache(site, tmp_path):
    # Small writes after a sync would land in the large folios it cached (common/pagecache.py).
    image = make_image(tmp_path / "disk0.img", 32 * MiB, data_bytes=32 * MiB, seed=5)
    with open(image, "rb") as f:
        os.fsync(f.fileno())  # written long ago: clean pages (dirty ones are never dropped)
        assert len(f.read()) == 32 * MiB  # and every one of them cached now
    if resident_pages(image) == 0:
        pytest.skip("this file system keeps no droppable page cache")
    source = Source(site, tmp_path / "source", image)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", 32 * MiB)], [])
        wait_for(lambda: caught_up(site, source), what="the initial sync")
        assert resident_pages(image) == 0
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()


def test_scan_passes_read_around_the_page_cache_and_still_see_cached_writes(site, tmp_path):
    # A scan-mode disk is often a live block device, read whole every few minutes: the passes
    # must not fill memory with it, nor read stale cached pages (common/pagecache.py).
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=size, seed=10)
    uncache(image)
    if resident_pages(image) != 0:
        pytest.skip("this file system keeps pages it was asked to drop")
    source = Source(site, tmp_path / "source", image)
    try:
        source.replication.apply_assignments(
            [site.assignment(PAIR, "disk0", size, mode=rpb.REPLICATION_MODE_SCAN, scan=1)], [])
        scan = source.replication.pair(PAIR).scan
        wait_for(lambda: scan.passes_done >= 1 and caught_up(site, source), what="the first scan")
        assert resident_pages(image) == 0
        # A write that is still only in the page cache (dirty) is what the next pass finds.
        with open(image, "r+b") as f:
            f.seek(3 * MiB + 4096)
            f.write(os.urandom(5000))
        passes = scan.passes_done
        wait_for(lambda: scan.passes_done > passes and caught_up(site, source), what="the next pass")
        assert site.ps.record(PAIR).data_bytes == size + 65536
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()


def test_a_process_server_that_lost_everything_gets_a_new_initial_sync(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=8 * MiB, seed=6)
    source = Source(site, tmp_path / "source", image)
    try:
        assignment = site.assignment(PAIR, "disk0", size)
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the first sync")
        site.ps.reset(PAIR)
        source.replication.pair(PAIR).shipper.interrupt()
        wait_for(lambda: source.status().state == rpb.PAIR_STATE_INITIAL_SYNC, what="a new sync")
        wait_for(lambda: caught_up(site, source), what="the second sync")
        starts = [f for f in site.ps.record(PAIR).frames if f.WhichOneof("body") == "sync"
                  and f.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED]
        assert len(starts) == 2
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()


def test_paused_pairs_journal_but_do_not_ship_and_forgotten_pairs_leave_only_their_lease(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=4 * MiB, seed=7)
    state_dir = tmp_path / "source"
    source = Source(site, state_dir, image)
    try:
        assignment = site.assignment(PAIR, "disk0", size)
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the sync")
        source.replication.apply_assignments([paused_copy(assignment)], [])
        durable = site.ps.record(PAIR).durable
        source.disk.write(0, b"while paused" * 100, fua=False)
        status = source.status()
        assert status.state == rpb.PAIR_STATE_PAUSED and status.backlog_frames == 1
        assert status.HasField("oldest_pending_captured_at")
        assert site.ps.record(PAIR).durable == durable
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the paused write to ship")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        source.replication.apply_assignments([], [])
        assert source.replication.pair_statuses() == []
        assert source.disk.journal is None
        assert sorted(p.name for p in (state_dir / "pairs" / PAIR).iterdir()) == ["seq.json"]
    finally:
        source.close()


def test_scan_mode_sends_what_changed_between_passes(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=4 * MiB, seed=8)
    state_dir = tmp_path / "source"
    source = Source(site, state_dir, image)
    assignment = site.assignment(PAIR, "disk0", size, mode=rpb.REPLICATION_MODE_SCAN, scan=1)
    try:
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the first scan")
        record = site.ps.record(PAIR)
        assert record.data_bytes == 4 * MiB
        assert sha(record.target) == sha(image)
        # Change three blocks behind the agent's back (scan mode needs no NBD).
        with open(image, "r+b") as f:
            for offset in (0, 5 * MiB + 65536, size - 65536):
                f.seek(offset)
                f.write(os.urandom(100))
        scan = source.replication.pair(PAIR).scan
        passes = scan.passes_done
        wait_for(lambda: scan.passes_done > passes and caught_up(site, source), what="the next pass")
        assert record.data_bytes == 4 * MiB + 3 * 65536
        assert sha(record.target) == sha(image)
        tags = [f for f in record.frames if f.WhichOneof("body") == "tag"]
        assert tags and tags[-1].tag.kind == rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT
    finally:
        source.close()
    # The acknowledged hashes outlive the process: a restart sends nothing unchanged.
    source = Source(site, state_dir, image)
    try:
        source.replication.apply_assignments([assignment], [])
        scan = source.replication.pair(PAIR).scan
        wait_for(lambda: scan.passes_done >= 1 and caught_up(site, source), what="a pass after the restart")
        assert site.ps.record(PAIR).data_bytes == 4 * MiB + 3 * 65536
    finally:
        source.close()


def test_backlog_and_rpo_come_from_the_acknowledged_seq_while_releasing_waits(site, tmp_path, monkeypatch):
    """The journal releases acknowledged frames about once a second; the status must not count
    acknowledged frames as pending meanwhile (the RPO and backlog the controller shows)."""
    monkeypatch.setattr(capture, "RELEASE_INTERVAL", 3600.0)  # after the first release, none
    image = make_image(tmp_path / "disk0.img", 8 * MiB, data_bytes=2 * MiB, seed=5)
    source = Source(site, tmp_path / "source", image)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", 8 * MiB)], [])
        wait_for(lambda: caught_up(site, source), what="the initial sync")
        for i in range(8):
            source.disk.write(i * 4096, os.urandom(4096), fua=False)
        wait_for(lambda: caught_up(site, source), what="the process server to hold the writes")
        status = source.status()
        journal = source.replication._pairs[PAIR].journal
        assert journal.log.pending_frames >= 8, "acknowledged writes were released at once"
        assert (status.backlog_frames, status.backlog_bytes) == (0, 0)
        assert not status.HasField("oldest_pending_captured_at")
    finally:
        source.close()
    assert sha(image) == sha(site.ps.record(PAIR).target)


@pytest.mark.parametrize("accepts_batches", [False, True], ids=["older process server", "batching process server"])
def test_writes_go_in_batches_only_to_a_process_server_that_takes_them(site, tmp_path, accepts_batches):
    site.ps.accepts_batches = accepts_batches
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=2 * MiB, seed=11)
    source = Source(site, tmp_path / "source", image)
    try:
        assignment = site.assignment(PAIR, "disk0", size)
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the sync")
        # Writes journaled while paused are all ready at once when the pair resumes.
        source.replication.apply_assignments([paused_copy(assignment)], [])
        site.ps.message_sizes.clear()
        rng = random.Random(12)
        for _ in range(200):
            source.disk.write(rng.randrange(0, size // 4096) * 4096, rng.randbytes(4096), fua=False)
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the writes to ship")
        assert sha(site.ps.record(PAIR).target) == sha(image)
        seqs = [f.seq for f in site.ps.record(PAIR).frames]
        assert seqs == sorted(set(seqs))
        assert sum(site.ps.message_sizes) == 200
        if accepts_batches:
            assert max(site.ps.message_sizes) > 1
        else:
            assert set(site.ps.message_sizes) == {1}
        assert not site.ps.errors
    finally:
        source.close()


def test_the_saved_cursor_lags_the_process_server_by_at_most_the_window(site, tmp_path, monkeypatch):
    """The state is saved off the shipper, many acknowledgements at a time; a frame stays in the
    window until its progress is saved, so at every moment what a kill -9 would make the source
    send again (received by the process server, not in state.json) is at most the window."""
    from siterecovery.agents.source import replicator
    from siterecovery.agents.source.pairstate import PairState

    monkeypatch.setattr(replicator, "SAVE_INTERVAL", 0.3)  # saves rarer than acks
    saves = []
    real_save = PairState.save
    monkeypatch.setattr(PairState, "save", lambda self, d: (saves.append(self.sync_cursor), real_save(self, d))[1])
    size, window = 64 * MiB, 8 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=size, seed=11)
    state_dir = tmp_path / "source"
    pair_dir = state_dir / replicator.PAIRS_DIR / PAIR
    source = Source(site, state_dir, image, window=window)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        worst = 0
        while not caught_up(site, source):
            received = site.ps.record(PAIR).data_bytes if PAIR in site.ps.pairs else 0
            saved = PairState.load(pair_dir).sync_cursor  # read after `received`: only grows
            worst = max(worst, received - saved)
            assert received - saved <= window + CHUNK_BYTES, f"{received - saved} bytes not saved"
            time.sleep(0.01)  # sampling, not synchronisation
        assert sha(site.ps.record(PAIR).target) == sha(image)
        assert PairState.load(pair_dir).sync_phase == "done"
        assert len(saves) < size // CHUNK_BYTES // 2, f"{len(saves)} saves for {size // CHUNK_BYTES} chunks"
        print(f"[saver] {len(saves)} saves for {size // CHUNK_BYTES} chunks; worst unsaved {worst / MiB:.1f} MiB")
    finally:
        source.close()
