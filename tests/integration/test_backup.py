"""`srctl backup create` on a working server, `srctl backup restore` on a "new host"
(an empty state directory), and the agents and operators carry on against it at
the same address."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from siterecovery.controller import launcher

from .conftest import Site, wait_for

PASSPHRASE = "a backup passphrase kept elsewhere"


@pytest.fixture
def site(tmp_path: Path):
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


def _passphrase_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return path


def _healthy(site: Site, ids: set[str]):
    servers = {s["id"]: s for s in site.servers()}
    return ids <= set(servers) and all(servers[i]["health"] == "healthy" for i in ids)


def test_a_restored_server_keeps_its_agents_and_operators(site: Site, tmp_path: Path):
    site.start_config_server()
    agents = [site.start_agent("process-server"), site.start_agent("source-agent")]
    ids = {a.state["agent_id"] for a in agents}
    wait_for(lambda: _healthy(site, ids), what="healthy agents")
    alice = site.srctl_json("user", "add", "alice", "--role", "reader", "--out", str(tmp_path / "alice"))
    secret = _passphrase_file(tmp_path / "backup-pass", PASSPHRASE)
    archive = tmp_path / "cs.srbackup"

    made = site.srctl_json("backup", "create", "--out", str(archive), "--passphrase-file", str(secret))
    assert made["bytes"] == archive.stat().st_size > 0 and archive.stat().st_mode & 0o777 == 0o600

    # The host is lost: the server stops and its state directory is gone.
    port = site.cs_port
    assert site.cs is not None
    launcher.stop(site.cs, grace=10)
    shutil.move(site.cs_dir, tmp_path / "lost-host")

    # A wrong passphrase is refused and writes nothing.
    wrong = site.srctl("backup", "restore", str(archive), "--state-dir", str(site.cs_dir),
                       "--passphrase-file", str(_passphrase_file(tmp_path / "wrong", "not the right one!")))
    assert wrong.returncode == 7 and "wrong passphrase" in wrong.stderr
    assert not (site.cs_dir / "pki").exists()

    restored = site.srctl("backup", "restore", str(archive), "--state-dir", str(site.cs_dir),
                          "--passphrase-file", str(secret), "--output", "json")
    assert restored.returncode == 0, restored.stderr
    site.start_config_server(port=port)

    # Agents never enrolled again: their heartbeats reach the restored server.
    assert site.cs_port == port
    first_seen = {s["id"]: s.get("last_heartbeat_at") for s in site.servers()}
    wait_for(
        lambda: _healthy(site, ids)
        and all(s.get("last_heartbeat_at") != first_seen.get(s["id"]) for s in site.servers() if s["id"] in ids),
        what="heartbeats from the agents to the restored server",
    )
    # Operators too: alice's certificate still works, and she is still a reader.
    listed = site.srctl("servers", "list", config=Path(alice["profile"]))
    assert listed.returncode == 0, listed.stderr
    assert [(o["name"], o["role"]) for o in site.srctl_json("user", "list")] == [("alice", "reader")]
