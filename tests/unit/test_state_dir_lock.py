"""Two daemons on one state directory: the second is refused before it touches anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.common import daemon, errors


def test_the_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    held = daemon.lock_state_dir(tmp_path / "state", "source-agent")
    (tmp_path / "state" / "source-agent.state.json").write_text(json.dumps({"pid": 4242}))
    with pytest.raises(errors.Conflict) as refused:
        daemon.lock_state_dir(tmp_path / "state", "source-agent")
    assert refused.value.code == "state-dir-in-use" and "pid 4242" in refused.value.message
    assert refused.value.exit_code == 4
    daemon.lock_state_dir(tmp_path / "state", "master-target").close()  # another daemon's lock is its own
    held.close()
    daemon.lock_state_dir(tmp_path / "state", "source-agent").close()


def test_a_killed_holder_leaves_the_lock_free(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from siterecovery.common import daemon;"
         f"h = daemon.lock_state_dir(pathlib.Path({str(tmp_path)!r}), 'x'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(errors.Conflict):
            daemon.lock_state_dir(tmp_path, "x")
        child.kill()
        child.wait(10)
        daemon.lock_state_dir(tmp_path, "x").close()
    finally:
        child.kill()
