"""Write-back at the source (agents/source/capture.py, "Write-back"): NBD writes are acknowledged
without a journal sync, FLUSH and FUA make them durable, and a journal left open under another
boot (a power loss, a kernel crash) makes the pair resynchronise by block digests.

A power loss cannot be staged here; its traces can: `boot.json` naming an older boot with the
journal not closed cleanly, disk-file writes the journal never held, and target blocks from
frames the source lost."""

from __future__ import annotations

import json
import os
import random

import pytest

from siterecovery.agents.source import capture
from siterecovery.agents.source.capture import BOOT_FILE, DiskCapture, PairJournal
from siterecovery.common import framelog, frames
from siterecovery.common.pb import replication_pb2 as rpb

from .source_support import MiB, Site, wait_for
from .test_source_replicator import PAIR, SEED, Source, caught_up, make_image, sha


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


@pytest.fixture
def syncs(monkeypatch):
    """Every fdatasync made (the frame log's and the disk file's), by file descriptor."""
    made: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        made.append(fd)
        real(fd)

    monkeypatch.setattr(framelog.os, "fdatasync", counting)
    return made


def _attached(tmp_path, *, boot_id: str = "boot-a") -> tuple[DiskCapture, PairJournal]:
    image = tmp_path / "disk.img"
    if not image.exists():
        image.write_bytes(bytes(4 * MiB))
    disk = DiskCapture("disk0", image)
    journal = PairJournal(tmp_path / "pair", "pair-1", boot_id=boot_id)
    disk.attach(journal)
    return disk, journal


def test_writes_are_acknowledged_without_a_sync_and_flush_or_fua_make_them_durable(tmp_path, syncs):
    disk, journal = _attached(tmp_path)
    try:
        disk.write(0, b"a" * 4096, fua=False)
        disk.write(8192, b"b" * 4096, fua=False)
        assert syncs == []
        assert journal.log.unsynced
        assert journal.log.last_seq == 2  # journaled (readable) all the same
        assert os.pread(disk.fd, 4096, 8192) == b"b" * 4096

        disk.flush()  # the journal, then the disk file
        assert syncs == [journal.log._fd, disk.fd] and not journal.log.unsynced

        disk.write(16384, b"c" * 4096, fua=False)
        disk.write(20480, b"d" * 4096, fua=True)  # FUA: its commit's append is synced
        assert syncs[2:] == [journal.log._fd] and not journal.log.unsynced
    finally:
        journal.close()
        disk.close()


def test_without_a_boot_id_every_commit_is_synced(tmp_path, syncs):
    disk, journal = _attached(tmp_path, boot_id="")
    try:
        assert not journal.write_back
        disk.write(0, b"a" * 4096, fua=False)
        assert len(syncs) == 1 and not journal.log.unsynced
    finally:
        journal.close()
        disk.close()


def test_rolling_to_a_new_segment_syncs_the_one_left_behind(tmp_path, syncs):
    log = framelog.FrameLog(tmp_path / "log", segment_bytes=4096)
    try:
        def record(seq: int) -> list[tuple[int, bytes]]:  # one record fills a segment
            return [(seq, frames.serialized_write("pair-1", seq, 0, memoryview(bytes(5000))))]

        log.append_serialized(record(1), durable=False)
        first_fd = log._fd
        assert syncs == []
        log.append_serialized(record(2), durable=False)  # rolls: segment 1 is synced first
        assert syncs == [first_fd]
        assert log.unsynced  # the new segment's record is not
        log.sync()
        assert syncs[-1] == log._fd and not log.unsynced
    finally:
        log.close()
    reopened = framelog.FrameLog(tmp_path / "log", segment_bytes=4096)
    try:
        assert [seq for seq, _ in reopened.read_serialized_from(1)] == [1, 2]
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        (None, False),  # a new pair
        ({"boot_id": "boot-a", "clean": False, "resync": False}, False),  # kill -9: the page cache kept it all
        ({"boot_id": "boot-old", "clean": True, "resync": False}, False),  # closed cleanly, then a reboot
        ({"boot_id": "boot-old", "clean": False, "resync": False}, True),  # open when the machine went down
        ({"boot_id": "boot-a", "clean": False, "resync": True}, True),  # found before, not yet recorded
        ("torn", True),
    ],
)
def test_a_journal_left_open_under_another_boot_asks_for_a_resync(tmp_path, previous, expected):
    directory = tmp_path / "pair"
    directory.mkdir()
    if previous == "torn":
        (directory / BOOT_FILE).write_text('{"boot_id": "bo')
    elif previous is not None:
        (directory / BOOT_FILE).write_text(json.dumps(previous))
    journal = PairJournal(directory, "pair-1", boot_id="boot-a")
    try:
        assert journal.resync_needed is expected
        on_disk = json.loads((directory / BOOT_FILE).read_text())
        assert on_disk == {"boot_id": "boot-a", "clean": False, "resync": expected}
        journal.resync_recorded()
        assert json.loads((directory / BOOT_FILE).read_text())["resync"] is False
    finally:
        journal.close()
    assert json.loads((directory / BOOT_FILE).read_text()) == {"boot_id": "boot-a", "clean": True, "resync": False}


def _starts(site: Site) -> int:
    return sum(1 for f in site.ps.record(PAIR).frames
               if f.WhichOneof("body") == "sync" and f.sync.phase == rpb.SYNC_PHASE_INITIAL_STARTED)


def _replicating(site: Site, state_dir, image) -> Source:
    source = Source(site, state_dir, image, window=4 * MiB)
    source.replication.apply_assignments([site.assignment(PAIR, "disk0", image.stat().st_size)], [])
    wait_for(lambda: caught_up(site, source), what="the pair to replicate")
    return source


def test_after_a_power_loss_the_pair_resyncs_and_the_target_ends_equal(site, tmp_path):
    size = 16 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=12 * MiB, seed=SEED)
    state_dir = tmp_path / "source"
    rng = random.Random(SEED)
    source = _replicating(site, state_dir, image)
    try:
        for _ in range(50):
            source.disk.write(rng.randrange(0, size - 65536, 4096), rng.randbytes(16384), fua=False)
        wait_for(lambda: caught_up(site, source), what="the writes to reach the target")
    finally:
        source.close()
    target = site.ps.record(PAIR).target
    assert sha(target) == sha(image)
    # What a power loss leaves: the journal open under the boot that ended, writes on the disk
    # file the journal lost (so they never travelled), and target blocks from frames the
    # process server held that the source lost.
    (state_dir / "pairs" / PAIR / BOOT_FILE).write_text(
        json.dumps({"boot_id": "the-boot-that-ended", "clean": False, "resync": False}))
    with open(image, "r+b") as disk_file, open(target, "r+b") as target_file:
        for _ in range(8):
            disk_file.seek(rng.randrange(0, size - 8192, 512))
            disk_file.write(rng.randbytes(8192))
            target_file.seek(rng.randrange(0, size - 8192, 512))
            target_file.write(rng.randbytes(8192))
    assert sha(target) != sha(image)

    source = Source(site, state_dir, image, window=4 * MiB)
    try:
        state = json.loads((state_dir / "pairs" / PAIR / "state.json").read_text())
        assert state["sync_kind"] == "delta" and state["sync_phase"] == "copying"
        assert json.loads((state_dir / "pairs" / PAIR / BOOT_FILE).read_text())["resync"] is False
        status = source.status()
        assert status.state == rpb.PAIR_STATE_INITIAL_SYNC and status.reason_code == "resync-unclean-shutdown"
        assert "without a clean shutdown" in status.reason
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        wait_for(lambda: caught_up(site, source), what="the resync after the power loss")
        assert sha(target) == sha(image)
        assert _starts(site) == 2  # the first sync, then the resync
        sent = site.ps.record(PAIR).data_bytes
        assert sent < size  # block digests compared: not a full copy again
    finally:
        source.close()


@pytest.mark.parametrize("boot", ["same-boot-after-kill", "new-boot-after-clean-stop"])
def test_no_resync_after_a_kill_or_after_a_clean_stop_and_a_reboot(site, tmp_path, boot):
    size = 8 * MiB
    image = make_image(tmp_path / "disk0.img", size, data_bytes=6 * MiB, seed=SEED)
    state_dir = tmp_path / "source"
    source = _replicating(site, state_dir, image)
    source.disk.write(4096, b"w" * 16384, fua=False)
    wait_for(lambda: caught_up(site, source), what="the write to reach the target")
    source.close()
    marker = state_dir / "pairs" / PAIR / BOOT_FILE
    if boot == "same-boot-after-kill":  # kill -9 never marks the journal closed
        marker.write_text(json.dumps({"boot_id": capture.current_boot_id(), "clean": False, "resync": False}))
    else:
        assert json.loads(marker.read_text())["clean"] is True
        marker.write_text(json.dumps({"boot_id": "an-earlier-boot", "clean": True, "resync": False}))
    source = Source(site, state_dir, image, window=4 * MiB)
    try:
        source.replication.apply_assignments([site.assignment(PAIR, "disk0", size)], [])
        source.disk.write(65536, b"v" * 16384, fua=False)
        wait_for(lambda: caught_up(site, source), what="replication after the restart")
        assert json.loads((state_dir / "pairs" / PAIR / "state.json").read_text())["sync_phase"] == "done"
        assert _starts(site) == 1
        assert sha(site.ps.record(PAIR).target) == sha(image)
    finally:
        source.close()
