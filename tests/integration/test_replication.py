"""The data path end to end: real NBD clients write through the source agent; the
master target's points materialise to exactly what the source disk held.

Every check compares hashes of whole disk images: the source image as it was
when a tag was taken, and the image the master target materialises for it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow


def test_writes_through_nbd_reach_the_target_and_every_point_materialises_exactly(rsite: ReplicatingSite, tmp_path):
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB)
    original = sha256(rsite.disk)
    pair = rsite.enable()
    assert pair["state"] in ("initial-sync", "replicating")
    pair = rsite.wait_replicating()
    assert Path(pair["target_path"]).exists()

    expected: dict[str, str] = {}
    # qemu-io: patterns, zeroes, a discard, a flush.
    rsite.qemu_io("write -P 0x5a 0 1M", "write -P 0xa5 5M 64k", "write -z 2M 512k", "discard 8M 1M", "flush")
    expected[rsite.create_point()] = sha256(rsite.disk)
    # fio's nbd engine: random 16 KiB writes of random data.
    rsite.fio(size="4M", seed=7)
    expected[rsite.create_point()] = sha256(rsite.disk)
    # nbdcopy: the whole disk from a file.
    replacement = tmp_path / "replacement.img"
    replacement.write_bytes(random.Random(3).randbytes(16 * MiB) + bytes(48 * MiB))
    rsite.nbdcopy(replacement)
    last = rsite.create_point()
    expected[last] = sha256(rsite.disk)
    assert len(set(expected.values())) == 3 and original not in expected.values()

    points = rsite.points()
    assert [p["point"]["tag_id"] for p in points if p["point"]["tag_id"] in expected] == list(expected)
    backs = [int(p["point"].get("journal_bytes_back", 0)) for p in points if p["point"]["tag_id"] in expected]
    assert backs == sorted(backs, reverse=True), "older points need more journal"

    caught_up = rsite.wait_caught_up()
    # The harness's barrier reads the source's own count: it must see every seq the view has.
    assert rsite.source_last_seq() >= int(caught_up["source_seq"]) > 0
    latest = rsite.materialize("latest")
    assert latest["path"] == pair["target_path"] and not latest.get("copied", False)
    assert sha256(Path(latest["path"])) == sha256(rsite.disk) == expected[last]

    for tag_id, digest in expected.items():
        result = rsite.materialize(tag_id)
        path = Path(result["path"])
        assert sha256(path) == digest, f"point {tag_id} does not match the source at that tag"
        if tag_id != last:
            assert result["copied"] and int(result["bytes_undone"]) > 0
        os.unlink(path)


def test_initial_sync_skips_what_reads_as_zero(rsite: ReplicatingSite):
    rsite.start(disk_size=1024 * MiB, data_bytes=16 * MiB)
    rsite.enable()
    pair = rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(Path(pair["target_path"])) == sha256(rsite.disk)
    sent = int(rsite.pair().get("source_bytes_sent", 0))
    assert 16 * MiB <= sent <= 17 * MiB, f"a 1 GiB disk holding 16 MiB moved {sent} bytes"


def test_concurrent_writers_on_several_nbd_connections_replicate_exactly(rsite: ReplicatingSite):
    """Four fio jobs (a connection each), 16 writes in flight each, all over the same 2 MiB,
    plus qemu-io beside them: the target ends equal to the source by hash."""
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB)
    rsite.enable()
    pair = rsite.wait_replicating()
    before = sha256(rsite.disk)
    rsite.fio(size="2M", seed=13, extra=("--bsrange=4k-64k", "--numjobs=4", "--iodepth=16", "--io_size=6M"))
    rsite.qemu_io("write -P 0x77 1M 64k", "write -z 1536k 64k", "flush")
    assert sha256(rsite.disk) != before
    rsite.wait_caught_up()
    assert sha256(Path(pair["target_path"])) == sha256(rsite.disk)
