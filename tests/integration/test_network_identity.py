"""Network identity with real daemons: a source agent records its machine's static IP
configuration at registration and the configuration server keeps and shows it."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import Site, wait_for

FIXTURES = Path(__file__).parent.parent / "unit" / "netidentity_fixtures"


def test_the_registered_machine_carries_its_network_identity(site: Site):
    site.start_config_server()
    root = site.root / "machine-root"
    shutil.copytree(FIXTURES / "nm", root)
    agent = site.start_agent("source-agent", "linux", network_root=str(root))
    site.start_agent("source-agent", "windows", network={
        "interfaces": [{
            "name": "Ethernet0", "mac_address": "00-50-56-AA-BB-09", "addresses": ["10.9.0.5/24"],
            "gateways": ["10.9.0.1"], "dns_servers": ["10.9.0.2"], "dns_search": ["corp.example"],
        }],
        "system": "windows",
    })
    machines = wait_for(lambda: (m := site.srctl_json("machines", "list")) and len(m) == 2 and m, what="two machines")
    by_agent = {m["server_id"]: m for m in machines}
    linux = by_agent[agent.state["agent_id"]]["network"]
    assert linux["system"] == "NETWORK_SYSTEM_NETWORKMANAGER" and linux["captured_at"]
    eth0, eth1 = linux["interfaces"]
    assert eth0 == {
        "name": "eth0",
        "mac_address": "00:50:56:aa:bb:01",
        "ipv4_method": "ADDRESS_METHOD_STATIC",
        "ipv6_method": "ADDRESS_METHOD_STATIC",
        "addresses": [
            {"address": "10.0.0.5", "prefix_length": 24},
            {"address": "10.0.0.6", "prefix_length": 24},
            {"address": "fd00::5", "prefix_length": 64},
        ],
        "gateways": ["10.0.0.1", "fd00::1"],
        "dns_servers": ["10.0.0.2", "10.0.0.3", "fd00::2"],
        "dns_search": ["corp.example", "lab.example"],
        "mtu": 1400,
    }
    assert eth1["ipv4_method"] == "ADDRESS_METHOD_DHCP" and not eth1.get("addresses")
    (windows,) = [m["network"] for m in machines if m["server_id"] != agent.state["agent_id"]]
    assert windows["system"] == "NETWORK_SYSTEM_WINDOWS" and windows["from_agent_config"] is True
    assert windows["interfaces"][0]["mac_address"] == "00:50:56:aa:bb:09"
    # The server's own inventory (srctl servers list) holds the same identity.
    (server,) = [s for s in site.servers() if s["id"] == agent.state["agent_id"]]
    assert server["inventory"]["network"]["interfaces"] == linux["interfaces"]


def test_a_network_identity_in_the_config_file_that_does_not_check_out_stops_the_agent_before_enrolling(site: Site):
    site.start_config_server()
    done = site.run_agent("source-agent", "bad", network={"interfaces": [{"name": "../x", "ipv4_method": "dhcp"}]})
    assert done.returncode == 2, done.stderr
    assert "network.interfaces '../x'" in done.stderr and "not allowed" in done.stderr
    assert not (site.root / "bad" / "identity").exists()
