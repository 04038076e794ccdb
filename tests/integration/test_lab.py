"""`srctl lab up|status|down` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml


def srctl(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "COLUMNS": "200"}
    env.pop("SRCTL_CONFIG", None)
    env.pop("SRCTL_LAB_DIR", None)
    env.pop("XDG_STATE_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "siterecovery.controller.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


@pytest.mark.slow
def test_lab_up_status_down_leaves_nothing_behind(tmp_path: Path):
    lab = tmp_path / "lab"
    up = srctl("lab", "up", "--dir", str(lab), home=tmp_path)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Lab is up" in up.stdout
        status = srctl("lab", "status", "--dir", str(lab), "--output", "json", home=tmp_path)
        assert status.returncode == 0, status.stderr
        daemons = json.loads(status.stdout)["daemons"]
        pids = [d["pid"] for d in daemons]
        assert [d["component"] for d in daemons] == ["config-server", "ps-onprem", "mt-onprem", "ps-cloud", "mt-cloud"]
        assert all(d["running"] == "yes" for d in daemons)
        assert [d["health"] for d in daemons] == ["healthy"] * 5
        for d in daemons:  # every lab daemon serves its metrics on a port of its own
            page = urllib.request.urlopen(d["metrics"], timeout=10).read().decode()
            assert "siterecovery_build_info{" in page, d["component"]
        (vm,) = json.loads(status.stdout)["vms"]
        assert vm["component"] == "vm app01 (on-premises)" and vm["running"] == "yes"
        vm_dir = lab / "sites" / "onprem" / "vms" / "app01"
        pids.append(json.loads((vm_dir / "agent" / "launched.json").read_text())["pid"])
        image = vm_dir / "disk0.img"
        assert image.stat().st_size == 256 * 1024 * 1024

        profile = lab / "config-server" / "admin" / "srctl.toml"
        machines = srctl("--config", str(profile), "machines", "list", "--output", "json", home=tmp_path)
        assert json.loads(machines.stdout)[0]["disks"][0]["path"] == str(image)

        again = srctl("lab", "up", "--dir", str(lab), home=tmp_path)
        assert again.returncode == 4 and "already runs" in again.stderr

        passphrase = (lab / "config" / "passphrase").read_text().strip()
        for log in [*(lab / "logs").iterdir(), vm_dir / "agent.log"]:
            assert passphrase not in log.read_text(), f"{log.name} logs the passphrase"
        assert (vm_dir / "agent" / "passphrase").stat().st_mode & 0o077 == 0
    finally:
        down = srctl("lab", "down", "--dir", str(lab), home=tmp_path)
    assert down.returncode == 0, down.stderr
    assert pids and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    gone = srctl("lab", "status", "--dir", str(lab), home=tmp_path)
    assert gone.returncode == 3 and "srctl lab up" in gone.stderr


@pytest.mark.slow
def test_srctl_finds_the_default_lab_without_flags(tmp_path: Path):
    up = srctl("lab", "up", "--output", "yaml", home=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        summary = yaml.safe_load(up.stdout)  # for scripts: where everything is, as YAML (or JSON)
        assert summary["protected"]["name"] == "app01" and summary["vms"][0]["nbd"]["disk0"].startswith("nbd://")
        assert [p["component"] for p in summary["processes"]][0] == "config-server"
        servers = srctl("servers", "list", "--output", "json", home=tmp_path)
        assert servers.returncode == 0, servers.stderr
        assert sorted(s["role"] for s in json.loads(servers.stdout)) == [
            "config-server", "master-target", "master-target", "process-server", "process-server", "source"
        ]
    finally:
        down = srctl("lab", "down", "--purge", "--output", "yaml", home=tmp_path)
        assert down.returncode == 0 and yaml.safe_load(down.stdout)["removed"] is True, down.stderr
    assert not (tmp_path / ".local" / "state" / "siterecovery" / "lab").exists()


@pytest.mark.slow
def test_drill_runs_the_whole_cycle_and_every_verdict_holds(tmp_path: Path):
    lab = tmp_path / "lab"
    try:
        drill = srctl("drill", "--dir", str(lab), "--output", "json", home=tmp_path)
        assert drill.returncode == 0, drill.stdout + drill.stderr
        report = json.loads(drill.stdout[drill.stdout.index("{"):])
        phases = {p["name"]: p for p in report["phases"]}
        assert report["ok"] and list(phases) == [
            "protect to the cloud", "write on-premises", "fail over to the cloud", "write in the cloud",
            "reprotect to on-premises", "fail back to on-premises", "reprotect to the cloud", "delete the cloud VM",
        ]
        assert all(p["verdict"] in ("ok", "-") for p in phases.values())
        # Only the blocks written in the cloud travel back: far less than the 256 MiB disk.
        assert 0 < phases["reprotect to on-premises"]["bytes_moved"] <= 32 * 1024 * 1024
        again = srctl("drill", "--dir", str(lab), "--output", "json", home=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        assert srctl("lab", "down", "--dir", str(lab), "--purge", home=tmp_path).returncode == 0
