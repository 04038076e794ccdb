"""The configuration server on PostgreSQL: the same behaviour, and state that outlives the process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomli_w

from siterecovery.controller import launcher

from .conftest import HEARTBEAT, Site, wait_for


@pytest.mark.postgres
def test_config_server_on_postgresql_keeps_its_agents_across_a_restart(site: Site, postgres_url: str):
    site.start_config_server(store_url=postgres_url)
    assert not (site.cs_dir / "store.db").exists()
    site.start_agent("process-server")
    site.start_agent("source-agent")
    servers = wait_for(
        lambda: len(found := site.servers()) == 2 and all(s["health"] == "healthy" for s in found) and found,
        what="two healthy agents",
    )
    assert site.cs is not None and launcher.stop(site.cs)
    site.daemons.remove(site.cs)
    site.start_config_server(port=site.cs_port, store_url=postgres_url)
    assert {s["id"] for s in site.servers()} == {s["id"] for s in servers}
    assert len(site.srctl_json("machines", "list")) == 1


@pytest.mark.postgres
def test_a_second_configuration_server_with_the_firsts_ca_serves_the_same_agents(site: Site, postgres_url: str):
    """docs/deployment.md §10: a second server on the same PostgreSQL, with its own state directory
    holding copies of the first one's CA, secrets key and passphrase, serves the same agents."""
    site.start_config_server(store_url=postgres_url)
    second_dir = site.root / "config-server-2"
    (second_dir / "pki").mkdir(parents=True, mode=0o700)
    for name in ("pki/ca.key", "pki/ca.crt", "pki/secrets.key", "passphrase.json"):
        shutil.copy2(site.cs_dir / name, second_dir / name)
    config = site.root / "config-server-2.toml"
    config.write_text(tomli_w.dumps({"state_dir": str(second_dir), "listen": "127.0.0.1", "port": 0,
                                     "heartbeat_interval": HEARTBEAT, "store_url": postgres_url}))
    second = launcher.launch("config-server", ["--config", str(config)], state_dir=second_dir,
                             log_path=site.root / "logs" / "config-server-2.log")
    site.daemons.append(second)
    at_second = f"127.0.0.1:{second.state['port']}"

    def healthy(config: Path) -> set[str]:
        listed = site.srctl("servers", "list", "--output", "json", config=config)
        assert listed.returncode == 0, listed.stderr
        return {s["hostname"] for s in json.loads(listed.stdout)
                if s["role"] != "config-server" and s["health"] == "healthy"}

    # Enrolled through the first server, seen by the second (one store); enrolled through the
    # second with the same passphrase, seen by the first.
    site.start_agent("process-server", "ps1", hostname="ps1")
    site.start_agent("process-server", "ps2", hostname="ps2", server=at_second)
    second_profile = second_dir / "admin" / "srctl.toml"
    wait_for(lambda: healthy(site.profile) == healthy(second_profile) == {"ps1", "ps2"}, what="both agents on both")

    # An enrolled agent moved to the second server goes on with its identity: the CA is the same.
    ps1 = next(d for d in site.daemons if d.state_dir == site.root / "ps1")
    identity = ps1.state["agent_id"]
    assert launcher.stop(ps1)
    site.daemons.remove(ps1)
    moved = site.start_agent("process-server", "ps1", hostname="ps1", server=at_second)
    assert moved.state["agent_id"] == identity
    wait_for(lambda: healthy(second_profile) == {"ps1", "ps2"}, what="the moved agent healthy")

    # Each server runs jobs under an id of its own (a shared one would release the other's leases).
    assert (site.cs_dir / "runner-id").read_text() != (second_dir / "runner-id").read_text()
