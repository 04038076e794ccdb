"""The integration tests' srctl fork server answers exactly as `python -m` srctl does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.srctl_forkserver import SrctlForkServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SRCTL_CONFIG", None)
    forkserver = SrctlForkServer(tmp_path_factory.mktemp("forkserver") / "log", env)
    yield forkserver, env
    forkserver.close()


@pytest.mark.parametrize(("args", "code"), [
    (["--help"], 0),                                   # the usage text names the program
    (["jobs", "show"], 2),                             # a usage error: typer's panel on stderr
    (["servers", "list", "--output", "json"], 3),      # no profile under HOME: message and hint
    (["--config", "garbage.toml", "machines", "list"], 2),  # found from the working directory, unreadable
])
def test_the_same_exit_code_stdout_and_stderr_as_a_real_run(server, tmp_path: Path, args: list[str], code: int) -> None:
    forkserver, env = server
    env = {**env, "HOME": str(tmp_path / "home")}
    (tmp_path / "garbage.toml").write_text("not = [toml")
    forked = forkserver.run(args, env=env, cwd=tmp_path, output_dir=tmp_path / "out")
    real = subprocess.run([sys.executable, "-m", "siterecovery.controller.cli.main", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert forked.returncode == code, forked.stderr


def test_a_call_with_another_width_is_refused(server, tmp_path: Path) -> None:
    forkserver, env = server
    with pytest.raises(ValueError, match="COLUMNS"):
        forkserver.run(["--help"], env={**env, "COLUMNS": "80"}, cwd=tmp_path, output_dir=tmp_path)


def test_close_ends_the_helper_by_hanging_up(tmp_path: Path) -> None:
    forkserver = SrctlForkServer(tmp_path / "log", {**os.environ, "COLUMNS": "120"})
    forkserver.close()
    assert forkserver._proc.returncode == 0, "the helper did not see the end of its input and was killed"
