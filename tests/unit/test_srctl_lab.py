"""Where srctl looks for the lab, and how `srctl lab status` tells whose health a row shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from siterecovery.common.daemon import write_json_atomically
from siterecovery.common.pb import common_pb2
from siterecovery.controller import launcher
from siterecovery.controller.cli import lab, output
from siterecovery.controller.cli.client import Profile, candidate_profiles, lab_dir, lab_profile
from siterecovery.controller.protection.environment import LocalSites


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of its own, with none of srctl's variables set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("SRCTL_CONFIG", "SRCTL_LAB_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def _write_profile(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        (path.parent / name).write_text(name)
    path.write_text('server = "127.0.0.1:1"\nca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n')
    return path


def test_the_profile_lookup_finds_the_lab_in_srctl_lab_dir(home: Path, tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "labs" / "mine"
    monkeypatch.setenv("SRCTL_LAB_DIR", str(elsewhere))
    profile = _write_profile(elsewhere / "config-server" / "admin" / "srctl.toml")
    _write_profile(lab_profile(home / ".local" / "state" / "siterecovery" / "lab"))  # a lab in the default place too

    assert lab_dir() == elsewhere.resolve() == lab.lab_dir_of(None)
    assert candidate_profiles(None)[0] == profile.resolve()
    assert Profile.find().path == profile.resolve()


def test_dir_beats_srctl_lab_dir_and_srctl_config_beats_the_lab(home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SRCTL_LAB_DIR", str(tmp_path / "env-lab"))
    assert lab.lab_dir_of(tmp_path / "flag-lab") == (tmp_path / "flag-lab").resolve()
    _write_profile(lab_profile(tmp_path / "env-lab"))
    chosen = _write_profile(tmp_path / "profile" / "srctl.toml")
    monkeypatch.setenv("SRCTL_CONFIG", str(chosen))
    assert Profile.find().path == chosen


def test_without_srctl_lab_dir_the_default_lab_is_looked_at(home: Path) -> None:
    assert candidate_profiles(None)[0] == lab_profile(home / ".local" / "state" / "siterecovery" / "lab").resolve()


@pytest.mark.parametrize("in_env", [True, False])
def test_lab_up_says_to_export_srctl_config_only_when_the_lookup_would_miss_the_lab(
    home: Path, tmp_path: Path, monkeypatch, capsys, in_env: bool
) -> None:
    where = (tmp_path / "labs" / "mine").resolve()
    if in_env:
        monkeypatch.setenv("SRCTL_LAB_DIR", str(where))
    profile = Profile.load(_write_profile(lab_profile(where)))
    monkeypatch.setattr(output, "console", Console(width=1000))  # no line of the summary wrapped
    lab.Summary(where, [], [], profile, LocalSites(where / "sites"), None).print()
    printed = capsys.readouterr().out
    assert f"srctl profile: {profile.path}" in printed
    assert ("export SRCTL_CONFIG" in printed) is not in_env


# -- lab status ------------------------------------------------------------------------------------------


def _this_process(name: str, state_dir: Path, **state: object) -> launcher.Launched:
    """A lab daemon that "runs": this test's own process stands in for it."""
    me = psutil.Process(os.getpid())
    return launcher.Launched(name, me.pid, me.create_time(), state_dir, state_dir / "log", dict(state))


def _vm(site_dir: Path, name: str, agent_id: str, port: int) -> None:
    """A running local VM as the local provider keeps it: vm.json, and its agent's state file."""
    vm_dir = site_dir / "vms" / name
    vm_dir.mkdir(parents=True)
    (vm_dir / "vm.json").write_text(json.dumps({"name": name, "uuid": f"uuid-{agent_id}", "power": "on", "disks": []}))
    write_json_atomically(vm_dir / "agent" / "source-agent.state.json",
                          {"agent_id": agent_id, "nbd": {"disk0": f"nbd://127.0.0.1:{port}/disk0"}})


def _server(server_id: str, hostname: str, health: int, role: int = common_pb2.ROLE_SOURCE) -> common_pb2.ServerInfo:
    return common_pb2.ServerInfo(id=server_id, role=role, hostname=hostname, health=health)


def test_lab_status_shows_each_row_the_health_of_its_own_server_not_of_its_host_name(tmp_path: Path) -> None:
    ps_dir = tmp_path / "ps-onprem"
    write_json_atomically(ps_dir / "process-server.state.json", {"agent_id": "ps-now", "port": 1})
    daemons = [_this_process("config-server", tmp_path / "config-server", port=2),
               _this_process("process-server", ps_dir, port=1, agent_id="ps-now")]
    _vm(tmp_path / "sites" / "onprem", "app01", "src-onprem", 10809)
    _vm(tmp_path / "sites" / "cloud", "app01", "src-cloud", 10810)
    servers = [
        _server("config-server", "labhost", common_pb2.HEALTH_HEALTHY, common_pb2.ROLE_CONFIG_SERVER),
        _server("ps-now", "ps-onprem", common_pb2.HEALTH_HEALTHY, common_pb2.ROLE_PROCESS_SERVER),
        _server("src-onprem", "app01", common_pb2.HEALTH_HEALTHY),
        _server("src-cloud", "app01", common_pb2.HEALTH_WARNING),
        # An agent that enrolled again under the same names leaves its old, silent row behind.
        _server("ps-before", "ps-onprem", common_pb2.HEALTH_CRITICAL, common_pb2.ROLE_PROCESS_SERVER),
        _server("src-before", "app01", common_pb2.HEALTH_CRITICAL),
    ]

    daemon_rows, vm_rows = lab.status_rows(tmp_path, daemons, ["config-server", "ps-onprem"], servers)

    assert [(r["component"], r["running"], r["health"]) for r in daemon_rows] == [
        ("config-server", "yes", "healthy"), ("ps-onprem", "yes", "healthy")]
    assert [(r["component"], r["health"]) for r in vm_rows] == [
        ("vm app01 (on-premises)", "healthy"), ("vm app01 (cloud)", "warning")]


def test_lab_status_says_unknown_for_a_process_the_server_does_not_list(tmp_path: Path) -> None:
    ps_dir = tmp_path / "ps-onprem"
    write_json_atomically(ps_dir / "process-server.state.json", {"agent_id": "ps-now", "port": 1})
    rows, _ = lab.status_rows(tmp_path, [_this_process("process-server", ps_dir, port=1)], ["ps-onprem"],
                              [_server("ps-before", "ps-onprem", common_pb2.HEALTH_HEALTHY)])
    assert rows[0]["health"] == "unknown"
