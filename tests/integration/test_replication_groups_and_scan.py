"""The data path end to end in the two setups the single-disk tests leave out:
a disk replicated in scan mode (written behind the agent's back), and a
replication group of two machines whose points must agree with each other.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from tests.nbd_raw import Raw

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow

KiB = 1024
SCAN_BLOCK = 64 * KiB


def test_scan_mode_replicates_writes_made_straight_to_the_disk_and_sends_only_changed_blocks(rsite: ReplicatingSite):
    # The process server also encrypts its spool here: the data must come through intact.
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB, ps_extra={"spool_encryption": True})
    key = rsite.root / "process-server" / "spool.key"
    assert key.stat().st_size == 32 and key.stat().st_mode & 0o777 == 0o600
    # An hour between passes: every pass here is one a point asked for.
    (enabled,) = rsite.srctl_json(
        "replication", "enable", rsite.machine, "--disk", "disk0", "--mode", "scan", "--scan-interval", "3600",
    )
    assert enabled["mode"] == "REPLICATION_MODE_SCAN" or "SCAN" in str(enabled["mode"]).upper()
    pair = rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(Path(pair["target_path"])) == sha256(rsite.disk), "the first pass is the initial sync"

    expected: dict[str, str] = {}
    # qemu-io straight at the image file: nothing fronts it, only a scan can see it.
    before = int(rsite.pair()["source_bytes_sent"])
    rsite.qemu_io(
        "write -z 0 1M", "write -P 0x33 10000 100", "write -P 0x11 3M 64k", "write -P 0x22 40M 128k",
        target=str(rsite.disk),
    )
    expected[rsite.create_point()] = sha256(rsite.disk)
    # The pass runs when the point request reaches the source, and what it sent shows at the
    # source's next heartbeat: wait until the bytes of the four blocks are reported (a pass
    # that sends fewer times out, one that sends more fails the check below).
    def reported() -> int:
        sent = int(rsite.pair()["source_bytes_sent"]) - before
        return sent if sent >= 4 * SCAN_BLOCK else 0

    sent = wait_for(reported, what="the scan pass's bytes in the source's report")
    # Blocks 0 (the 100-byte write), 48 and 640-641: four 64 KiB blocks of data. The
    # rest of the zeroed first MiB travels as zero ranges, which carry no data.
    assert sent == 4 * SCAN_BLOCK, f"a pass over four changed blocks sent {sent} bytes"

    # fio's psync engine, also straight at the file.
    rsite.fio(size="4M", seed=11, target=rsite.disk)
    expected[rsite.create_point()] = sha256(rsite.disk)

    # Scan mode cannot freeze writers: an app-consistent point is taken as
    # crash-consistent, and the point says so.
    (app,) = rsite.srctl_json("recovery-points", "create", rsite.machine, "--kind", "app-consistent")
    assert "CRASH" in str(app["point"]["kind"]).upper() and "scan mode" in app["point"]["note"]
    expected[app["point"]["tag_id"]] = sha256(rsite.disk)

    rsite.wait_caught_up()
    for tag_id, digest in expected.items():
        result = rsite.materialize(tag_id)
        assert sha256(Path(result["path"])) == digest, f"scan point {tag_id} does not match the source at that tag"
        if result.get("copied"):
            os.unlink(result["path"])


COUNTER_OFFSET = 1 * MiB
COUNTER_BYTES = 4 * KiB


def _counter(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(COUNTER_OFFSET)
        return struct.unpack(">Q", f.read(8))[0]


class OrderedWriter(threading.Thread):
    """Writes counter i to machine A, waits for its acknowledgement, then writes
    it to machine B, and so on: B holds i only after A acknowledged i, and A gets
    i+1 only after B acknowledged i. A point consistent across both machines
    therefore holds counters a, b with b <= a <= b + 1; a point cut at different
    moments on each machine can break that."""

    def __init__(self, uri_a: str, uri_b: str) -> None:
        super().__init__(daemon=True)
        self.uris = (uri_a, uri_b)
        self.stop = threading.Event()
        self.count = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            clients = [Raw.open(uri) for uri in self.uris]
            while not self.stop.is_set():
                block = struct.pack(">Q", self.count + 1) * (COUNTER_BYTES // 8)
                for client in clients:
                    client.write(COUNTER_OFFSET, block)
                self.count += 1
            for client in clients:
                client.close()
        except BaseException as e:  # reported by the test
            self.failure = e


def test_a_group_point_is_one_cut_across_two_machines(rsite: ReplicatingSite):
    sources = ("source-a", "source-b")
    rsite.start(disk_size=16 * MiB, data_bytes=2 * MiB, sources=sources)
    for source in sources:
        rsite.enable("--group", "g1", source=source)
    for source in sources:
        rsite.wait_replicating(source=source)

    writer = OrderedWriter(rsite.nbd_uri("source-a"), rsite.nbd_uri("source-b"))
    writer.start()
    tags = []
    try:
        for _ in range(3):
            seen = writer.count
            wait_for(lambda seen=seen: writer.count >= seen + 20 or writer.failure, what="the writer to go on")
            views = rsite.create_group_point("g1")
            assert len(views) == 2 and len({v["point"]["tag_id"] for v in views}) == 1, views
            assert all("MULTI" in str(v["point"]["kind"]).upper() for v in views), views
            tags.append(views[0]["point"]["tag_id"])
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    assert writer.failure is None, f"the writer failed: {writer.failure!r}"
    assert writer.count > 60

    for source in sources:
        rsite.wait_caught_up(source=source)
    cuts = []
    for tag_id in tags:
        a = rsite.materialize(tag_id, source="source-a")
        b = rsite.materialize(tag_id, source="source-b")
        counters = (_counter(Path(a["path"])), _counter(Path(b["path"])))
        assert counters[1] <= counters[0] <= counters[1] + 1, f"point {tag_id} cut the machines apart: {counters}"
        cuts.append(counters[0])
        for result in (a, b):
            if result.get("copied"):
                os.unlink(result["path"])
    assert cuts == sorted(cuts) and cuts[0] > 0, cuts

    for source in sources:
        latest = rsite.materialize("latest", source=source)
        assert sha256(Path(latest["path"])) == sha256(rsite.disk_of(source))
