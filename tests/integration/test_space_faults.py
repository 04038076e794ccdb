"""The master target's retention disk runs full: the pair pauses with a clear
reason and writes nothing half-way; writes at the source go on; when space
returns the pair resumes by itself and every point is still exact.

The retention directory is a small tmpfs the test mounts (so "full" is real and
does not depend on what else this machine's disk holds).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.controller import launcher

from ..tmpfs import tmpfs
from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow

DISK_SIZE = 32 * MiB


@pytest.fixture
def small_disk(tmp_path: Path):
    with tmpfs(tmp_path / "retention-disk", "48m", "retention disk") as mount:
        yield mount


def test_a_full_retention_disk_pauses_the_pair_until_space_returns(rsite: ReplicatingSite, small_disk: Path):
    rsite.start(
        disk_size=DISK_SIZE, data_bytes=4 * MiB,
        mt_extra={"retention_dir": str(small_disk / "retention"), "retention_reserve_bytes": MiB},
    )
    rsite.enable()
    rsite.wait_replicating()
    # 16 MiB of data where the disk held zeros: its undo records are "was zeros", a few bytes each.
    rsite.qemu_io("write -P 0x5a 0 16M")
    first = rsite.create_point()
    at_first = sha256(rsite.disk)
    rsite.wait_caught_up()

    # Something else takes three quarters of the retention disk.
    filler = small_disk / "someone-elses-file"
    filler.write_bytes(os.urandom(36 * MiB))
    # Overwriting those 16 MiB needs 16 MiB of undo: more than the disk has left.
    rsite.qemu_io("write -P 0xa5 0 16M")  # the source still acknowledges every write

    def paused():
        pair = rsite.pair()
        return pair if pair["state"] == "paused" and pair.get("reason_code") == "retention-full" else None

    pair = wait_for(paused, timeout=60, what="the pair to pause with retention-full")
    assert "retention" in pair["reason"] and "free space" in pair["reason"].lower() or "full" in pair["reason"]
    print(f"[space] paused: {pair['reason']}")
    # Nothing half-written: the target still equals the first point.
    assert sha256(Path(pair["target_path"])) == at_first

    filler.unlink()  # space returns
    second = rsite.create_point()
    at_second = sha256(rsite.disk)
    pair = rsite.wait_caught_up(timeout=120)
    assert pair["state"] == "replicating"
    assert sha256(Path(pair["target_path"])) == at_second
    for tag_id, digest in ((first, at_first), (second, at_second)):
        result = rsite.materialize(tag_id)
        assert sha256(Path(result["path"])) == digest
        if result.get("copied"):
            Path(result["path"]).unlink()


@pytest.fixture
def small_spool_disk(tmp_path: Path):
    with tmpfs(tmp_path / "spool-disk", "12m", "spool disk") as mount:
        yield mount


@pytest.mark.parametrize("full", ["limit", "disk"])
def test_a_full_spool_holds_the_source_back_and_loses_nothing(rsite: ReplicatingSite, small_spool_disk: Path,
                                                             full: str):
    """The master target is away and the process server's spool fills up — at its configured
    limit, or because its disk is full first. The source keeps acknowledging writes (its journal
    holds them) and the process server takes no more than it can keep; when the master target
    returns, everything arrives, the target equals the source, and no full resync happened."""
    limit = 6 * MiB if full == "limit" else 1024 * MiB  # "disk": the 12 MiB tmpfs runs out first
    rsite.start(disk_size=DISK_SIZE, data_bytes=4 * MiB,
                ps_extra={"spool_dir": str(small_spool_disk / "spool"), "spool_limit_bytes": limit})
    rsite.enable()
    pair = rsite.wait_replicating()
    base_applied = int(pair["applied_bytes_total"])
    launcher.stop(rsite.agents["master-target"])
    # Twice what the spool's disk holds, of data that does not compress; the source acknowledges it all.
    rsite.fio(size="24M", bs="1M", rw="write")
    expected = sha256(rsite.disk)

    def held_back():
        problems = [p for s in rsite.servers() if s["role"] == "process-server" for p in s.get("problems", [])]
        return [p for p in problems if p.get("code") in ("spool-full", "spool-disk-full")]

    (problem,) = wait_for(held_back, timeout=60, what="the process server to report its full spool")
    print(f"[space] spool {full}: {problem['code']}: {problem['message']}")
    assert rsite.pair()["state"] != "error"

    rsite.restart("master-target")
    pair = rsite.wait_caught_up(timeout=180)
    assert sha256(Path(pair["target_path"])) == expected
    applied = int(pair["applied_bytes_total"]) - base_applied
    assert applied <= 24 * MiB + 4 * MiB, f"{applied} bytes applied for 24 MiB written: a resync?"
    assert not held_back(), "the spool problem clears once the master target drains it"


def test_a_full_source_state_volume_fails_no_write_and_the_changed_blocks_follow(rsite: ReplicatingSite, tmp_path: Path):
    """The process server is away and the source agent's state volume (its pairs' journals) runs
    out of room. Every write of the machine still succeeds: past the volume's reserve the pair
    tracks changed blocks instead of journaling (journal-full). When the process server returns,
    the changed blocks travel, the target equals the source, and the pair replicates again."""
    rsite.start(disk_size=DISK_SIZE, data_bytes=4 * MiB)
    with tmpfs(rsite.root / "source-agent" / "pairs", "12m", "source state volume"):
        rsite.enable()
        pair = rsite.wait_replicating()
        launcher.stop(rsite.agents["process-server"])
        # Twice what the state volume holds; the source acknowledges every write (fio fails otherwise).
        rsite.fio(size="24M", bs="64k", rw="randwrite")
        expected = sha256(rsite.disk)

        def tracking():
            pair = rsite.pair()
            return pair if pair.get("reason_code") == "journal-full" else None

        pair = wait_for(tracking, timeout=60, what="the pair to report journal-full")
        print(f"[space] source state volume full: {pair['reason']}")
        assert pair["state"] == "initial-sync" and "journal_reserve_percent" in pair["reason"]
        assert "cannot stream to the process server" in pair["reason"]

        rsite.restart("process-server")
        pair = rsite.wait_caught_up(timeout=180)
        assert pair["state"] == "replicating"
        assert sha256(Path(pair["target_path"])) == expected
