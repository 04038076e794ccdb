"""`srctl user`: an operator's own certificate; a reader looks but changes nothing;
a removed operator is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import Site, wait_for


@pytest.fixture
def site(tmp_path: Path):
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


def test_a_reader_can_look_but_not_change_and_a_removed_operator_is_refused(site: Site, tmp_path: Path):
    site.start_config_server()
    source = site.start_agent("source-agent")
    wait_for(lambda: len(site.servers()) == 1, what="the source agent")
    out = tmp_path / "alice"

    added = site.srctl_json("user", "add", "alice", "--role", "reader", "--out", str(out))
    assert added["operator"]["role"] == "reader" and added["operator"]["identity_id"].startswith("op-alice-")
    profile = Path(added["profile"])
    assert stat.S_IMODE(os.stat(out / "client.key").st_mode) == 0o600
    assert [o["name"] for o in site.srctl_json("user", "list")] == ["alice"]

    # alice's profile works for reading...
    listed = site.srctl("servers", "list", "--output", "json", config=profile)
    assert listed.returncode == 0, listed.stderr
    # ...and every change is refused, with the reason, and nothing changes.
    for change in (
        ("replication", "enable", source.state["agent_id"]),
        ("passphrase", "rotate"),
        ("servers", "remove", source.state["agent_id"], "--yes"),
        ("user", "add", "mallory", "--role", "admin", "--out", str(tmp_path / "mallory")),
    ):
        refused = site.srctl(*change, config=profile)
        assert refused.returncode != 0 and "a reader certificate may not call" in refused.stderr, (change, refused.stderr)
    assert site.srctl_json("replication", "status") == []
    assert [s["id"] for s in site.servers()] == [source.state["agent_id"]]
    assert [o["name"] for o in site.srctl_json("user", "list")] == ["alice"]
    assert not (tmp_path / "mallory" / "client.crt").exists()

    # A second certificate for the same name is refused while the first is current.
    again = site.srctl("user", "add", "alice", "--out", str(tmp_path / "alice2"))
    assert again.returncode != 0 and "already has a certificate" in again.stderr

    removed = site.srctl_json("user", "remove", "alice", "--yes")
    assert removed["revoked_at"]
    refused = site.srctl("servers", "list", config=profile)
    assert refused.returncode != 0 and "revoked" in refused.stderr
    assert site.srctl_json("user", "list") == []
    assert [o["name"] for o in site.srctl_json("user", "list", "--all")] == ["alice"]

    # Bad names and roles are refused before anything is issued.
    for bad, reason in (
        (("user", "add", "../etc", "--out", str(tmp_path / "x")), "is not allowed"),
        (("user", "add", "bob", "--role", "root"), "unknown role"),
    ):
        result = site.srctl(*bad)
        assert result.returncode != 0 and reason in result.stderr, result.stderr
    assert [o["name"] for o in site.srctl_json("user", "list", "--all")] == ["alice"]
    assert not (tmp_path / "x").exists()
