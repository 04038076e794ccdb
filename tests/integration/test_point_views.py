"""Point views end to end: `srctl recovery-points open-view` through the configuration
server to the master target, read by nbdcopy over NBD while the source keeps writing;
`close-view`; and a master target killed with a view open.

Every check compares SHA-256 digests of whole disk images.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite, sha256

pytestmark = pytest.mark.slow


def _read(uri: str, out: Path) -> str:
    result = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        return sha256(out)
    finally:
        out.unlink()


def _open(rsite: ReplicatingSite, point: str) -> dict:
    return rsite.srctl_json("recovery-points", "open-view", rsite.machine, "--point", point)["view"]


def test_a_view_shows_its_point_while_writes_go_on_and_survives_nothing_it_should_not(
    rsite: ReplicatingSite, tmp_path: Path
):
    rsite.start(disk_size=64 * MiB, data_bytes=8 * MiB)
    rsite.enable()
    rsite.wait_replicating()
    rsite.qemu_io("write -P 0x5a 0 1M", "write -z 2M 512k", "flush")
    tag = rsite.create_point()
    at_tag = sha256(rsite.disk)
    rsite.fio(size="8M", seed=5)
    rsite.wait_caught_up()

    view = _open(rsite, tag)
    assert view["tag_id"] == tag and int(view["size_bytes"]) == 64 * MiB
    assert view["nbd_uri"].startswith("nbd://") and view["nbd_uri"].endswith(view["view_id"])
    # Writes go on after the view is opened and reach the target; the view stays the point.
    rsite.fio(size="16M", seed=6)
    rsite.qemu_io("write -P 0x11 0 4M", "flush")
    caught_up = rsite.wait_caught_up()
    assert sha256(Path(caught_up["target_path"])) == sha256(rsite.disk) != at_tag
    assert _read(view["nbd_uri"], tmp_path / "view.img") == at_tag
    # Replication status lists the open view (it pins the journal), table and JSON alike.
    listed = wait_for(lambda: rsite.pair().get("open_views"), what="the view in replication status")
    assert [(v["view_id"], v["tag_id"], int(v["seq"])) for v in listed] == [
        (view["view_id"], tag, int(view["seq"]))
    ]
    table = rsite.srctl("replication", "status", rsite.machine, "--output", "table")
    assert table.returncode == 0 and view["view_id"] in table.stdout and "close-view" in table.stdout

    closed = rsite.srctl_json("recovery-points", "close-view", rsite.machine, "--view", view["view_id"])
    assert closed["closed_view_ids"] == [view["view_id"]]
    wait_for(lambda: not rsite.pair().get("open_views"), what="the closed view to leave replication status")
    gone = subprocess.run(["nbdcopy", view["nbd_uri"], str(tmp_path / "gone.img")], capture_output=True, timeout=60)
    assert gone.returncode != 0
    refused = rsite.srctl("recovery-points", "open-view", rsite.machine, "--point", "no-such-tag")
    assert refused.returncode == 3, refused.stdout + refused.stderr

    # kill -9 of the master target with a view open: the view is gone, the pair resumes.
    view = _open(rsite, tag)
    rsite.kill9("master-target")
    rsite.restart("master-target")
    rsite.fio(size="4M", seed=7)
    after = rsite.wait_caught_up()
    assert sha256(Path(after["target_path"])) == sha256(rsite.disk)
    gone = subprocess.run(["nbdcopy", view["nbd_uri"], str(tmp_path / "gone.img")], capture_output=True, timeout=60)
    assert gone.returncode != 0
    again = _open(rsite, tag)
    assert _read(again["nbd_uri"], tmp_path / "again.img") == at_tag
    rsite.srctl_json("recovery-points", "close-view", rsite.machine)
