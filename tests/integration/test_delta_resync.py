"""Delta resync with real daemons: a pair enabled onto a target disk that already holds an
older copy of the source sends only the 64 KiB blocks that differ (failback to the original
disk, reprotect onto an existing replica), and a kill -9 of the source agent in the middle of
it resumes from the saved cursor instead of comparing the whole disk again.

The older copy is the source image with a random 1 % of its blocks overwritten, a few of its
data blocks zeroed and a few of its empty blocks filled; the bytes that must travel are the
differing blocks that hold data at the source (the others are zero ranges, which carry none).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.agents.master_target import digestmap
from siterecovery.common.pb import admin_pb2
from tests.conftest import needs_tools

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))
BLOCK = 64 * 1024
DIGEST = 16
# Slack on top of 5 %: what the bytes sent may exceed the differing data by.
SLACK = 1 * MiB


@dataclass
class Difference:
    blocks: int = 0
    data_bytes: int = 0  # differing blocks that hold data at the source: they travel
    zero_bytes: int = 0  # differing blocks that read as zeros at the source: zero ranges


def older_copy(image: Path, target: Path, *, seed: int, fraction: float, zeroed: int, filled: int) -> Difference:
    """Write `target`: `image` with `fraction` of its blocks overwritten, `zeroed` data blocks
    zeroed and `filled` empty blocks filled; returns how the two differ, block by block."""
    rng = random.Random(seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, target)
    blocks = image.stat().st_size // BLOCK
    with open(image, "rb") as src:
        empty = {b for b in range(blocks) if not src.read(BLOCK).strip(b"\0")}
    data = [b for b in range(blocks) if b not in empty]
    with open(target, "r+b") as f:
        for block in rng.sample(range(blocks), max(1, int(blocks * fraction))):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
        for block in rng.sample(data, zeroed):
            f.seek(block * BLOCK)
            f.write(bytes(BLOCK))
        for block in rng.sample(sorted(empty), filled):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
    out = Difference()
    with open(image, "rb") as a, open(target, "rb") as b:
        for block in range(blocks):
            if a.read(BLOCK) != b.read(BLOCK):
                out.blocks += 1
                if block in empty:
                    out.zero_bytes += BLOCK
                else:
                    out.data_bytes += BLOCK
    return out


def _datastore(site: ReplicatingSite) -> Path:
    return site.root / "master-target" / "datastore"


def _view(site: ReplicatingSite) -> admin_pb2.PairView:
    (pair,) = site.admin().ListPairs(admin_pb2.ListPairsRequest(machine=site.machine), timeout=10).pairs
    return pair


def _log_events(site: ReplicatingSite, name: str, event: str) -> list[dict]:
    found = []
    for line in (site.root / "logs" / f"{name}.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


@needs_tools("qemu-io")
def test_a_delta_pair_sends_only_the_differing_blocks(rsite: ReplicatingSite):
    size = 64 * MiB
    rsite.start(disk_size=size, data_bytes=48 * MiB, seed=SEED % 1000)
    target = _datastore(rsite) / "replicas" / "disk0-older.img"
    diff = older_copy(rsite.disk, target, seed=SEED, fraction=0.01, zeroed=3, filled=3)
    assert diff.data_bytes and diff.zero_bytes
    inode = target.stat().st_ino

    # Relative to the datastore; srctl shows the kind and, later, what it moved.
    (pair,) = rsite.srctl_json("replication", "enable", rsite.machine, "--disk", "disk0", "--sync", "delta",
                               "--target-path", "replicas/disk0-older.img")
    assert pair["sync_kind"] == "delta" and pair["target_path"] == str(target)
    rsite.wait_replicating()
    done = rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk)
    assert target.stat().st_ino == inode, "the existing disk was written in place"

    bound = 1.05 * diff.data_bytes + SLACK
    sent, applied, moved = (int(done[k]) for k in ("source_bytes_sent", "applied_bytes_total", "sync_sent_bytes"))
    assert diff.data_bytes <= moved <= bound, (moved, diff)
    assert sent <= bound and applied <= bound, (sent, applied, diff)
    assert int(done["sync_differing_bytes"]) == diff.data_bytes + diff.zero_bytes
    assert int(done["sync_compared_bytes"]) == size
    assert int(done["sync_hash_bytes"]) == size // BLOCK * DIGEST
    table = rsite.srctl("replication", "status", rsite.machine)
    assert table.returncode == 0 and "delta:" in table.stdout, table.stdout
    print(f"[delta] {size // MiB} MiB disk, {diff.blocks} of {size // BLOCK} blocks differ "
          f"({diff.data_bytes / MiB:.2f} MiB of data, {diff.zero_bytes / MiB:.2f} MiB zeroed): source sent "
          f"{sent / MiB:.2f} MiB, master target applied {applied / MiB:.2f} MiB, "
          f"{int(done['sync_hash_bytes']) / 1024:.0f} KiB of digests")

    # From here on it is an ordinary pair: writes replicate, points materialise.
    rsite.qemu_io("write -P 0x6b 1M 192k", "write -z 9M 64k")
    point = rsite.create_point()
    at_point = sha256(rsite.disk)
    rsite.wait_caught_up()
    assert sha256(target) == at_point
    assert sha256(Path(rsite.materialize(point)["path"])) == at_point


def test_a_delta_pair_onto_a_disk_of_another_size_is_refused_with_a_hint(rsite: ReplicatingSite):
    rsite.start(disk_size=16 * MiB, data_bytes=4 * MiB, seed=2)
    target = _datastore(rsite) / "replicas" / "small.img"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        f.truncate(8 * MiB)
    rsite.enable("--sync", "delta", "--target-path", str(target))

    def refused():
        pair = rsite.pair()
        return pair if pair["state"] == "error" else None

    pair = wait_for(refused, what="the master target to refuse the target disk")
    assert pair["reason_code"] == "target-size-mismatch", pair
    assert "resize" in pair["reason"] and "delta" in pair["reason"]
    assert target.stat().st_size == 8 * MiB  # left as it was


def test_kill9_of_the_source_during_a_delta_sync_resumes_from_its_cursor(rsite: ReplicatingSite):
    rng = random.Random(f"{SEED}-delta-kill")
    size, window, batch = 512 * MiB, 8 * MiB, 256
    rsite.start(disk_size=size, data_bytes=384 * MiB, seed=rng.randrange(1 << 30),
                source_extra={"send_window_bytes": window, "delta_hash_blocks": batch})
    target = _datastore(rsite) / "replicas" / "disk0.img"
    diff = older_copy(rsite.disk, target, seed=rng.randrange(1 << 30), fraction=0.5, zeroed=16, filled=16)
    rsite.enable("--sync", "delta", "--target-path", str(target))
    threshold = rng.uniform(0.1, 0.4)
    wait_for(lambda: _view(rsite).sync_progress >= threshold, timeout=120, what=f"delta sync past {threshold:.0%}")
    before = _view(rsite)
    rsite.kill9("source-agent")
    state = json.loads((rsite.root / "source-agent" / "pairs" / before.pair_id / "state.json").read_text())
    cursor = int(state["sync_cursor"])
    assert state["sync_phase"] == "copying" and state["sync_kind"] == "delta", "killed after the sync ended"
    assert 0 < cursor < size
    rsite.restart("source-agent")
    rsite.wait_replicating()
    after = rsite.wait_caught_up()

    assert sha256(target) == sha256(rsite.disk)
    # Resumed, not started over: one start of the sync in the source's log, and the restarted
    # agent asked only for the digests of the blocks after the saved cursor.
    assert len(_log_events(rsite, "source-agent", "initial sync started")) == 1
    (finished,) = _log_events(rsite, "source-agent", "delta sync done")
    rest = -(-(size - cursor) // (batch * BLOCK))
    assert finished["fetches"] <= rest + 2, (finished["fetches"], rest, cursor)
    # Bounded resend: the master target applied the differing data once, plus at most the
    # unacknowledged window and one group of it again.
    applied = int(after["applied_bytes_total"])
    assert diff.data_bytes <= applied <= diff.data_bytes + window + MiB, (applied, diff)
    print(f"[delta fault] kill -9 source-agent at {before.sync_progress:.0%} of the delta sync (cursor "
          f"{cursor // MiB} MiB, seed {SEED}): {finished['fetches']} digest calls after the restart for the "
          f"{(size - cursor) // MiB} MiB left; {diff.data_bytes / MiB:.1f} MiB differing, "
          f"{applied / MiB:.1f} MiB applied")


# -- the master target's digest map (agents/master_target/digestmap.py) -----------------------------


def _digest_map(site: ReplicatingSite) -> Path | None:
    found = list((site.root / "master-target").rglob(".digest-maps/*.map"))
    assert len(found) <= 1, found
    return found[0] if found else None


def _map_state(site: ReplicatingSite) -> int | None:
    """The state in the digest map's header (digestmap.CLEAN or DIRTY), None when there is no map."""
    path = _digest_map(site)
    if path is None:
        return None
    with open(path, "rb") as f:
        return digestmap.HEADER.unpack_from(f.read(digestmap.HEADER.size))[2]


def _disable_and_wait_saved(site: ReplicatingSite) -> None:
    """Disable the pair; wait until the master target closed it and saved its target's digest map."""
    site.srctl_json("replication", "disable", site.machine)
    wait_for(lambda: not site.srctl_json("replication", "status", site.machine), what="the pair to be gone")
    wait_for(lambda: _map_state(site) == digestmap.CLEAN, what="the digest map to be saved clean")


def _overwrite(path: Path, blocks: list[int], rng: random.Random) -> None:
    with open(path, "r+b") as f:
        for block in blocks:
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))


def _map_opened(site: ReplicatingSite) -> list[dict]:
    return _log_events(site, "master-target", "digest map opened")


def test_a_digest_map_is_not_trusted_once_the_target_changed_behind_the_master_target(rsite: ReplicatingSite):
    """A VM ran on the replica after failover: its writes must travel back although the master target's
    digest map (saved when the old pair closed) still describes the disk as the master target left it."""
    rng = random.Random(f"{SEED}-digest-stale")
    size = 64 * MiB
    rsite.start(disk_size=size, data_bytes=48 * MiB, seed=rng.randrange(1 << 30))
    (pair,) = rsite.srctl_json("replication", "enable", rsite.machine, "--disk", "disk0")
    target = Path(pair["target_path"])
    rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk)
    _disable_and_wait_saved(rsite)

    # First, unchanged: the next pair onto the file trusts the map (and reads no block of it).
    blocks = rng.sample(range(size // BLOCK), 40)
    _overwrite(rsite.disk, blocks[:20], rng)  # the source changes while the pair is off
    (pair,) = rsite.srctl_json("replication", "enable", rsite.machine, "--disk", "disk0", "--sync", "delta")
    assert pair["target_path"] == str(target)
    rsite.wait_replicating()
    done = rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk)
    assert _map_opened(rsite)[-1]["trusted"], _map_opened(rsite)
    assert int(done["sync_differing_bytes"]) == 20 * BLOCK
    _disable_and_wait_saved(rsite)

    # Then the replica is written behind the master target's back (as a VM booted on it would)
    # in blocks the source leaves alone, and the source changes elsewhere: both must travel.
    _overwrite(target, blocks[20:30], rng)
    _overwrite(rsite.disk, blocks[30:], rng)
    rsite.srctl_json("replication", "enable", rsite.machine, "--disk", "disk0", "--sync", "delta")
    rsite.wait_replicating()
    done = rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk), "a stale digest map was trusted"
    last = _map_opened(rsite)[-1]
    assert not last["trusted"] and last["reason"].startswith("the target file changed"), last
    assert int(done["sync_differing_bytes"]) == 20 * BLOCK


@needs_tools("qemu-io")
def test_kill9_of_the_master_target_during_a_delta_sync_discards_its_digest_map(rsite: ReplicatingSite):
    rng = random.Random(f"{SEED}-digest-kill")
    size, window = 256 * MiB, 8 * MiB
    rsite.start(disk_size=size, data_bytes=192 * MiB, seed=rng.randrange(1 << 30),
                source_extra={"send_window_bytes": window, "delta_hash_blocks": 256})
    (pair,) = rsite.srctl_json("replication", "enable", rsite.machine, "--disk", "disk0")
    target = Path(pair["target_path"])
    rsite.wait_replicating()
    rsite.wait_caught_up()
    _disable_and_wait_saved(rsite)

    # Half of the source's blocks change; the master target dies while it applies them.
    _overwrite(rsite.disk, rng.sample(range(size // BLOCK), size // BLOCK // 2), rng)
    rsite.enable("--sync", "delta")
    threshold = rng.uniform(0.1, 0.5)
    wait_for(lambda: _view(rsite).sync_progress >= threshold, timeout=120, what=f"delta sync past {threshold:.0%}")
    rsite.kill9("master-target")
    assert _map_state(rsite) == digestmap.DIRTY, "the map said clean while the master target wrote the target"
    rsite.restart("master-target")
    rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk)
    reopened = _map_opened(rsite)[-1]
    assert not reopened["trusted"] and reopened["reason"].startswith("dirty"), reopened

    # Writes while replicating (16 KiB, in part of their blocks), then the map the master target
    # rebuilt since the crash carries the next delta resync.
    rsite.qemu_io("write -P 0x33 100k 16k", "write -P 0x44 5M 64k", "write -z 9M 8k")
    rsite.wait_caught_up()
    _disable_and_wait_saved(rsite)
    _overwrite(rsite.disk, rng.sample(range(size // BLOCK), size // BLOCK // 100), rng)
    rsite.enable("--sync", "delta")
    rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(target) == sha256(rsite.disk)
    assert _map_opened(rsite)[-1]["trusted"], _map_opened(rsite)[-1]
    print(f"[digest map] kill -9 master-target at {threshold:.0%} of a delta sync (seed {SEED}): map dirty, "
          "discarded at the restart; target equal to the source after it and after one more delta resync")
