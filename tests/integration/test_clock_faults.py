"""Wall clocks stepped under running daemons (libfaketime, one daemon at a time):
the master target two, then three days ahead, the source agent back two minutes.
Replication goes on, no recovery point expires early (the retention window
needs the source's capture times and the master target's clock to agree), and
every point still materialises to what the source held when it was taken.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, faketime_library, sha256

pytestmark = pytest.mark.slow


def _heartbeat_after_now(rsite: ReplicatingSite, name: str) -> None:
    """Until `name` heartbeats after this moment (the master target prunes when it heartbeats)."""
    mt_id = rsite.agents[name].state["agent_id"]
    since = datetime.now(UTC)

    def beat():
        (server,) = [s for s in rsite.servers() if s["id"] == mt_id]
        return datetime.fromisoformat(server["last_heartbeat_at"].replace("Z", "+00:00")) > since

    wait_for(beat, what=f"a heartbeat from {name}")


def test_stepped_clocks_expire_no_point_and_lose_nothing(rsite: ReplicatingSite):
    faketime_library()
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB, faked_clocks=("master-target", "source-agent"))
    rsite.enable()
    rsite.wait_replicating()
    points: dict[str, str] = {}

    def write_and_point(pattern: int, offset_mib: int) -> None:
        rsite.qemu_io(f"write -P {pattern} {offset_mib}M 256k")
        points[rsite.create_point()] = sha256(rsite.disk)

    write_and_point(0x11, 1)
    write_and_point(0x22, 2)
    # The master target's clock jumps two days ahead (past the 24 h retention
    # window), and later one more day; it prunes when it heartbeats after each.
    rsite.step_clock("master-target", "+2d")
    _heartbeat_after_now(rsite, "master-target")
    write_and_point(0x33, 3)
    rsite.wait_caught_up()
    rsite.step_clock("master-target", "+3d")
    _heartbeat_after_now(rsite, "master-target")
    # The source's clock steps back two minutes: its captures go back in time.
    rsite.step_clock("source-agent", "-2m")
    write_and_point(0x44, 4)
    pair = rsite.wait_caught_up()
    _heartbeat_after_now(rsite, "master-target")

    listed = [p["point"]["tag_id"] for p in rsite.points()]
    assert set(points) <= set(listed), f"points expired early: {sorted(set(points) - set(listed))}"
    assert sha256(Path(pair["target_path"])) == sha256(rsite.disk)
    for tag_id, digest in points.items():
        result = rsite.materialize(tag_id)
        assert sha256(Path(result["path"])) == digest, f"point {tag_id} does not match"
        if result.get("copied"):
            Path(result["path"]).unlink()
