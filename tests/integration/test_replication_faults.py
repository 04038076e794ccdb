"""kill -9 of each daemon at a seeded random moment, during the initial sync and
during steady replication: each resumes from the last acknowledged seq.

After every case the target equals the source by hash, and the bytes sent again
are bounded: at most what was unacknowledged (the source's in-flight window)
plus one chunk — never a full resync.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from siterecovery.common.pb import admin_pb2

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))
WINDOW = 8 * MiB  # the source's in-flight window in these tests
CHUNK = 1 * MiB
DAEMONS = ("process-server", "master-target", "source-agent")


def _pairs(site: ReplicatingSite) -> admin_pb2.PairView:
    (pair,) = site.admin().ListPairs(admin_pb2.ListPairsRequest(machine=site.machine), timeout=10).pairs
    return pair


@pytest.mark.parametrize("daemon", DAEMONS)
def test_kill9_during_initial_sync_resumes_without_a_full_resync(rsite: ReplicatingSite, daemon: str):
    rng = random.Random(f"{SEED}-sync-{daemon}")
    data = 192 * MiB
    rsite.start(disk_size=512 * MiB, data_bytes=data, seed=rng.randrange(1 << 30), source_extra={"send_window_bytes": WINDOW})
    rsite.enable()
    threshold = rng.uniform(0.1, 0.6)
    wait_for(lambda: _pairs(rsite).sync_progress >= threshold, timeout=120, what=f"sync past {threshold:.0%}")
    before = _pairs(rsite)
    rsite.kill9(daemon)
    rsite.restart(daemon)
    rsite.wait_replicating()
    after = rsite.wait_caught_up()
    assert sha256(Path(after["target_path"])) == sha256(rsite.disk)
    if daemon == "source-agent":
        applied = int(after["applied_bytes_total"])
        assert applied <= data + WINDOW + CHUNK, f"{applied} bytes applied for {data} bytes of data"
    else:
        sent = int(after["source_bytes_sent"])
        assert sent <= data + WINDOW + CHUNK, f"{sent} bytes sent for {data} bytes of data"
    print(f"[fault] kill -9 {daemon} at {before.sync_progress:.0%} of the initial sync (seed {SEED}): held")


@pytest.mark.parametrize("daemon", ("process-server", "master-target"))
def test_kill9_during_steady_replication_loses_nothing(rsite: ReplicatingSite, daemon: str):
    rng = random.Random(f"{SEED}-steady-{daemon}")
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB, seed=rng.randrange(1 << 30), source_extra={"send_window_bytes": WINDOW})
    rsite.enable()
    rsite.wait_replicating()
    synced = rsite.wait_caught_up()
    base_sent = int(synced["source_bytes_sent"])

    writer_error: list[BaseException] = []

    def write() -> None:
        try:
            rsite.fio(size="32M", bs="16k", seed=rng.randrange(1 << 30), extra=("--rate=4m",))
        except BaseException as exc:
            writer_error.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    start_seq = _pairs(rsite).source_seq
    kill_after = rng.randrange(50, 400)  # frames
    wait_for(lambda: _pairs(rsite).source_seq >= start_seq + kill_after, timeout=60, what="writes to flow")
    rsite.kill9(daemon)
    rsite.restart(daemon)
    writer.join(timeout=300)
    assert not writer_error, writer_error
    tag = rsite.create_point()
    at_tag = sha256(rsite.disk)
    after = rsite.wait_caught_up()
    assert sha256(Path(after["target_path"])) == at_tag
    result = rsite.materialize(tag)
    assert sha256(Path(result["path"])) == at_tag
    resent = int(after["source_bytes_sent"]) - base_sent - 32 * MiB
    assert resent <= WINDOW + CHUNK, f"{resent} bytes sent again"
    print(f"[fault] kill -9 {daemon} {kill_after} frames into steady replication (seed {SEED}): held")


def test_kill9_of_the_source_agent_keeps_every_acknowledged_write(rsite: ReplicatingSite):
    rng = random.Random(f"{SEED}-steady-source")
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB, seed=rng.randrange(1 << 30), source_extra={"send_window_bytes": WINDOW})
    rsite.enable()
    rsite.wait_replicating()
    rsite.wait_caught_up()

    acknowledged: list[tuple[int, int, int]] = []  # offset, length, pattern of writes qemu-io finished
    kill_at = rng.randrange(5, 40)
    for _ in range(kill_at):
        offset, pattern = rng.randrange(0, 64 * MiB - 65536, 4096), rng.randrange(1, 255)
        rsite.qemu_io(f"write -P {pattern} {offset} 64k")
        acknowledged.append((offset, 65536, pattern))
    rsite.kill9("source-agent")
    rsite.restart("source-agent")
    with open(rsite.disk, "rb") as disk:
        # The latest write to each byte wins: check each write's bytes that no later write covered.
        for index, (offset, length, pattern) in enumerate(acknowledged):
            later = acknowledged[index + 1:]
            disk.seek(offset)
            data = disk.read(length)
            for i in range(0, length, 4096):
                if not any(o <= offset + i < o + n for o, n, _ in later):
                    assert data[i:i + 4096] == bytes([pattern]) * 4096, f"write {index} at {offset + i} was lost"
    rsite.qemu_io("write -P 0x77 0 128k")
    tag = rsite.create_point()
    at_tag = sha256(rsite.disk)
    rsite.wait_caught_up()
    assert sha256(Path(rsite.materialize(tag)["path"])) == at_tag
    print(f"[fault] kill -9 source-agent after {kill_at} acknowledged writes (seed {SEED}): held")
