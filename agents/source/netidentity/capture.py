"""Read a machine's configured network identity from its OS configuration files.

Everything is read under a root directory (setting `network_root`, "/" in
production, a fixture tree in the tests):

- NetworkManager keyfiles: `etc/NetworkManager/system-connections/*.nmconnection`
  (INI: `[connection] interface-name`, `[ethernet] mac-address, mtu`,
  `[ipv4] method=manual, address1=10.0.0.5/24,10.0.0.1, dns=…;, dns-search=…;`,
  the same for `[ipv6]`);
- netplan: `etc/netplan/*.yaml`, merged in file-name order as netplan does
  (a later file's keys replace an earlier one's), `network.ethernets` only;
- RHEL network-scripts: `etc/sysconfig/network-scripts/ifcfg-*`
  (`BOOTPROTO`, `IPADDR[n]`, `PREFIX[n]`/`NETMASK[n]`, `GATEWAY`, `DNS1..`,
  `DOMAIN`, `HWADDR`, `MTU`, `IPV6INIT`, `IPV6ADDR[_SECONDARIES]`, …).

**Precedence: NetworkManager > netplan > ifcfg.** A machine may hold several (RHEL
8/9 NetworkManager reads both its keyfiles and ifcfg files; Ubuntu may keep netplan
files next to keyfiles). An interface described by a more preferred system is taken
from it; interfaces only a less preferred system describes are added. The identity's
`system` is the most preferred system that described anything. Two profiles of one
system for the same interface: the static one is kept.

Only what is configured is recorded, never a live DHCP lease: a DHCP interface is
recorded as DHCP, with no addresses. Ethernet interfaces only (bonds, bridges, VLANs,
Wi-Fi are left out, with a log line). A file that cannot be read or an interface
whose settings do not check out (see common/netidentity.py) is skipped with a
warning: a partial identity is better than none, and the log says what is missing.
When a profile names only a MAC address, the interface's name is looked up in
`sys/class/net/*/address` under the root.

Windows has none of these files: its identity comes from the agent's config file
(`[[network.interfaces]]`, `from_settings`), which overrides capture on any OS.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from siterecovery.agents.settings import NetworkSettings
from siterecovery.common import errors, logging
from siterecovery.common.netidentity import (
    Identity,
    Interface,
    IPAddress,
    IPInterface,
    Method,
    System,
    normalise_mac,
    parse_address,
    parse_interface_address,
)

log = logging.get_logger(__name__)

NM_DIR = Path("etc/NetworkManager/system-connections")
NETPLAN_DIR = Path("etc/netplan")
IFCFG_DIR = Path("etc/sysconfig/network-scripts")
SYSFS_NET = Path("sys/class/net")

NM_ETHERNET = ("ethernet", "802-3-ethernet")
IFCFG_SKIP_SUFFIXES = ("~", ".bak", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".sr-backup")


@dataclass(frozen=True)
class LiveInterface:
    name: str
    mac: str


def live_interfaces(root: Path) -> list[LiveInterface]:
    """The machine's network devices with a MAC address (`sys/class/net/*/address`), loopback left out."""
    found = []
    net = root / SYSFS_NET
    if not net.is_dir():
        return found
    for device in sorted(net.iterdir()):
        try:
            mac = normalise_mac((device / "address").read_text().strip())
        except (OSError, errors.InvalidInput):
            continue
        if device.name != "lo" and mac and mac != "00:00:00:00:00:00":
            found.append(LiveInterface(device.name, mac))
    return found


class _Builder:
    """Collects one interface's settings as text, then checks them into an Interface."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.name = ""
        self.mac = ""
        self.methods: dict[int, Method] = {4: Method.UNSPECIFIED, 6: Method.UNSPECIFIED}
        self.addresses: list[IPInterface] = []
        self.gateways: list[IPAddress] = []
        self.dns_servers: list[IPAddress] = []
        self.dns_search: list[str] = []
        self.mtu = 0

    def add_gateway(self, text: str) -> None:
        gateway = parse_address(text.split("%")[0].strip())
        if all(g.version != gateway.version for g in self.gateways):
            self.gateways.append(gateway)

    def add_dns(self, text: str) -> None:
        server = parse_address(text.strip())
        if server not in self.dns_servers:
            self.dns_servers.append(server)

    def add_search(self, text: str) -> None:
        if text and text not in self.dns_search:
            self.dns_search.append(text)

    def build(self, live: list[LiveInterface]) -> Interface:
        mac = normalise_mac(self.mac)
        name = self.name or next((i.name for i in live if mac and i.mac == mac), "")
        if not name:
            raise errors.InvalidInput(f"{self.source} names no interface, and no device has its MAC address")
        for version in (4, 6):
            has_static = any(a.version == version for a in self.addresses)
            if has_static and self.methods[version] is not Method.STATIC:
                if self.methods[version] is not Method.UNSPECIFIED:
                    log.warning(
                        "an interface has static addresses and another method; recording the static addresses",
                        source=self.source, interface=name, family=f"IPv{version}",
                        method=self.methods[version].value,
                    )
                self.methods[version] = Method.STATIC
        return Interface(
            name=name,
            mac=mac,
            ipv4_method=self.methods[4],
            ipv6_method=self.methods[6],
            addresses=tuple(self.addresses),
            gateways=tuple(self.gateways),
            dns_servers=tuple(self.dns_servers),
            dns_search=tuple(self.dns_search),
            mtu=self.mtu,
        )


def _checked(source: str, build: Callable[[], Interface | None]) -> Interface | None:
    try:
        return build()
    except (errors.InvalidInput, OSError, configparser.Error, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("skipping a network configuration that does not check out", source=source, error=str(exc))
        return None


# -- NetworkManager -----------------------------------------------------------------


def _numbered(section: configparser.SectionProxy, prefix: str) -> list[str]:
    """Values of address1, address2, … (and address) in number order."""
    pattern = re.compile(rf"{prefix}(\d*)")
    keyed = []
    for key, value in section.items():
        match = pattern.fullmatch(key)
        if match:
            keyed.append((int(match.group(1) or 0), value))
    return [value for _, value in sorted(keyed)]


def _nm_list(value: str) -> list[str]:
    return [item.strip() for item in value.replace(",", ";").split(";") if item.strip()]


_NM_METHODS = {
    4: {"manual": Method.STATIC, "auto": Method.DHCP, "disabled": Method.DISABLED},
    6: {
        "manual": Method.STATIC, "auto": Method.AUTO, "dhcp": Method.DHCP,
        "disabled": Method.DISABLED, "ignore": Method.DISABLED,
    },
}


def _nm_family(builder: _Builder, parser: configparser.ConfigParser, version: int) -> None:
    section_name = f"ipv{version}"
    if not parser.has_section(section_name):
        return
    section = parser[section_name]
    builder.methods[version] = _NM_METHODS[version].get(section.get("method", ""), Method.UNSPECIFIED)
    for value in _numbered(section, "address") + _numbered(section, "addresses"):
        if ";" in value:  # the old form: address;prefix;gateway;
            parts = [p for p in value.split(";") if p]
            address, gateway = f"{parts[0]}/{parts[1]}", (parts[2] if len(parts) > 2 else "")
        else:
            address, _, gateway = value.partition(",")
        builder.addresses.append(parse_interface_address(address.strip()))
        if gateway.strip() and not ipaddress.ip_address(gateway.strip()).is_unspecified:
            builder.add_gateway(gateway)
    if section.get("gateway"):
        builder.add_gateway(section["gateway"])
    for server in _nm_list(section.get("dns", "")):
        builder.add_dns(server)
    for domain in _nm_list(section.get("dns-search", "")):
        builder.add_search(domain)


def _nm_file(path: Path, live: list[LiveInterface]) -> Interface | None:
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    connection = parser["connection"] if parser.has_section("connection") else {}
    kind = connection.get("type", "")
    if kind not in NM_ETHERNET:
        log.info("not recording a NetworkManager profile that is not ethernet", file=str(path), type=kind)
        return None
    builder = _Builder(str(path))
    builder.name = connection.get("interface-name", "")
    for section_name in NM_ETHERNET:
        if parser.has_section(section_name):
            ethernet = parser[section_name]
            builder.mac = builder.mac or ethernet.get("mac-address", "")
            builder.mtu = builder.mtu or int(ethernet.get("mtu", "0") or 0)
    for version in (4, 6):
        _nm_family(builder, parser, version)
    return builder.build(live)


def capture_networkmanager(root: Path, live: list[LiveInterface] | None = None) -> list[Interface]:
    live = live_interfaces(root) if live is None else live
    found = []
    for path in sorted((root / NM_DIR).glob("*.nmconnection")):
        interface = _checked(str(path), lambda path=path: _nm_file(path, live))
        if interface is not None:
            found.append(interface)
    return found


# -- netplan -------------------------------------------------------------------------


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


class _NetplanLoader(yaml.SafeLoader):
    """YAML 1.1 without implicit numbers: PyYAML would read an unquoted MAC made of digits
    (00:50:56:11:22:33) as a base-60 integer, where netplan reads a string."""


_NetplanLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _netplan_address(item: Any) -> IPInterface:
    # An address is "10.0.0.5/24" or, since netplan 0.105, {"10.0.0.5/24": {lifetime: …}}.
    if isinstance(item, dict) and len(item) == 1:
        item = next(iter(item))
    if not isinstance(item, str) or "/" not in item:
        raise errors.InvalidInput(f"netplan address {item!r} has no prefix length")
    return parse_interface_address(item)


def _netplan_interface(key: str, config: dict, source: str, live: list[LiveInterface]) -> Interface:
    builder = _Builder(f"{source}: ethernets.{key}")
    match = config.get("match") or {}
    builder.mac = str(match.get("macaddress", ""))
    match_name = str(match.get("name", ""))
    named = config.get("set-name") or (match_name if match_name and not re.search(r"[*?\[]", match_name) else "")
    builder.name = str(named or ("" if builder.mac else key))
    for version, dhcp_key in ((4, "dhcp4"), (6, "dhcp6")):
        if config.get(dhcp_key) is True:
            builder.methods[version] = Method.DHCP
    if config.get("accept-ra") is True and builder.methods[6] is Method.UNSPECIFIED:
        builder.methods[6] = Method.AUTO
    elif config.get("accept-ra") is False and builder.methods[6] is Method.UNSPECIFIED:
        builder.methods[6] = Method.DISABLED
    builder.addresses = [_netplan_address(a) for a in config.get("addresses") or []]
    for gateway_key in ("gateway4", "gateway6"):
        if config.get(gateway_key):
            builder.add_gateway(str(config[gateway_key]))
    for route in config.get("routes") or []:
        if str(route.get("to", "")) in ("default", "0.0.0.0/0", "::/0") and route.get("via"):
            builder.add_gateway(str(route["via"]))
    nameservers = config.get("nameservers") or {}
    for server in nameservers.get("addresses") or []:
        builder.add_dns(str(server))
    for domain in nameservers.get("search") or []:
        builder.add_search(str(domain))
    builder.mtu = int(config.get("mtu") or 0)
    return builder.build(live)


def capture_netplan(root: Path, live: list[LiveInterface] | None = None) -> list[Interface]:
    live = live_interfaces(root) if live is None else live
    merged: dict = {}
    sources = []
    for path in sorted((root / NETPLAN_DIR).glob("*.yaml")):
        try:
            data = yaml.load(path.read_text(), Loader=_NetplanLoader) or {}  # a SafeLoader
        except (OSError, yaml.YAMLError) as exc:
            log.warning("skipping a netplan file that cannot be read", file=str(path), error=str(exc))
            continue
        if isinstance(data, dict):
            _merge(merged, data)
            sources.append(path.name)
    ethernets = (merged.get("network") or {}).get("ethernets") or {}
    source = f"{root / NETPLAN_DIR} ({', '.join(sources)})"
    found = []
    if not isinstance(ethernets, dict):
        return found
    for key, config in ethernets.items():
        interface = _checked(
            f"{source}: ethernets.{key}",
            lambda key=key, config=config: _netplan_interface(str(key), config, source, live),
        )
        if interface is not None:
            found.append(interface)
    return found


# -- ifcfg ----------------------------------------------------------------------------


def read_shell_assignments(text: str) -> dict[str, str]:
    """KEY=value lines with shell quoting (shlex does the unquoting); comments skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        values[key.strip()] = " ".join(shlex.split(raw, comments=True))
    return values


def _classful_prefix(address: ipaddress.IPv4Address) -> int:
    # What initscripts' ipcalc assumes when an ifcfg file gives neither PREFIX nor NETMASK.
    first = int(address) >> 24
    return 8 if first < 128 else 16 if first < 192 else 24


def _ifcfg_ipv4(builder: _Builder, values: dict[str, str]) -> None:
    suffixes = sorted(
        {m.group(1) for k in values if (m := re.fullmatch(r"IPADDR(\d*)", k))}, key=lambda s: int(s or -1)
    )
    for suffix in suffixes:
        address = ipaddress.IPv4Address(values[f"IPADDR{suffix}"])
        if values.get(f"PREFIX{suffix}"):
            prefix = int(values[f"PREFIX{suffix}"])
        elif values.get(f"NETMASK{suffix}"):
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{values[f'NETMASK{suffix}']}").prefixlen
        else:
            prefix = _classful_prefix(address)
        builder.addresses.append(ipaddress.IPv4Interface(f"{address}/{prefix}"))
    bootproto = values.get("BOOTPROTO", "none").lower()
    if bootproto in ("dhcp", "bootp"):
        builder.methods[4] = Method.DHCP
    elif builder.addresses:
        builder.methods[4] = Method.STATIC


def _ifcfg_ipv6(builder: _Builder, values: dict[str, str]) -> None:
    if "IPV6INIT" not in values:
        return
    if values["IPV6INIT"].lower() not in ("yes", "true", "1"):
        builder.methods[6] = Method.DISABLED
        return
    addresses = [values.get("IPV6ADDR", ""), *values.get("IPV6ADDR_SECONDARIES", "").split()]
    builder.addresses += [parse_interface_address(a) for a in addresses if a]
    if values.get("DHCPV6C", "").lower() == "yes":
        builder.methods[6] = Method.DHCP
    elif any(a.version == 6 for a in builder.addresses):
        builder.methods[6] = Method.STATIC
    elif values.get("IPV6_AUTOCONF", "yes").lower() == "yes":
        builder.methods[6] = Method.AUTO
    if values.get("IPV6_DEFAULTGW"):
        builder.add_gateway(values["IPV6_DEFAULTGW"])


def _ifcfg_file(path: Path, live: list[LiveInterface]) -> Interface | None:
    values = read_shell_assignments(path.read_text())
    kind = values.get("TYPE", "Ethernet")
    if kind.lower() != "ethernet":
        log.info("not recording an ifcfg file that is not ethernet", file=str(path), type=kind)
        return None
    builder = _Builder(str(path))
    builder.name = values.get("DEVICE") or path.name.removeprefix("ifcfg-")
    builder.mac = values.get("HWADDR") or values.get("MACADDR", "")
    _ifcfg_ipv4(builder, values)
    if values.get("GATEWAY"):
        builder.add_gateway(values["GATEWAY"])
    _ifcfg_ipv6(builder, values)
    for key in sorted((k for k in values if re.fullmatch(r"DNS\d+", k)), key=lambda k: int(k[3:])):
        builder.add_dns(values[key])
    for domain in values.get("DOMAIN", "").split():
        builder.add_search(domain)
    builder.mtu = int(values.get("MTU") or 0)
    return builder.build(live)


def capture_ifcfg(root: Path, live: list[LiveInterface] | None = None) -> list[Interface]:
    live = live_interfaces(root) if live is None else live
    found = []
    for path in sorted((root / IFCFG_DIR).glob("ifcfg-*")):
        # ifcfg-lo is loopback; ifcfg-eth0:1 an alias (addresses of eth0); the rest are copies.
        if path.name == "ifcfg-lo" or ":" in path.name or path.name.endswith(IFCFG_SKIP_SUFFIXES):
            continue
        interface = _checked(str(path), lambda path=path: _ifcfg_file(path, live))
        if interface is not None:
            found.append(interface)
    return found


# -- all of it --------------------------------------------------------------------------

READERS: tuple[tuple[System, Callable[[Path, list[LiveInterface]], list[Interface]]], ...] = (
    (System.NETWORKMANAGER, capture_networkmanager),
    (System.NETPLAN, capture_netplan),
    (System.IFCFG, capture_ifcfg),
)


def _preferred_within(interfaces: list[Interface]) -> list[Interface]:
    """Two profiles of one system for the same interface (say a DHCP profile a cloud agent
    left next to the static one): the static one is kept, else the first by file name."""
    kept: list[Interface] = []
    for interface in interfaces:
        same = next((k for k in kept if k.name == interface.name or (k.mac and k.mac == interface.mac)), None)
        if same is None:
            kept.append(interface)
        elif interface.is_static and not same.is_static:
            kept[kept.index(same)] = interface
    return kept


def merge(found: Iterable[tuple[System, list[Interface]]]) -> tuple[System, list[Interface]]:
    """Interfaces of every system, a more preferred system's first; a less preferred system's
    description of an interface already taken (same name or MAC) is dropped. The system is the
    first one that described anything. Sorted by name, so a capture does not depend on file names."""
    system, interfaces = System.UNSPECIFIED, []
    names: set[str] = set()
    macs: set[str] = set()
    for found_system, found_interfaces in found:
        for interface in _preferred_within(found_interfaces):
            if interface.name in names or (interface.mac and interface.mac in macs):
                log.info("an interface is described by more than one system; keeping the preferred one",
                         interface=interface.name, ignored=found_system.value)
                continue
            if system is System.UNSPECIFIED:
                system = found_system
            names.add(interface.name)
            if interface.mac:
                macs.add(interface.mac)
            interfaces.append(interface)
    return system, sorted(interfaces, key=lambda i: i.name)


def capture(root: Path, *, now: datetime) -> Identity:
    """The configured identity under `root` (an empty one when nothing is configured there)."""
    live = live_interfaces(root)
    system, interfaces = merge((system, reader(root, live)) for system, reader in READERS)
    return Identity(system=system, interfaces=tuple(interfaces), captured_at=now)


# -- stated in the agent's config file ----------------------------------------------------


def _method(text: str, what: str) -> Method:
    try:
        return Method(text.strip().lower())
    except ValueError:
        raise errors.InvalidInput(
            f"{what} {text!r} is not one of static, dhcp, auto, disabled", code="config-network"
        ) from None


def from_settings(settings: NetworkSettings, *, windows: bool, now: datetime | None = None) -> Identity | None:
    """The identity stated in the config file ([network]), or None when it states none; InvalidInput
    (code config-network) naming the first thing that does not check out."""
    if not settings.interfaces:
        return None
    try:
        system = System(settings.system.strip().lower())
    except ValueError:
        raise errors.InvalidInput(
            f"network.system {settings.system!r} is not one of networkmanager, ifcfg, netplan, windows",
            code="config-network",
        ) from None
    if system is System.UNSPECIFIED and windows:
        system = System.WINDOWS
    interfaces = []
    for entry in settings.interfaces:
        where = f"network.interfaces {entry.name!r}"
        try:
            addresses = tuple(parse_interface_address(a) for a in entry.addresses)
            methods = {}
            for version, text in ((4, entry.ipv4_method), (6, entry.ipv6_method)):
                methods[version] = _method(text, f"{where}: ipv{version}_method")
                if methods[version] is Method.UNSPECIFIED and any(a.version == version for a in addresses):
                    methods[version] = Method.STATIC
            interfaces.append(Interface(
                name=entry.name,
                mac=normalise_mac(entry.mac_address),
                ipv4_method=methods[4],
                ipv6_method=methods[6],
                addresses=addresses,
                gateways=tuple(parse_address(g) for g in entry.gateways),
                dns_servers=tuple(parse_address(s) for s in entry.dns_servers),
                dns_search=tuple(entry.dns_search),
                mtu=entry.mtu,
            ))
        except errors.InvalidInput as exc:
            raise errors.InvalidInput(
                f"{where}: {exc.message}", hint="fix [[network.interfaces]] in the source agent's config file",
                code="config-network",
            ) from exc
    try:
        return Identity(system=system, interfaces=tuple(interfaces), captured_at=now, from_agent_config=True)
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"network.interfaces: {exc.message}", code="config-network") from exc
