"""The configuration server on PostgreSQL: the same behaviour, and state that outlives the process."""

from __future__ import annotations

import pytest

from siterecovery.controller import launcher

from .conftest import Site, wait_for


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
