"""The fault suite: kill -9 of every daemon, again and again, while a writer keeps
writing through the source agent's NBD export.

`SR_FAULT_ITERATIONS` kills per daemon (default 20), in a seeded random order
and at seeded random moments (`SR_FAULT_SEED`). The writer acknowledges a write
only when the NBD reply came back; when the source agent dies it reconnects to
the restarted one and carries on. At the end:

- every acknowledged write is on the source disk (the last one to each block);
- the target equals the source by hash, and so does the latest recovery point;
- the master target applied exactly what was written (plus at most one write
  per lost connection whose reply never came): every resent frame was applied
  once, and nothing was synced again.

It prints what it tried and what held.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from tests.nbd_raw import Raw

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))
ITERATIONS = int(os.environ.get("SR_FAULT_ITERATIONS", "20"))
DAEMONS = ("process-server", "master-target", "source-agent")
DISK = 32 * MiB
BLOCK = 64 * 1024
WINDOW = 4 * MiB
CHUNK = MiB
PACE = 0.02


class Writer(threading.Thread):
    """Random 64 KiB writes; remembers, per block, the last acknowledged payload and
    whether a write to it was in flight when the connection died (its outcome is
    then unknown, and that block is not checked)."""

    def __init__(self, site: ReplicatingSite, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.site, self.rng = site, rng
        self.stop = threading.Event()
        self.acked: dict[int, bytes] = {}
        self.unknown: set[int] = set()
        self.written = 0
        self.reconnects = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        client = None
        try:
            while not self.stop.is_set():
                if client is None:
                    client = self._connect()
                    if client is None:
                        continue
                block = self.rng.randrange(DISK // BLOCK)
                payload = self.rng.randbytes(BLOCK)
                try:
                    client.write(block * BLOCK, payload)
                except OSError:
                    self.unknown.add(block)
                    client = None
                    self.reconnects += 1
                    continue
                self.acked[block] = payload
                self.unknown.discard(block)
                self.written += BLOCK
                self.stop.wait(PACE)  # about 3 MiB/s: a steady load, not a flood the kills drown in
        except BaseException as e:  # reported by the test
            self.failure = e

    def _connect(self) -> Raw | None:
        try:
            return Raw.open(self.site.nbd_uri())
        except (OSError, KeyError, TypeError):
            self.stop.wait(0.05)  # the source agent is restarting; its new address is not written yet
            return None


def nothing_lost(rsite: ReplicatingSite, writer: Writer) -> dict:
    """The writer ran without failing, every write it saw acknowledged is on the source disk (but
    those whose outcome a lost connection hid), and the target and a point taken now equal the
    source by hash. Returns the caught-up pair."""
    assert writer.failure is None, f"the writer failed: {writer.failure!r}"
    with open(rsite.disk, "rb") as disk:
        for block, payload in writer.acked.items():
            if block not in writer.unknown:
                disk.seek(block * BLOCK)
                assert disk.read(BLOCK) == payload, f"the acknowledged write to block {block} was lost"
    tag = rsite.create_point()
    at_tag = sha256(rsite.disk)
    pair = rsite.wait_caught_up(timeout=180)
    assert sha256(Path(pair["target_path"])) == at_tag
    assert sha256(Path(rsite.materialize(tag)["path"])) == at_tag
    return pair


# Alone it took 228 s at load 8 on the 2-core machine; the suite-wide
# 300 s limit cut it short on a loaded machine in the middle of a master target restart.
@pytest.mark.timeout(600)
def test_kill9_of_every_daemon_again_and_again_loses_nothing(rsite: ReplicatingSite):
    rng = random.Random(f"{SEED}-suite")
    rsite.start(disk_size=DISK, data_bytes=4 * MiB, seed=rng.randrange(1 << 30),
                source_extra={"send_window_bytes": WINDOW})
    rsite.enable()
    rsite.wait_replicating()
    base_applied = int(rsite.wait_caught_up()["applied_bytes_total"])

    writer = Writer(rsite, random.Random(rng.randrange(1 << 30)))
    writer.start()
    plan = [d for d in DAEMONS for _ in range(ITERATIONS)]
    rng.shuffle(plan)
    tried: dict[str, int] = dict.fromkeys(DAEMONS, 0)
    try:
        for daemon in plan:
            # A random moment: after the writer's next 1-40 writes.
            target = writer.written + rng.randrange(1, 40) * BLOCK
            wait_for(lambda t=target: writer.written >= t or writer.failure, timeout=60, what="writes before a kill")
            applied = int(rsite.pair().get("applied_seq", 0))
            rsite.kill9(daemon)
            rsite.restart(daemon)
            tried[daemon] += 1
            # The pipeline resumed: the master target applies past where it stood.
            wait_for(lambda a=applied: int(rsite.pair().get("applied_seq", 0)) > a or writer.failure,
                     timeout=120, what=f"replication to resume after kill -9 {daemon}")
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    pair = nothing_lost(rsite, writer)
    # The master target's count survives every kill. Resent frames are applied once
    # (same seq), so the data applied is what was written, plus at most the one write
    # per lost connection that was journaled but not acknowledged; a resync would add
    # the whole disk's data.
    applied = int(pair["applied_bytes_total"]) - base_applied
    assert writer.written <= applied <= writer.written + writer.reconnects * BLOCK, (
        f"{applied} bytes applied for {writer.written} written ({writer.reconnects} lost connections)"
    )
    print(
        f"[fault suite] seed {SEED}: kill -9 {tried}; {writer.written // MiB} MiB written in "
        f"{len(writer.acked)} blocks, {writer.reconnects} writer reconnects; {applied // MiB} MiB applied; "
        "every acknowledged write, the target and the point held"
    )


@pytest.mark.timeout(600)
def test_kill9_of_the_source_while_its_pair_tracks_and_catches_up_loses_nothing(rsite: ReplicatingSite):
    """The process server is away long enough for the source's journal to pass its limit, so the
    pair tracks changed blocks (capture.py, "Journal limit"); the source agent is killed -9 while it
    tracks and again while it catches up. Every acknowledged write is on the disk, and the target
    and a point taken afterwards equal the source: the map of changed blocks outlived each kill."""
    rng = random.Random(f"{SEED}-tracking")
    rsite.start(disk_size=DISK, data_bytes=4 * MiB, seed=rng.randrange(1 << 30),
                source_extra={"send_window_bytes": WINDOW, "journal_limit_bytes": 16 * MiB})
    rsite.enable()
    rsite.wait_replicating()
    rsite.wait_caught_up()

    writer = Writer(rsite, random.Random(rng.randrange(1 << 30)))
    writer.start()
    kills = 0
    try:
        rsite.kill9("process-server")
        wait_for(lambda: rsite.pair().get("reason_code") == "journal-full" or writer.failure, timeout=120,
                 what="the pair to track changed blocks")
        for _ in range(3):  # while it tracks
            target = writer.written + rng.randrange(1, 40) * BLOCK
            wait_for(lambda t=target: writer.written >= t or writer.failure, timeout=60, what="writes before a kill")
            rsite.kill9("source-agent")
            rsite.restart("source-agent")
            kills += 1
        wait_for(lambda: rsite.pair().get("reason_code") == "journal-full" or writer.failure, timeout=120,
                 what="the restarted source to track again")
        rsite.restart("process-server")
        for _ in range(3):  # while it catches up (or just after)
            target = writer.written + rng.randrange(1, 20) * BLOCK
            wait_for(lambda t=target: writer.written >= t or writer.failure, timeout=60, what="writes before a kill")
            rsite.kill9("source-agent")
            rsite.restart("source-agent")
            kills += 1
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    nothing_lost(rsite, writer)
    print(f"[fault suite] tracking: {kills} kills of the source agent, {writer.written // MiB} MiB written, "
          f"{writer.reconnects} writer reconnects; every acknowledged write, the target and the point held")
