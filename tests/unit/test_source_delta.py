"""The source agent's delta sync (agents/source/delta.py) against the in-process process server
(tests/unit/source_support.py), whose target image starts as an older copy of the disk and
whose BlockHashes answers from that image, as a master target would."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.agents.source import delta as delta_module
from siterecovery.agents.source.delta import DeltaSync
from siterecovery.common import blockhash
from siterecovery.common.pb import replication_pb2 as rpb

from .source_support import MiB, Site, content_digest, paused_copy, wait_for
from .test_source_replicator import PAIR, SEED, Source, caught_up, make_image, sha

BLOCK = blockhash.BLOCK_BYTES


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


@dataclass
class Difference:
    blocks: int  # blocks whose contents differ
    data_bytes: int  # ... of those, the bytes of blocks that hold data at the source (they travel)
    zero_bytes: int  # ... and of those that read as zeros at the source (zero ranges: no data)


def older_copy(image: Path, target: Path, *, seed: int, fraction: float, zeroed: int = 4, filled: int = 4) -> None:
    """`target` = `image` with `fraction` of its blocks overwritten with random bytes, `zeroed`
    data blocks zeroed and `filled` zero blocks given data (an older copy of the disk)."""
    rng = random.Random(seed)
    shutil.copyfile(image, target)
    size = image.stat().st_size
    blocks = size // BLOCK
    with open(image, "rb") as src, open(target, "r+b") as dst:
        def is_zero(block: int) -> bool:
            src.seek(block * BLOCK)
            return src.read(BLOCK).count(0) == BLOCK

        for block in rng.sample(range(blocks), max(1, int(blocks * fraction))):
            dst.seek(block * BLOCK)
            dst.write(rng.randbytes(BLOCK))
        data_blocks = [b for b in range(blocks) if not is_zero(b)]
        zero_blocks = [b for b in range(blocks) if is_zero(b)]
        for block in rng.sample(data_blocks, min(zeroed, len(data_blocks))):
            dst.seek(block * BLOCK)
            dst.write(bytes(BLOCK))
        for block in rng.sample(zero_blocks, min(filled, len(zero_blocks))):
            dst.seek(block * BLOCK)
            dst.write(rng.randbytes(BLOCK))


def difference(image: Path, target: Path) -> Difference:
    out = Difference(0, 0, 0)
    with open(image, "rb") as a, open(target, "rb") as b:
        while True:
            x, y = a.read(BLOCK), b.read(BLOCK)
            if not x:
                return out
            if x != y:
                out.blocks += 1
                if x.count(0) == len(x):
                    out.zero_bytes += len(x)
                else:
                    out.data_bytes += len(x)


def delta_assignment(site: Site, size: int) -> rpb.PairAssignment:
    return site.assignment(PAIR, "disk0", size, sync_kind=rpb.SYNC_KIND_DELTA)


def test_only_the_differing_blocks_travel(site, tmp_path):
    size = 64 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=40 * MiB, seed=SEED)
    older = tmp_path / "older.img"
    older_copy(image, older, seed=SEED + 1, fraction=0.01)
    diff = difference(image, older)
    assert diff.data_bytes and diff.zero_bytes
    target = site.ps.preload(PAIR, older, size)
    source = Source(site, tmp_path / "source", image, delta_batch_blocks=256)
    try:
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        assert isinstance(source.replication.pair(PAIR).sync, DeltaSync)
        wait_for(lambda: caught_up(site, source), what="the delta sync")
        record = site.ps.record(PAIR)
        assert sha(target) == sha(image)
        assert record.data_bytes == diff.data_bytes  # exactly the blocks that differ, once each
        assert record.zero_bytes == diff.zero_bytes
        status = source.status()
        assert status.sync_compared_bytes == size and status.sync_done_bytes == size
        assert status.sync_differing_bytes == diff.data_bytes + diff.zero_bytes
        assert status.sync_sent_bytes == diff.data_bytes == status.bytes_sent
        assert status.sync_hash_bytes == size // BLOCK * blockhash.DIGEST_BYTES
        # Each block's digests once; but the first fetch may come before the target has applied the
        # sync's INITIAL_STARTED (target-catching-up, asked again), and a batch prefetched behind it is dropped.
        extra = delta_module.PREFETCH - 1 if record.hash_behind else 0
        assert size // BLOCK // 256 <= record.hash_calls <= size // BLOCK // 256 + extra
        assert record.hash_blocks == record.hash_calls * 256
        syncs = [f.sync.phase for f in record.frames if f.WhichOneof("body") == "sync"]
        assert syncs == [rpb.SYNC_PHASE_INITIAL_STARTED, rpb.SYNC_PHASE_INITIAL_DONE]
        assert not site.ps.errors
        print(f"[delta] {size // MiB} MiB disk, {diff.blocks} blocks differ: {record.data_bytes / MiB:.2f} MiB of "
              f"data and {record.zero_bytes / MiB:.2f} MiB of zero ranges sent, "
              f"{status.sync_hash_bytes / 1024:.0f} KiB of digests received")
    finally:
        source.close()
    # The counters outlive the process, with the cursor.
    saved = json.loads((tmp_path / "source" / "pairs" / PAIR / "state.json").read_text())
    assert saved["sync_kind"] == "delta" and saved["sync_phase"] == "done"
    assert saved["sync_sent_bytes"] == diff.data_bytes


def test_an_identical_disk_moves_no_data_and_its_cursor_still_advances(site, tmp_path, monkeypatch):
    monkeypatch.setattr(delta_module, "SAVE_EVERY_BYTES", 8 * MiB)
    size = 32 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=16 * MiB, seed=3)
    site.ps.preload(PAIR, image, size)
    source = Source(site, tmp_path / "source", image, delta_batch_blocks=64)
    try:
        assignment = delta_assignment(site, size)
        source.replication.apply_assignments([paused_copy(assignment)], [])  # created, not shipping yet
        replicator = source.replication.pair(PAIR)
        saves: list[int] = []
        save = replicator.sync._save
        replicator.sync._save = lambda: (saves.append(replicator.state.sync_cursor), save())
        source.replication.apply_assignments([assignment], [])
        wait_for(lambda: caught_up(site, source), what="the delta sync of an identical disk")
        record = site.ps.record(PAIR)
        assert record.data_bytes == 0 and record.zero_bytes == 0
        assert [f.WhichOneof("body") for f in record.frames] == ["sync", "sync"]
        status = source.status()
        assert status.sync_differing_bytes == 0 and status.sync_compared_bytes == size
        # With nothing to acknowledge, identical stretches still moved (and saved) the cursor.
        assert [c for c in saves if 0 < c < size] == [8 * MiB, 16 * MiB, 24 * MiB], saves
    finally:
        source.close()


def test_concurrent_writes_during_a_delta_sync_end_up_on_the_target(site, tmp_path):
    size = 32 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=24 * MiB, seed=4)
    older = tmp_path / "older.img"
    older_copy(image, older, seed=5, fraction=0.3, zeroed=20, filled=20)
    target = site.ps.preload(PAIR, older, size)
    source = Source(site, tmp_path / "source", image, window=2 * MiB, delta_batch_blocks=32)
    stop = threading.Event()
    rng = random.Random(6)
    written = [0]

    def writer() -> None:
        # A guest writing at a pace the in-process process server carries (about 300 writes a
        # second, as fast as this writer went while every commit was synced). Writes are now
        # acknowledged without a sync (capture.py, "Write-back"), and an unpaced writer
        # outruns the pipeline: its backlog grows without end and no sync could finish.
        while not stop.wait(0.003):
            offset = rng.randrange(0, size - 3 * BLOCK, 512)
            if rng.random() < 0.2:
                source.disk.write_zeroes(offset, rng.choice((4096, BLOCK, 2 * BLOCK)), fua=False, punch=True)
            else:
                source.disk.write(offset, rng.randbytes(rng.choice((512, 4096, BLOCK + 512))), fua=False)
            written[0] += 1

    try:
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            # The writer is already writing when the sync starts, and goes on until the
            # pair replicates and it has made 50 writes: on a loaded machine the sync can be
            # over before 50 writes, and the test must not depend on the race.
            wait_for(lambda: written[0] > 0, what="the first write")
            before_sync = written[0]
            source.replication.apply_assignments([delta_assignment(site, size)], [])
            wait_for(lambda: source.status().state == rpb.PAIR_STATE_REPLICATING, what="the delta sync")
            during_sync = written[0] - before_sync
            wait_for(lambda: written[0] > 50, what="50 writes")
        finally:
            stop.set()
            thread.join()
        wait_for(lambda: caught_up(site, source), what="the writes after the sync")
        assert during_sync > 0, "no write raced the sync"
        assert sha(target) == sha(image)
        assert not site.ps.errors
    finally:
        source.close()


def test_a_restart_resumes_the_delta_sync_from_its_cursor(site, tmp_path):
    """Acks are lost, the source stops (as after kill -9), and starts again: the sync goes on
    from the saved cursor, compares again only the rest, and sends little again."""
    size, window = 64 * MiB, 4 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=size, seed=7)
    older = tmp_path / "older.img"
    older_copy(image, older, seed=8, fraction=0.5)
    diff = difference(image, older)
    target = site.ps.preload(PAIR, older, size)
    state_dir = tmp_path / "source"
    source = Source(site, state_dir, image, window=window, delta_batch_blocks=64)
    try:
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        wait_for(lambda: site.ps.record(PAIR).data_bytes >= diff.data_bytes // 3, what="delta sync progress")
        site.ps.send_acks.clear()  # the process server keeps receiving; its acks are lost
        held = site.ps.record(PAIR).data_bytes
        wait_for(lambda: site.ps.record(PAIR).data_bytes >= held + window // 2, what="the window to fill")
        hashes_before = site.ps.record(PAIR).hash_blocks
    finally:
        source.close()  # no acknowledgement arrives after this: as good as a kill -9 for the state on disk
    saved = json.loads((state_dir / "pairs" / PAIR / "state.json").read_text())
    cursor = saved["sync_cursor"]
    assert 0 < cursor < size and saved["sync_phase"] == "copying"
    received_before = site.ps.record(PAIR).data_bytes
    site.ps.send_acks.set()
    source = Source(site, state_dir, image, window=window, delta_batch_blocks=64)
    try:
        assert source.status().sync_done_bytes == cursor
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        wait_for(lambda: caught_up(site, source), what="the delta sync to finish after the restart")
        record = site.ps.record(PAIR)
        assert sha(target) == sha(image)
        resent = record.data_bytes - diff.data_bytes
        assert 0 <= resent <= window + delta_module.GROUP_BYTES, f"{resent} bytes sent again"
        # Not started over: the blocks below the cursor were not asked for again (the slack: fetches
        # of the first run still under way when it stopped).
        asked_again = record.hash_blocks - hashes_before
        assert asked_again <= (size - cursor) // BLOCK + delta_module.PREFETCH * 64, (asked_again, cursor)
        assert cursor // BLOCK > delta_module.PREFETCH * 64  # so that a sync started over would fail the bound
        starts = [f for f in record.frames if f.WhichOneof("body") == "sync"
                  and f.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED]
        assert len(starts) == 1
        print(f"[delta resume] stopped at {cursor / MiB:.0f} MiB compared and acknowledged, with "
              f"{received_before / MiB:.1f} MiB of data received; {resent / MiB:.1f} MiB sent again, "
              f"{asked_again} blocks' digests asked for again")
    finally:
        source.close()


def test_blocks_the_target_lacks_are_sent_and_a_failing_fetch_is_retried(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=8 * MiB, seed=9)
    short = tmp_path / "short.img"
    shutil.copyfile(image, short)
    os.truncate(short, size // 2 + 1000)  # ends inside a block: that block and all after it are absent
    target = site.ps.preload(PAIR, short, size)
    site.ps.hash_failures = 2
    source = Source(site, tmp_path / "source", image, delta_batch_blocks=64)
    try:
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        wait_for(lambda: "block hashes" in source.status().reason, what="the fetch failure to show")
        assert source.status().reason_code == "unreachable-test"
        wait_for(lambda: caught_up(site, source), what="the delta sync after the retries")
        assert content_digest(target) == content_digest(image)
        record = site.ps.record(PAIR)
        upper = image.read_bytes()[size // 2:]
        upper_data = sum(
            BLOCK for i in range(0, len(upper), BLOCK) if upper[i:i + BLOCK].count(0) != BLOCK
        )
        assert record.data_bytes == upper_data  # the lower half was there already
        assert record.zero_bytes == size // 2 - upper_data  # absent zero blocks still travel (as zero ranges)
        assert source.status().reason == ""
    finally:
        source.close()


def test_digests_are_taken_only_after_the_target_applied_the_syncs_start_and_target_behind_is_retried(
    site, tmp_path
):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=8 * MiB, seed=12)
    older = tmp_path / "older.img"
    older_copy(image, older, seed=13, fraction=0.05)
    target = site.ps.preload(PAIR, older, size)
    site.ps.applied_cap = 0  # the target is behind: say, the process server still forwards older frames
    state_dir = tmp_path / "source"
    source = Source(site, state_dir, image, delta_batch_blocks=64)
    try:
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        wait_for(lambda: source.status().reason_code == "target-catching-up", what="the target-catching-up refusal to show")
        record = site.ps.record(PAIR)
        assert record.hash_calls == record.hash_blocks == record.data_bytes == record.zero_bytes == 0
        wait_for(lambda: site.ps.record(PAIR).hash_behind >= 2, what="the fetch to be asked again")
        site.ps.applied_cap = None  # caught up
        wait_for(lambda: caught_up(site, source), what="the delta sync once the target caught up")
        assert sha(target) == sha(image)
        record = site.ps.record(PAIR)
        started = [f.seq for f in record.frames if f.WhichOneof("body") == "sync"
                   and f.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED]
        assert len(started) == 1 and started[0] > 0
        # Every call, refused or answered, asked for the frames through the sync's INITIAL_STARTED.
        assert set(record.hash_through) == {started[0]}
        assert record.hash_blocks == size // BLOCK
        assert source.status().reason == ""
    finally:
        source.close()
    saved = json.loads((state_dir / "pairs" / PAIR / "state.json").read_text())
    assert saved["sync_started_seq"] == started[0]


def test_a_full_pair_ignores_block_hashes_and_counts_what_it_sent(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=4 * MiB, seed=10)
    source = Source(site, tmp_path / "source", image)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        wait_for(lambda: caught_up(site, source), what="the full sync")
        status = source.status()
        assert status.sync_sent_bytes == 4 * MiB and status.sync_differing_bytes == 0
        assert site.ps.record(PAIR).hash_calls == 0
    finally:
        source.close()


def test_a_disk_whose_last_block_is_short(site, tmp_path):
    size = 8 * MiB + 1000
    image = make_image(tmp_path / "disk0.img", size, data_bytes=4 * MiB, seed=11)
    with open(image, "r+b") as f:
        f.seek(size - 1000)
        f.write(os.urandom(1000))
    older = tmp_path / "older.img"
    shutil.copyfile(image, older)
    with open(older, "r+b") as f:
        f.seek(size - 10)
        f.write(b"0123456789")
    target = site.ps.preload(PAIR, older, size)
    source = Source(site, tmp_path / "source", image)
    try:
        source.replication.apply_assignments([delta_assignment(site, size)], [])
        wait_for(lambda: caught_up(site, source), what="the delta sync")
        assert sha(target) == sha(image)
        assert site.ps.record(PAIR).data_bytes == 1000  # the short block, at its length
        assert source.status().sync_differing_bytes == 1000
    finally:
        source.close()
