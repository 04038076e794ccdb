"""Network identity: capture from NetworkManager / ifcfg / netplan files, render, apply, refuse.

Fixture trees (tests/unit/netidentity_fixtures/<system>/) hold the files a machine
would have under `/`, plus `sys/class/net/<dev>/address` for its devices; every
test copies one into a temporary network root.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shlex
import shutil
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pytest

from siterecovery.agents.settings import NetworkInterfaceSettings, NetworkSettings
from siterecovery.agents.source.netidentity import NetworkAgent
from siterecovery.agents.source.netidentity.apply import (
    Order,
    backup_path,
    carry_out,
    match_interfaces,
    write_files,
)
from siterecovery.agents.source.netidentity.capture import (
    LiveInterface,
    capture,
    from_settings,
)
from siterecovery.agents.source.netidentity.render import (
    RenderedFile,
    ifcfg_file,
    netplan_file,
    netsh_script,
    networkmanager_keyfile,
    render,
)
from siterecovery.common import errors, netidentity
from siterecovery.common.netidentity import Identity, Interface, Method, System
from siterecovery.common.pb import agent_pb2, common_pb2
from siterecovery.controller import agents, network_orders

FIXTURES = Path(__file__).parent / "netidentity_fixtures"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ip = ipaddress.ip_interface
addr = ipaddress.ip_address


def tree(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def devices(root: Path, **macs: str) -> None:
    for name, mac in macs.items():
        (root / "sys/class/net" / name).mkdir(parents=True, exist_ok=True)
        (root / "sys/class/net" / name / "address").write_text(mac + "\n")


OFFICE = Interface(
    name="eth0",
    mac="00:50:56:aa:bb:01",
    ipv4_method=Method.STATIC,
    ipv6_method=Method.STATIC,
    addresses=(ip("10.0.0.5/24"), ip("10.0.0.6/24"), ip("fd00::5/64")),
    gateways=(addr("10.0.0.1"), addr("fd00::1")),
    dns_servers=(addr("10.0.0.2"), addr("10.0.0.3"), addr("fd00::2")),
    dns_search=("corp.example", "lab.example"),
    mtu=1400,
)


# -- capture --------------------------------------------------------------------------


def test_networkmanager_keyfiles_static_dhcp_ipv6_and_a_profile_named_only_by_mac(tmp_path):
    identity = capture(tree(tmp_path, "nm"), now=NOW)
    assert identity.system is System.NETWORKMANAGER
    assert identity.captured_at == NOW
    # The Wi-Fi profile is left out; "Wired connection 2" names only a MAC, sysfs names the device.
    assert identity.interfaces == (
        OFFICE,
        Interface(name="eth1", mac="00:50:56:aa:bb:02", ipv4_method=Method.DHCP, ipv6_method=Method.AUTO),
    )


def test_ifcfg_netmask_prefix_secondary_addresses_ipv6_and_dhcp(tmp_path):
    root = tree(tmp_path, "ifcfg")
    # An alias file and a backup copy are not interfaces of their own.
    scripts = root / "etc/sysconfig/network-scripts"
    (scripts / "ifcfg-eth0:1").write_text("DEVICE=eth0:1\nIPADDR=192.168.10.9\nPREFIX=24\n")
    (scripts / "ifcfg-eth1.bak").write_text("DEVICE=eth1\nIPADDR=10.9.9.9\nPREFIX=24\n")
    identity = capture(root, now=NOW)
    assert identity.system is System.IFCFG
    eth0, eth1 = identity.interfaces
    assert eth0 == Interface(
        name="eth0",
        mac="52:54:00:12:34:01",
        ipv4_method=Method.STATIC,
        ipv6_method=Method.STATIC,
        addresses=(
            ip("192.168.10.5/24"), ip("192.168.11.5/25"),
            ip("2001:db8:10::5/64"), ip("2001:db8:10::6/64"), ip("2001:db8:11::6/64"),
        ),
        gateways=(addr("192.168.10.1"), addr("2001:db8:10::1")),
        dns_servers=(addr("192.168.10.2"), addr("192.168.10.3")),
        dns_search=("corp.example", "lab.example"),
        mtu=9000,
    )
    # DHCP is recorded as DHCP (no lease addresses); IPV6INIT=no is IPv6 disabled.
    assert eth1 == Interface(name="eth1", ipv4_method=Method.DHCP, ipv6_method=Method.DISABLED)


def test_netplan_merges_files_in_order_and_reads_an_unquoted_numeric_mac(tmp_path):
    identity = capture(tree(tmp_path, "netplan"), now=NOW)
    assert identity.system is System.NETPLAN
    ens192, ens224 = identity.interfaces
    assert ens192 == Interface(
        name="ens192",
        mac="00:50:56:11:22:33",
        ipv4_method=Method.STATIC,
        ipv6_method=Method.STATIC,
        addresses=(ip("172.16.0.5/16"), ip("2001:db8:16::5/64")),
        # Only default routes are gateways; the 10.50.0.0/16 route is not part of the identity.
        gateways=(addr("172.16.0.1"), addr("2001:db8:16::1")),
        dns_servers=(addr("172.16.0.2"), addr("2001:db8:16::2")),
        dns_search=("corp.example",),
        mtu=1500,
    )
    assert ens224 == Interface(name="ens224", ipv4_method=Method.DHCP, mtu=1450)  # 99-override.yaml wins


def test_networkmanager_is_preferred_to_netplan_and_ifcfg_and_a_static_profile_to_a_dhcp_one(tmp_path):
    root = tree(tmp_path, "nm")
    scripts = root / "etc/sysconfig/network-scripts"
    scripts.mkdir(parents=True)
    (scripts / "ifcfg-eth0").write_text("DEVICE=eth0\nBOOTPROTO=dhcp\n")  # NM describes eth0 too: ignored
    (scripts / "ifcfg-eth2").write_text("DEVICE=eth2\nBOOTPROTO=none\nIPADDR=10.2.0.5\nPREFIX=24\n")
    # A DHCP profile a cloud agent left for eth0, sorted before ours: the static one is kept.
    (root / "etc/NetworkManager/system-connections/cloud-init eth0.nmconnection").write_text(
        "[connection]\nid=cloud-init eth0\ntype=ethernet\ninterface-name=eth0\n[ipv4]\nmethod=auto\n"
    )
    identity = capture(root, now=NOW)
    assert identity.system is System.NETWORKMANAGER
    assert [i.name for i in identity.interfaces] == ["eth0", "eth1", "eth2"]
    assert identity.interfaces[0] == OFFICE
    assert identity.interfaces[2].addresses == (ip("10.2.0.5/24"),)


def test_a_file_that_does_not_check_out_is_skipped_and_the_rest_recorded(tmp_path):
    root = tree(tmp_path, "nm")
    bad = root / "etc/NetworkManager/system-connections/bad.nmconnection"
    bad.write_text("[connection]\ntype=ethernet\ninterface-name=../x\n[ipv4]\nmethod=manual\naddress1=10.0.0.9/24\n")
    (root / "etc/NetworkManager/system-connections/worse.nmconnection").write_text(
        "[connection]\ntype=ethernet\ninterface-name=eth7\n[ipv4]\nmethod=manual\naddress1=10.0.0.999/24\n"
    )
    assert [i.name for i in capture(root, now=NOW).interfaces] == ["eth0", "eth1"]


def test_nothing_configured_is_an_empty_identity(tmp_path):
    identity = capture(tmp_path, now=NOW)
    assert identity == Identity(captured_at=NOW)
    assert not identity.is_static


def test_an_identity_stated_in_the_config_file_windows():
    stated = from_settings(
        NetworkSettings(interfaces=(
            NetworkInterfaceSettings(
                name="Ethernet0", mac_address="00-50-56-AA-BB-01",
                addresses=("10.0.0.5/24", "10.0.0.6/24", "fd00::5/64"), gateways=("10.0.0.1", "fd00::1"),
                dns_servers=("10.0.0.2", "10.0.0.3", "fd00::2"), dns_search=("corp.example",), mtu=1400,
            ),
            NetworkInterfaceSettings(name="Ethernet 2", ipv4_method="dhcp"),
        )),
        windows=True,
    )
    assert stated is not None and stated.system is System.WINDOWS and stated.from_agent_config
    first = stated.interfaces[0]
    assert (first.mac, first.ipv4_method, first.ipv6_method) == ("00:50:56:aa:bb:01", Method.STATIC, Method.STATIC)
    assert stated.interfaces[1].ipv4_method is Method.DHCP
    assert from_settings(NetworkSettings(), windows=True) is None


@pytest.mark.parametrize(
    "entry, words",
    [
        (NetworkInterfaceSettings(name="../x", addresses=("10.0.0.5/24",)), "not allowed"),
        (NetworkInterfaceSettings(name="eth0", addresses=("10.0.0.5",), ipv4_method="dhcp"), "not static"),
        (NetworkInterfaceSettings(name="eth0", ipv4_method="static"), "static but has no address"),
        (NetworkInterfaceSettings(name="eth0", ipv4_method="bootp"), "not one of"),
        (NetworkInterfaceSettings(name="eth0", addresses=("10.0.0.5/33",)), "prefix length"),
        (NetworkInterfaceSettings(name="eth0", mac_address="00:50:56"), "MAC"),
        (NetworkInterfaceSettings(name="eth0", dns_search=("a b",), ipv4_method="dhcp"), "DNS domain"),
        (NetworkInterfaceSettings(name="eth0", gateways=("10.0.0.1", "10.0.0.254"),
                                  addresses=("10.0.0.5/24",)), "more than one IPv4 gateway"),
    ],
)
def test_a_stated_identity_that_does_not_check_out_is_a_config_error(entry, words):
    with pytest.raises(errors.InvalidInput, match=words) as caught:
        from_settings(NetworkSettings(interfaces=(entry,)), windows=False)
    assert caught.value.code == "config-network"


# -- render: exact contents ----------------------------------------------------------------


def test_networkmanager_keyfile_contents():
    rendered = networkmanager_keyfile(OFFICE)
    assert rendered.path == PurePosixPath("etc/NetworkManager/system-connections/eth0.nmconnection")
    assert rendered.mode == 0o600
    assert rendered.content.decode() == (
        "# Written by siterecovery: the network configuration recorded when this machine was protected.\n"
        "[connection]\n"
        "id=eth0\n"
        "uuid=0fca6d0c-cb6b-5913-82ce-c989361184e0\n"
        "type=ethernet\n"
        "interface-name=eth0\n"
        "autoconnect-priority=100\n"
        "\n"
        "[ethernet]\n"
        "mac-address=00:50:56:AA:BB:01\n"
        "mtu=1400\n"
        "\n"
        "[ipv4]\n"
        "method=manual\n"
        "address1=10.0.0.5/24,10.0.0.1\n"
        "address2=10.0.0.6/24\n"
        "dns=10.0.0.2;10.0.0.3;\n"
        "dns-search=corp.example;lab.example;\n"
        "\n"
        "[ipv6]\n"
        "method=manual\n"
        "address1=fd00::5/64,fd00::1\n"
        "dns=fd00::2;\n"
    )


def test_ifcfg_contents():
    rendered = ifcfg_file(OFFICE)
    assert (rendered.path, rendered.mode) == (PurePosixPath("etc/sysconfig/network-scripts/ifcfg-eth0"), 0o644)
    assert rendered.content.decode() == (
        "# Written by siterecovery: the network configuration recorded when this machine was protected.\n"
        "DEVICE=eth0\nNAME=eth0\nTYPE=Ethernet\nONBOOT=yes\nHWADDR=00:50:56:aa:bb:01\nBOOTPROTO=none\n"
        "IPADDR=10.0.0.5\nPREFIX=24\nIPADDR1=10.0.0.6\nPREFIX1=24\nGATEWAY=10.0.0.1\n"
        "DNS1=10.0.0.2\nDNS2=10.0.0.3\nDNS3=fd00::2\nDOMAIN='corp.example lab.example'\nMTU=1400\n"
        "IPV6INIT=yes\nIPV6_AUTOCONF=no\nIPV6ADDR=fd00::5/64\nIPV6_DEFAULTGW=fd00::1\n"
    )


def test_netplan_contents():
    dhcp = Interface(name="eth1", mac="00:50:56:aa:bb:02", ipv4_method=Method.DHCP, ipv6_method=Method.AUTO)
    rendered = netplan_file([OFFICE, dhcp])
    assert (rendered.path, rendered.mode) == (PurePosixPath("etc/netplan/90-siterecovery.yaml"), 0o600)
    assert rendered.content.decode() == (
        "# Written by siterecovery: the network configuration recorded when this machine was protected.\n"
        "network:\n"
        "  version: 2\n"
        "  ethernets:\n"
        "    eth0:\n"
        "      match:\n"
        "        macaddress: 00:50:56:aa:bb:01\n"
        "      set-name: eth0\n"
        "      dhcp4: false\n"
        "      dhcp6: false\n"
        "      addresses:\n"
        "      - 10.0.0.5/24\n"
        "      - 10.0.0.6/24\n"
        "      - fd00::5/64\n"
        "      routes:\n"
        "      - to: default\n"
        "        via: 10.0.0.1\n"
        "      - to: default\n"
        "        via: fd00::1\n"
        "      nameservers:\n"
        "        addresses:\n"
        "        - 10.0.0.2\n"
        "        - 10.0.0.3\n"
        "        - fd00::2\n"
        "        search:\n"
        "        - corp.example\n"
        "        - lab.example\n"
        "      mtu: 1400\n"
        "    eth1:\n"
        "      match:\n"
        "        macaddress: 00:50:56:aa:bb:02\n"
        "      set-name: eth1\n"
        "      dhcp4: true\n"
        "      accept-ra: true\n"
    )


def test_netsh_script_contents():
    ethernet0 = Interface(**{**OFFICE.__dict__, "name": "Ethernet0"})
    dhcp = Interface(name="Ethernet 2", ipv4_method=Method.DHCP)
    rendered = netsh_script([ethernet0, dhcp])
    assert rendered.path == PurePosixPath("ProgramData/siterecovery/restore-network.cmd")
    assert rendered.content.decode() == "\r\n".join([
        "@echo off",
        "rem Written by siterecovery: the network configuration recorded when this machine was protected.",
        "rem Run as Administrator.",
        "rem Ethernet0 (00:50:56:aa:bb:01)",
        'netsh interface ipv4 set address name="Ethernet0" static 10.0.0.5 255.255.255.0 10.0.0.1',
        'netsh interface ipv4 add address name="Ethernet0" 10.0.0.6 255.255.255.0',
        'netsh interface ipv6 add address interface="Ethernet0" fd00::5/64',
        'netsh interface ipv6 add route ::/0 interface="Ethernet0" fd00::1',
        'netsh interface ipv4 set dnsservers name="Ethernet0" static 10.0.0.2 primary validate=no',
        'netsh interface ipv4 add dnsservers name="Ethernet0" 10.0.0.3 index=2 validate=no',
        'netsh interface ipv6 set dnsservers name="Ethernet0" static fd00::2 primary validate=no',
        'netsh interface ipv4 set subinterface "Ethernet0" mtu=1400 store=persistent',
        "rem Ethernet 2",
        'netsh interface ipv4 set address name="Ethernet 2" source=dhcp',
        'netsh interface ipv4 set dnsservers name="Ethernet 2" source=dhcp',
        'powershell -NoProfile -Command "Set-DnsClientGlobalSetting -SuffixSearchList @(\'corp.example\',\'lab.example\')"',
        "",
    ])


# -- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nm", "ifcfg", "netplan"])
def test_capture_render_capture_gives_the_same_identity(tmp_path, name):
    first = capture(tree(tmp_path, name), now=NOW)
    again = tmp_path / "again"
    shutil.copytree(FIXTURES / name / "sys", again / "sys")
    write_files(again, render(first.interfaces, first.system))
    assert capture(again, now=NOW) == first


@pytest.mark.parametrize("system", [System.NETWORKMANAGER, System.IFCFG, System.NETPLAN])
def test_any_identity_survives_any_linux_system(tmp_path, system):
    # What netplan recorded can be written for NetworkManager, and so on.
    for source in ("nm", "ifcfg", "netplan"):
        first = capture(tree(tmp_path, source), now=NOW)
        again = tmp_path / f"{source}-as-{system.value}"
        shutil.copytree(FIXTURES / source / "sys", again / "sys")
        write_files(again, render(first.interfaces, system))
        assert capture(again, now=NOW).interfaces == first.interfaces


# -- apply ------------------------------------------------------------------------------------


def order(order_id: str, *interfaces: Interface, system: System = System.NETWORKMANAGER,
          target: System = System.UNSPECIFIED) -> Order:
    return Order(order_id, Identity(system=system, interfaces=interfaces, captured_at=NOW), target)


def test_failback_to_the_original_vm_matches_by_mac_writes_0600_and_backs_up_the_azure_dhcp_profile(tmp_path):
    root = tmp_path / "vm"
    devices(root, ens192="00:50:56:aa:bb:01")  # renamed device, same MAC: the original VM
    connections = root / "etc/NetworkManager/system-connections"
    connections.mkdir(parents=True)
    azure = "[connection]\nid=azure\ntype=ethernet\ninterface-name=ens192\n[ipv4]\nmethod=auto\n"
    (connections / "ens192.nmconnection").write_text(azure)
    result = carry_out(order("o-1", OFFICE), root=root)
    assert result.ok, result.message
    written = connections / "ens192.nmconnection"
    assert result.files == (str(written),)
    assert "eth0 → ens192 (by MAC)" in result.message and "nmcli connection reload" in result.message
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "interface-name=ens192" in written.read_text() and "address1=10.0.0.5/24,10.0.0.1" in written.read_text()
    assert backup_path(written).read_text() == azure
    assert backup_path(written).name == ".ens192.nmconnection.sr-backup"
    assert not [p for p in connections.iterdir() if p.name.endswith(".tmp")]
    # The machine now configures what was recorded (and the backup is not read as a profile).
    (recaptured,) = capture(root, now=NOW).interfaces
    assert recaptured == Interface(**{**OFFICE.__dict__, "name": "ens192"})


def test_a_new_vm_matches_by_name_then_by_position_and_says_so():
    eth1 = Interface(name="eth1", mac="00:50:56:aa:bb:02", ipv4_method=Method.DHCP)
    live = [LiveInterface("ens224", "00:50:56:99:00:02"), LiveInterface("eth0", "00:50:56:99:00:01")]
    matches = match_interfaces([OFFICE, eth1], live)
    assert [m.describe() for m in matches] == ["eth0 (by name)", "eth1 → ens224 (by position)"]
    assert matches[1].interface.mac == "00:50:56:99:00:02"


def test_an_order_with_an_unmatched_interface_is_refused_and_writes_nothing(tmp_path):
    root = tree(tmp_path, "nm")
    devices(root, eth2="00:50:56:aa:bb:03")  # three devices, one recorded interface unmatched
    before = digest(root)
    ghost = Interface(name="eth9", mac="00:50:56:aa:bb:09", ipv4_method=Method.STATIC,
                      addresses=(ip("10.9.0.5/24"),))
    result = carry_out(order("o-2", OFFICE, ghost), root=root)
    assert not result.ok and result.files == ()
    assert "eth9 (00:50:56:aa:bb:09) match no network device" in result.message
    assert "eth0 (00:50:56:aa:bb:01)" in result.message  # the devices it has
    assert digest(root) == before


def test_the_target_system_is_the_orders_then_the_recorded_one_present_then_by_preference(tmp_path):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    (root / "etc/netplan").mkdir(parents=True)
    (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
    assert carry_out(order("a", OFFICE, system=System.IFCFG), root=root).files == (
        str(root / "etc/sysconfig/network-scripts/ifcfg-eth0"),)
    assert carry_out(order("b", OFFICE, system=System.NETWORKMANAGER), root=root).files == (
        str(root / "etc/netplan/90-siterecovery.yaml"),)
    windows = carry_out(order("c", OFFICE, target=System.WINDOWS), root=root)
    assert windows.files == (str(root / "ProgramData/siterecovery/restore-network.cmd"),)
    assert "as Administrator" in windows.message
    refused = carry_out(order("d", OFFICE), root=tmp_path / "bare", live=[LiveInterface("eth0", OFFICE.mac)])
    assert not refused.ok and "no network configuration system found" in refused.message


def test_an_order_runs_once_and_the_same_configuration_again_writes_nothing(tmp_path):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    scripts = root / "etc/sysconfig/network-scripts"
    scripts.mkdir(parents=True)
    (scripts / "ifcfg-eth0").write_text("DEVICE=eth0\nBOOTPROTO=dhcp\n")
    agent = NetworkAgent(tmp_path / "state", root=root, windows=False)
    message = agent_pb2.NetworkOrder(order_id="order-1", identity=order("x", OFFICE, system=System.IFCFG).identity.to_proto())
    assert agent.handle_order(message) is True
    (first,) = agent.results()
    assert first.ok and first.files == [str(scripts / "ifcfg-eth0")]
    state = digest(root)
    # The same order again (every heartbeat until the server stops sending it): nothing happens.
    assert agent.handle_order(message) is False
    assert list(agent.results()) == [first]
    # ... after a restart too: the result is kept in the state directory.
    restarted = NetworkAgent(tmp_path / "state", root=root, windows=False)
    assert restarted.handle_order(message) is False and list(restarted.results()) == [first]
    # A new order with the same configuration writes nothing, and the backup of the
    # original DHCP file is not replaced by our own file.
    message.order_id = "order-2"
    assert restarted.handle_order(message) is True
    (second,) = restarted.results()
    assert second.ok and list(second.files) == [] and "already in place" in second.message
    assert digest(root) == state
    assert backup_path(scripts / "ifcfg-eth0").read_text() == "DEVICE=eth0\nBOOTPROTO=dhcp\n"
    # No order in the response: no results reported any more.
    assert restarted.handle_order(None) is False and list(restarted.results()) == []


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/etc", 'a"b', "%PATH%", "eth0;reboot", "-x", "x\n", ""])
def test_interface_names_that_could_escape_a_path_or_a_script_are_refused(tmp_path, name):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    (root / "etc/netplan").mkdir(parents=True)
    before = digest(root)
    hostile = common_pb2.NetworkIdentity(interfaces=[common_pb2.NetworkInterface(
        name=name, ipv4_method=common_pb2.ADDRESS_METHOD_DHCP)])
    agent = NetworkAgent(tmp_path / "state", root=root, windows=False)
    agent.handle_order(agent_pb2.NetworkOrder(order_id="o-1", identity=hostile))
    (result,) = agent.results()
    assert not result.ok and "does not check out" in result.message
    assert digest(root) == before


def test_a_rendered_path_outside_the_root_is_refused_before_anything_is_written(tmp_path):
    files = [RenderedFile(PurePosixPath("etc/ok"), b"x", 0o644), RenderedFile(PurePosixPath("../escape"), b"x", 0o644)]
    with pytest.raises(errors.InvalidInput):
        write_files(tmp_path / "root", files)
    assert not (tmp_path / "root").exists() and not (tmp_path / "escape").exists()


def test_the_apply_command_runs_after_the_files_are_written_and_its_failure_is_reported(tmp_path):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    (root / "etc/netplan").mkdir(parents=True)
    marker = tmp_path / "activated"
    script = f"import pathlib, sys; pathlib.Path({str(marker)!r}).write_text(str(len(sys.argv)))"
    command = shlex.join([sys.executable, "-c", script])
    result = carry_out(order("o-1", OFFICE), root=root, apply_command=command)
    assert result.ok and marker.read_text() == "1" and "activated with" in result.message
    failed = carry_out(order("o-2", OFFICE), root=root, apply_command=f"{sys.executable} -c 'raise SystemExit(3)'")
    assert not failed.ok and "exited 3" in failed.message


def test_backups_and_temporary_files_are_hidden_from_the_configuration_systems(tmp_path):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    for system in (System.NETWORKMANAGER, System.IFCFG, System.NETPLAN):
        files = render([OFFICE], system)
        write_files(root, files)
        write_files(root, render([Interface(name="eth0", mac=OFFICE.mac, ipv4_method=Method.DHCP)], system))
        assert all(backup_path(root / f.path).exists() for f in files)
    names = [p.name for p in root.rglob("*") if p.is_file() and "sys" not in p.parts]
    assert all(n.startswith(".") for n in names if n.endswith(".sr-backup")), names
    assert [i.ipv4_method for i in capture(root, now=NOW).interfaces] == [Method.DHCP]


# -- the wire and the controller's checks ------------------------------------------------------------


def test_the_identity_travels_and_the_controller_accepts_what_an_agent_sends(tmp_path):
    identity = capture(tree(tmp_path, "nm"), now=NOW)
    from siterecovery.controller.convert import to_dict

    stored = to_dict(common_pb2.Inventory(host=common_pb2.HostFacts(hostname="h"), network=identity.to_proto()))
    agents.validate_inventory("source", stored)
    assert netidentity.from_dict(stored["network"]) == identity


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda n: n["interfaces"][0].update(name="../x"), "not allowed"),
        (lambda n: n["interfaces"][0]["addresses"][0].update(address="10.0.0.300"), "not an IP address"),
        (lambda n: n["interfaces"][0]["addresses"][0].update(prefix_length=99), "prefix length"),
        (lambda n: n["interfaces"][0].update(dns_search=["x" * 300]), "DNS domain"),
        (lambda n: n["interfaces"][0].update(dns_servers=["10.0.0.1"] * 9), "DNS servers"),
        (lambda n: n.update(interfaces=n["interfaces"] * 17), "more than 32 interfaces"),
        (lambda n: n["interfaces"][1].update(name="eth0"), "same name"),
        (lambda n: n["interfaces"][0].update(ipv4_method=77), "unknown address method"),
        (lambda n: n.update(captured_at="yesterday"), "malformed"),
    ],
)
def test_the_controller_refuses_a_network_identity_that_does_not_check_out(tmp_path, change, words):
    from siterecovery.controller.convert import to_dict

    network = to_dict(capture(tree(tmp_path, "nm"), now=NOW).to_proto())
    change(network)
    with pytest.raises(errors.InvalidInput, match=words) as caught:
        agents.validate_inventory("source", {"host": {"hostname": "h"}, "network": network})
    assert caught.value.code == "inventory-invalid"


def test_only_a_source_agent_reports_a_network_identity():
    with pytest.raises(errors.InvalidInput, match="only a source agent"):
        agents.validate_inventory(
            "process-server", {"host": {"hostname": "h"}, "data_endpoint": "h:9443", "network": {}}
        )


def test_network_order_results_are_checked_before_a_heartbeat_is_written():
    good = agent_pb2.NetworkOrderResult(order_id="failback-1:net", ok=True, message="wrote\n2 files", files=["/etc/x"])
    network_orders.check_results([good])
    for bad in (
        agent_pb2.NetworkOrderResult(order_id="../x"),
        agent_pb2.NetworkOrderResult(order_id="o", message="m" * 5000),
        agent_pb2.NetworkOrderResult(order_id="o", files=["/etc/\x00x"]),
    ):
        with pytest.raises(errors.InvalidInput):
            network_orders.check_results([bad])
    with pytest.raises(errors.InvalidInput):
        network_orders.check_results([good] * 17)


def _order_fixture(store) -> None:
    """Two source agents; the machine of the first has a pending network order for it."""
    from siterecovery.controller.store import (
        MachineRecord,
        ProtectedItemRecord,
        ProtectionGroupRecord,
        ServerRecord,
    )

    for sid in ("src-1", "src-2"):
        store.add_server(ServerRecord(id=sid, role="source", hostname=sid, cert_serial="01",
                                      cert_fingerprint="sha256:00", enrolled_at=NOW))
    store.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux"))
    store.add_protection_groups(
        ProtectionGroupRecord(id="pg", name="PG1", policy={}, created_at=NOW),
        ProtectionGroupRecord(id="pgf", name="PG1_Failback", policy={}, created_at=NOW, failback_of="pg"),
    )
    recorded = {"system": "NETWORK_SYSTEM_NETPLAN",
                "interfaces": [{"name": "eth0", "ipv4_method": "ADDRESS_METHOD_DHCP"}]}
    store.add_protected_item(ProtectedItemRecord(
        id="it", name="app01", machine_id="src-1", group_id="pg", state="failing-back", created_at=NOW, updated_at=NOW,
        details={"network_order": {"order_id": "net-1", "server_id": "src-1", "identity": recorded,
                                   "status": "pending"}},
    ))


def test_a_pending_order_is_sent_to_its_agent_until_that_agent_settles_it(tmp_path):
    from siterecovery.common import pki
    from siterecovery.controller.store import open_store

    store = open_store(f"sqlite:///{tmp_path}/store.db")
    _order_fixture(store)
    assert network_orders.network_order_for(store, "src-2", now=NOW) is None
    order = network_orders.network_order_for(store, "src-1", now=NOW)
    assert order is not None and order.order_id == "net-1"
    assert order.target_system == common_pb2.NETWORK_SYSTEM_NETPLAN and order.identity.interfaces[0].name == "eth0"
    result = agent_pb2.NetworkOrderResult(order_id="net-1", ok=True, message="written", files=["etc/netplan/x.yaml"])
    network_orders.record_network_results(store, pki.Identity(role="source", id="src-2"), [result], now=NOW)
    assert store.get_protected_item("it").details["network_order"]["status"] == "pending", "not its order"
    network_orders.record_network_results(store, pki.Identity(role="source", id="src-1"), [result], now=NOW)
    settled = store.get_protected_item("it").details["network_order"]
    assert (settled["status"], settled["files"]) == ("ok", ["etc/netplan/x.yaml"])
    assert network_orders.network_order_for(store, "src-1", now=NOW) is None
    store.close()


def test_the_server_reads_pending_orders_once_per_interval_and_again_after_settling_one(tmp_path):
    from siterecovery.common import pki
    from siterecovery.controller.store import SqlStore

    class CountingStore(SqlStore):
        reads = 0

        def list_protected_items(self, **kw):
            CountingStore.reads += 1
            return super().list_protected_items(**kw)

    store = CountingStore(f"sqlite:///{tmp_path}/store.db")
    store.migrate()
    _order_fixture(store)
    clock = [100.0]
    pending = network_orders.PendingOrders(refresh_seconds=2.0, clock=lambda: clock[0])
    assert pending.order_for(store, "src-1", now=NOW).order_id == "net-1"
    assert pending.order_for(store, "src-2", now=NOW) is None
    assert CountingStore.reads == 1, "one read serves every agent within the interval"
    item = store.get_protected_item("it")
    store.update_protected_item("it", expected_version=item.version, now=NOW,
                                details={**item.details, "network_order": {**item.details["network_order"],
                                                                           "status": "ok"}})
    assert pending.order_for(store, "src-1", now=NOW) is not None, "not re-read within the interval"
    clock[0] += 2.0
    assert pending.order_for(store, "src-1", now=NOW) is None
    assert CountingStore.reads == 2

    hooks = network_orders.cached_hooks()
    store.update_protected_item("it", expected_version=item.version + 1, now=NOW, details=item.details)
    assert hooks.order_for(store, "src-1", now=NOW).order_id == "net-1"
    result = agent_pb2.NetworkOrderResult(order_id="net-1", ok=True, message="written")
    hooks.record_results(store, pki.Identity(role="source", id="src-1"), [result], now=NOW)
    assert hooks.order_for(store, "src-1", now=NOW) is None, "settling an order here forgets what was read"
    store.close()


def test_the_runtime_reports_results_and_heartbeats_at_once_after_an_order(tmp_path):
    from siterecovery.agents.runtime import AgentRuntime
    from siterecovery.agents.settings import SourceSettings

    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    (root / "etc/netplan").mkdir(parents=True)
    network = NetworkAgent(tmp_path / "state", root=root, windows=False)
    sent: list[agent_pb2.HeartbeatRequest] = []
    responses = [
        agent_pb2.HeartbeatResponse(network_order=agent_pb2.NetworkOrder(
            order_id="o-1", identity=order("x", OFFICE).identity.to_proto())),
        agent_pb2.HeartbeatResponse(network_order=agent_pb2.NetworkOrder(order_id="o-1")),
        agent_pb2.HeartbeatResponse(),
        agent_pb2.HeartbeatResponse(),
    ]

    class Scripted(AgentRuntime):
        """The configuration server's side scripted: the responses above, in turn."""

        def _call(self, method, request):
            sent.append(request)
            return responses[len(sent) - 1]

    import threading

    runtime = Scripted(SourceSettings(server="127.0.0.1:1", state_dir=tmp_path / "state"), role="source",
                       daemon_name="test", stop=threading.Event(), inventory=common_pb2.Inventory, network=network)
    runtime._registered = True
    runtime.heartbeat_once()
    assert runtime.heartbeat_now.is_set()  # the result goes out with the next heartbeat, at once
    assert (root / "etc/netplan/90-siterecovery.yaml").exists()
    for _ in range(3):
        runtime.heartbeat_once()
    assert [len(r.network_results) for r in sent] == [0, 1, 1, 0]
    assert sent[1].network_results[0].ok and sent[1].network_results[0].order_id == "o-1"
    assert os.path.exists(tmp_path / "state" / "network-orders.json")


def test_a_malformed_file_or_an_unreadable_tree_never_fails_the_registration(tmp_path):
    root = tree(tmp_path, "nm")
    (root / "etc/NetworkManager/system-connections/broken.nmconnection").write_text("no section header\n")
    (root / "etc/netplan").mkdir(parents=True)
    (root / "etc/netplan/50-cloud-init.yaml").write_text("network: {ethernets: {eth5: {nameservers: x}}}\n")
    (root / "etc/netplan/60-bad.yaml").write_text("network: [unclosed\n")
    agent = NetworkAgent(tmp_path / "state", root=root, windows=False)
    recorded = agent.identity()
    assert recorded is not None and [i.name for i in recorded.interfaces] == ["eth0", "eth1"]
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    assert NetworkAgent(tmp_path / "state", root=not_a_directory, windows=False).identity() is not None


def test_an_order_without_interfaces_is_refused(tmp_path):
    root = tmp_path / "vm"
    devices(root, eth0=OFFICE.mac)
    (root / "etc/netplan").mkdir(parents=True)
    agent = NetworkAgent(tmp_path / "state", root=root, windows=False)
    agent.handle_order(agent_pb2.NetworkOrder(order_id="empty"))
    (result,) = agent.results()
    assert not result.ok and "names no interface" in result.message
    assert not (root / "etc/netplan/90-siterecovery.yaml").exists()
