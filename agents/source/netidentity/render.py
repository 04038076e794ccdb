"""Write a network identity in the form a configuration system reads.

Each renderer turns interfaces (already matched to the machine's own devices, so
their names and MAC addresses are the machine's) into files, as paths relative to
the network root with their contents and modes. Nothing here touches the disk;
`apply.py` validates, backs up and writes.

| system | file | mode | notes |
|---|---|---|---|
| NetworkManager | `etc/NetworkManager/system-connections/<name>.nmconnection` | 0600 | NM ignores a keyfile others can read; `autoconnect-priority=100` so it wins over a DHCP profile a cloud agent left for the same device; the uuid is derived from the name, so writing it again changes nothing |
| ifcfg | `etc/sysconfig/network-scripts/ifcfg-<name>` | 0644 | values shell-quoted (shlex) |
| netplan | `etc/netplan/90-siterecovery.yaml` | 0600 | one file for every interface; netplan merges files in name order, so it overrides a cloud-init `50-cloud-init.yaml`; each interface matched by MAC with `set-name` |
| Windows | `ProgramData/siterecovery/restore-network.cmd` | 0644 | a `netsh` script (CRLF) for an administrator or `network_apply_command` to run; never run here |

The values are safe to place in these files because common/netidentity.py checked
them (names, addresses, domains); nothing is quoted by hand beyond that.
"""

from __future__ import annotations

import configparser
import io
import ipaddress
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from siterecovery.common.netidentity import Interface, Method, System

from .capture import IFCFG_DIR, NETPLAN_DIR, NM_DIR

HEADER = "Written by siterecovery: the network configuration recorded when this machine was protected."
NETPLAN_FILE = NETPLAN_DIR / "90-siterecovery.yaml"
WINDOWS_SCRIPT = PurePosixPath("ProgramData/siterecovery/restore-network.cmd")
_NM_NAMESPACE = uuid.UUID("5f0c1a52-6b1e-4c39-9d0e-2a6f8e0b7c11")


@dataclass(frozen=True)
class RenderedFile:
    path: PurePosixPath  # relative to the network root
    content: bytes
    mode: int


# -- NetworkManager -------------------------------------------------------------------


def _nm_methods(version: int) -> dict[Method, str]:
    if version == 4:
        return {Method.STATIC: "manual", Method.DHCP: "auto", Method.DISABLED: "disabled"}
    return {Method.STATIC: "manual", Method.DHCP: "dhcp", Method.AUTO: "auto", Method.DISABLED: "disabled"}


def networkmanager_keyfile(interface: Interface) -> RenderedFile:
    config = configparser.ConfigParser(interpolation=None)
    config.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    config["connection"] = {
        "id": interface.name,
        "uuid": str(uuid.uuid5(_NM_NAMESPACE, interface.name)),
        "type": "ethernet",
        "interface-name": interface.name,
        "autoconnect-priority": "100",
    }
    ethernet = {}
    if interface.mac:
        ethernet["mac-address"] = interface.mac.upper()
    if interface.mtu:
        ethernet["mtu"] = str(interface.mtu)
    config["ethernet"] = ethernet
    for version in (4, 6):
        section: dict[str, str] = {}
        method = interface.method(version)
        if method in _nm_methods(version):
            section["method"] = _nm_methods(version)[method]
        gateway = interface.gateway_of(version)
        for number, address in enumerate(interface.addresses_of(version), start=1):
            suffix = f",{gateway}" if number == 1 and gateway else ""
            section[f"address{number}"] = f"{address.with_prefixlen}{suffix}"
        servers = [str(s) for s in interface.dns_servers if s.version == version]
        if servers:
            section["dns"] = "".join(f"{s};" for s in servers)
        if version == 4 and interface.dns_search:
            section["dns-search"] = "".join(f"{d};" for d in interface.dns_search)
        if section:
            config[f"ipv{version}"] = section
    text = io.StringIO()
    text.write(f"# {HEADER}\n")
    config.write(text, space_around_delimiters=False)
    return RenderedFile(NM_DIR / f"{interface.name}.nmconnection", text.getvalue().rstrip("\n").encode() + b"\n", 0o600)


# -- ifcfg -------------------------------------------------------------------------------


def ifcfg_file(interface: Interface) -> RenderedFile:
    values: list[tuple[str, str]] = [
        ("DEVICE", interface.name), ("NAME", interface.name), ("TYPE", "Ethernet"), ("ONBOOT", "yes"),
    ]
    if interface.mac:
        values.append(("HWADDR", interface.mac))
    values.append(("BOOTPROTO", "dhcp" if interface.ipv4_method is Method.DHCP else "none"))
    for index, address in enumerate(interface.addresses_of(4)):
        suffix = str(index) if index else ""
        values += [(f"IPADDR{suffix}", str(address.ip)), (f"PREFIX{suffix}", str(address.network.prefixlen))]
    if gateway := interface.gateway_of(4):
        values.append(("GATEWAY", str(gateway)))
    for number, server in enumerate(interface.dns_servers, start=1):
        values.append((f"DNS{number}", str(server)))
    if interface.dns_search:
        values.append(("DOMAIN", " ".join(interface.dns_search)))
    if interface.mtu:
        values.append(("MTU", str(interface.mtu)))
    v6 = interface.ipv6_method
    if v6 is Method.DISABLED:
        values.append(("IPV6INIT", "no"))
    elif v6 is not Method.UNSPECIFIED:
        values += [("IPV6INIT", "yes"), ("IPV6_AUTOCONF", "yes" if v6 is Method.AUTO else "no")]
        if v6 is Method.DHCP:
            values.append(("DHCPV6C", "yes"))
        addresses = [a.with_prefixlen for a in interface.addresses_of(6)]
        if addresses:
            values.append(("IPV6ADDR", addresses[0]))
        if addresses[1:]:
            values.append(("IPV6ADDR_SECONDARIES", " ".join(addresses[1:])))
        if gateway := interface.gateway_of(6):
            values.append(("IPV6_DEFAULTGW", str(gateway)))
    text = f"# {HEADER}\n" + "".join(f"{key}={shlex.quote(value)}\n" for key, value in values)
    return RenderedFile(IFCFG_DIR / f"ifcfg-{interface.name}", text.encode(), 0o644)


# -- netplan ------------------------------------------------------------------------------


def _netplan_interface(interface: Interface) -> dict:
    config: dict = {}
    if interface.mac:
        config["match"] = {"macaddress": interface.mac}
        config["set-name"] = interface.name
    if interface.ipv4_method in (Method.STATIC, Method.DHCP):
        config["dhcp4"] = interface.ipv4_method is Method.DHCP
    v6 = interface.ipv6_method
    if v6 in (Method.STATIC, Method.DHCP):
        config["dhcp6"] = v6 is Method.DHCP
    elif v6 in (Method.AUTO, Method.DISABLED):
        config["accept-ra"] = v6 is Method.AUTO
    if interface.addresses:
        config["addresses"] = [a.with_prefixlen for a in interface.addresses]
    routes = [{"to": "default", "via": str(g)} for g in interface.gateways]
    if routes:
        config["routes"] = routes
    nameservers: dict = {}
    if interface.dns_servers:
        nameservers["addresses"] = [str(s) for s in interface.dns_servers]
    if interface.dns_search:
        nameservers["search"] = list(interface.dns_search)
    if nameservers:
        config["nameservers"] = nameservers
    if interface.mtu:
        config["mtu"] = interface.mtu
    return config


def netplan_file(interfaces: Sequence[Interface]) -> RenderedFile:
    data = {"network": {"version": 2, "ethernets": {i.name: _netplan_interface(i) for i in interfaces}}}
    text = f"# {HEADER}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return RenderedFile(NETPLAN_FILE, text.encode(), 0o600)


# -- Windows -------------------------------------------------------------------------------


def _netmask(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


def _netsh_interface(interface: Interface) -> list[str]:
    name = f'name="{interface.name}"'
    lines = [f"rem {interface.name}" + (f" ({interface.mac})" if interface.mac else "")]
    v4 = interface.addresses_of(4)
    if interface.ipv4_method is Method.DHCP:
        lines += [
            f"netsh interface ipv4 set address {name} source=dhcp",
            f"netsh interface ipv4 set dnsservers {name} source=dhcp",
        ]
    elif v4:
        gateway = interface.gateway_of(4)
        first = f"netsh interface ipv4 set address {name} static {v4[0].ip} {_netmask(v4[0].network.prefixlen)}"
        lines.append(first + (f" {gateway}" if gateway else ""))
        lines += [
            f"netsh interface ipv4 add address {name} {a.ip} {_netmask(a.network.prefixlen)}" for a in v4[1:]
        ]
    if interface.ipv6_method is Method.STATIC:
        # netsh's ipv6 address and route commands name the interface with interface=, not name=.
        lines += [
            f'netsh interface ipv6 add address interface="{interface.name}" {a.with_prefixlen}'
            for a in interface.addresses_of(6)
        ]
        if gateway6 := interface.gateway_of(6):
            lines.append(f'netsh interface ipv6 add route ::/0 interface="{interface.name}" {gateway6}')
    for version in (4, 6):
        servers = [s for s in interface.dns_servers if s.version == version]
        for index, server in enumerate(servers):
            if index == 0:
                lines.append(f"netsh interface ipv{version} set dnsservers {name} static {server} primary validate=no")
            else:
                lines.append(
                    f"netsh interface ipv{version} add dnsservers {name} {server} index={index + 1} validate=no"
                )
    if interface.mtu:
        lines.append(f'netsh interface ipv4 set subinterface "{interface.name}" mtu={interface.mtu} store=persistent')
    return lines


def netsh_script(interfaces: Sequence[Interface]) -> RenderedFile:
    lines = ["@echo off", f"rem {HEADER}", "rem Run as Administrator."]
    for interface in interfaces:
        lines += _netsh_interface(interface)
    domains = list(dict.fromkeys(d for i in interfaces for d in i.dns_search))
    if domains:
        # netsh has no DNS suffix search list; PowerShell's DnsClient module has.
        quoted = ",".join(f"'{d}'" for d in domains)
        lines.append(f'powershell -NoProfile -Command "Set-DnsClientGlobalSetting -SuffixSearchList @({quoted})"')
    return RenderedFile(WINDOWS_SCRIPT, ("\r\n".join(lines) + "\r\n").encode(), 0o644)


# -- any of them ---------------------------------------------------------------------------


def render(interfaces: Sequence[Interface], system: System) -> list[RenderedFile]:
    if system is System.NETWORKMANAGER:
        return [networkmanager_keyfile(i) for i in interfaces]
    if system is System.IFCFG:
        return [ifcfg_file(i) for i in interfaces]
    if system is System.NETPLAN:
        return [netplan_file(interfaces)]
    if system is System.WINDOWS:
        return [netsh_script(interfaces)]
    raise ValueError(f"no renderer for {system}")


def activation_hint(system: System, files: Sequence[Path]) -> str:
    """What an administrator runs to make the written files take effect."""
    return {
        System.NETWORKMANAGER: "nmcli connection reload, then nmcli connection up <interface> (or reboot)",
        System.IFCFG: "nmcli connection reload (RHEL 8+) or systemctl restart network (RHEL 7), or reboot",
        System.NETPLAN: "netplan apply (or reboot)",
        System.WINDOWS: f"run {files[0] if files else WINDOWS_SCRIPT} as Administrator",
    }.get(system, "reboot")
