"""A machine's network identity: its configured (not leased) static IP settings, per interface.

Failover to Azure loses a machine's static IP configuration (Azure hands out
DHCP); failback puts it back (DESIGN §1). The source agent records the identity
from the OS when it registers (`agents/source/netidentity/capture.py`) and
writes it back when the configuration server sends a network order
(`agents/source/netidentity/apply.py`). The controller keeps what it was told
and checks it with the same rules (`validate_dict`).

Everything that later becomes part of a configuration file or a script is
checked here, once, so a renderer can rely on it: interface names are short and
hold no path separators, quotes or shell/`cmd` metacharacters (`../x`, `a"b` and
`%PATH%` are refused), addresses and gateways parse as IP addresses, a MAC is six
hex octets, search domains are DNS names, and every list is bounded.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from siterecovery.common import errors
from siterecovery.common.pb import common_pb2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

MAX_INTERFACES = 32
MAX_ADDRESSES = 64
MAX_DNS_SERVERS = 8
MAX_DNS_SEARCH = 16

# Letters, digits and a few separators; no '/', '\\', quotes, '%', '$', ';' or control
# characters, and not starting with '.' or '-' (so never '.', '..' or an option).
# Windows names ("Ethernet 2") may hold spaces; Linux names never do, but that is the
# kernel's rule to keep, not ours.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. +()#-]{0,62}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_DOMAIN_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Method(enum.Enum):
    """How an interface gets its addresses of one family."""

    UNSPECIFIED = ""
    STATIC = "static"
    DHCP = "dhcp"
    # IPv6 router advertisements (SLAAC).
    AUTO = "auto"
    DISABLED = "disabled"


class System(enum.Enum):
    """The configuration system an identity was read from, or is written for."""

    UNSPECIFIED = ""
    NETWORKMANAGER = "networkmanager"
    IFCFG = "ifcfg"
    NETPLAN = "netplan"
    WINDOWS = "windows"


_METHOD_PROTO = {
    Method.UNSPECIFIED: common_pb2.ADDRESS_METHOD_UNSPECIFIED,
    Method.STATIC: common_pb2.ADDRESS_METHOD_STATIC,
    Method.DHCP: common_pb2.ADDRESS_METHOD_DHCP,
    Method.AUTO: common_pb2.ADDRESS_METHOD_AUTO,
    Method.DISABLED: common_pb2.ADDRESS_METHOD_DISABLED,
}
_SYSTEM_PROTO = {
    System.UNSPECIFIED: common_pb2.NETWORK_SYSTEM_UNSPECIFIED,
    System.NETWORKMANAGER: common_pb2.NETWORK_SYSTEM_NETWORKMANAGER,
    System.IFCFG: common_pb2.NETWORK_SYSTEM_IFCFG,
    System.NETPLAN: common_pb2.NETWORK_SYSTEM_NETPLAN,
    System.WINDOWS: common_pb2.NETWORK_SYSTEM_WINDOWS,
}
_METHOD_FROM_PROTO = {v: k for k, v in _METHOD_PROTO.items()}
_SYSTEM_FROM_PROTO = {v: k for k, v in _SYSTEM_PROTO.items()}


def _invalid(message: str, hint: str = "") -> errors.InvalidInput:
    return errors.InvalidInput(message, hint=hint, code="network-identity-invalid")


def check_name(name: str) -> str:
    """An interface name that is safe in a file name, a YAML key and a netsh argument."""
    if not _NAME.fullmatch(name) or name.endswith((" ", ".")):
        raise _invalid(
            f"interface name {name[:80]!r} is not allowed",
            hint="an interface name is 1-63 letters, digits, spaces and _ . + ( ) # -, "
            "and does not start with '.' or '-'",
        )
    return name


def normalise_mac(text: str) -> str:
    """'AA-BB-CC-DD-EE-FF', 'aa:bb:…' → 'aa:bb:cc:dd:ee:ff'; '' stays ''."""
    mac = text.strip().lower().replace("-", ":")
    if mac and not _MAC.fullmatch(mac):
        raise _invalid(f"{text[:80]!r} is not a MAC address (six hex octets)")
    return mac


def check_domain(name: str) -> str:
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise _invalid(f"{name[:80]!r} is not a DNS domain name")
    return name


def parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise _invalid(f"{text[:80]!r} is not an IP address") from exc


def parse_interface_address(text: str) -> IPInterface:
    """'10.0.0.5/24' (a bare address is a host route: /32 or /128)."""
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise _invalid(f"{text[:80]!r} is not an IP address with a prefix length (10.0.0.5/24)") from exc


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    ipv4_method: Method = Method.UNSPECIFIED
    ipv6_method: Method = Method.UNSPECIFIED
    addresses: tuple[IPInterface, ...] = ()
    gateways: tuple[IPAddress, ...] = ()
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int = 0

    def __post_init__(self) -> None:
        check_name(self.name)
        if normalise_mac(self.mac) != self.mac:
            raise _invalid(f"MAC address {self.mac!r} of {self.name} is not in lower-case colon form")
        if len(self.addresses) > MAX_ADDRESSES:
            raise _invalid(f"interface {self.name} has more than {MAX_ADDRESSES} addresses")
        if len(self.dns_servers) > MAX_DNS_SERVERS or len(self.dns_search) > MAX_DNS_SEARCH:
            raise _invalid(
                f"interface {self.name} has more than {MAX_DNS_SERVERS} DNS servers or {MAX_DNS_SEARCH} search domains"
            )
        for version in (4, 6):
            if sum(1 for g in self.gateways if g.version == version) > 1:
                raise _invalid(f"interface {self.name} has more than one IPv{version} gateway")
            static = self.method(version) is Method.STATIC
            if static != any(a.version == version for a in self.addresses):
                raise _invalid(
                    f"interface {self.name}: IPv{version} is "
                    + ("static but has no address" if static else "not static but has static addresses"),
                )
        for domain in self.dns_search:
            check_domain(domain)
        if self.mtu and not 68 <= self.mtu <= 65535:
            raise _invalid(f"interface {self.name}: MTU {self.mtu} is outside 68-65535")

    def method(self, version: int) -> Method:
        return self.ipv4_method if version == 4 else self.ipv6_method

    def addresses_of(self, version: int) -> list[IPInterface]:
        return [a for a in self.addresses if a.version == version]

    def gateway_of(self, version: int) -> IPAddress | None:
        return next((g for g in self.gateways if g.version == version), None)

    @property
    def is_static(self) -> bool:
        return Method.STATIC in (self.ipv4_method, self.ipv6_method)

    # -- wire --------------------------------------------------------------
    def to_proto(self) -> common_pb2.NetworkInterface:
        return common_pb2.NetworkInterface(
            name=self.name,
            mac_address=self.mac,
            ipv4_method=_METHOD_PROTO[self.ipv4_method],
            ipv6_method=_METHOD_PROTO[self.ipv6_method],
            addresses=[
                common_pb2.IpAddress(address=str(a.ip), prefix_length=a.network.prefixlen) for a in self.addresses
            ],
            gateways=[str(g) for g in self.gateways],
            dns_servers=[str(d) for d in self.dns_servers],
            dns_search=list(self.dns_search),
            mtu=self.mtu,
        )

    @classmethod
    def from_proto(cls, message: common_pb2.NetworkInterface) -> Interface:
        if len(message.addresses) > MAX_ADDRESSES or len(message.gateways) > 2:
            raise _invalid(f"interface {message.name[:80]!r} has too many addresses or gateways")
        if len(message.dns_servers) > MAX_DNS_SERVERS or len(message.dns_search) > MAX_DNS_SEARCH:
            raise _invalid(f"interface {message.name[:80]!r} has too many DNS servers or search domains")
        return cls(
            name=check_name(message.name),
            mac=normalise_mac(message.mac_address),
            ipv4_method=_method_from_proto(message.ipv4_method),
            ipv6_method=_method_from_proto(message.ipv6_method),
            addresses=tuple(_interface_address(a) for a in message.addresses),
            gateways=tuple(parse_address(g) for g in message.gateways),
            dns_servers=tuple(parse_address(d) for d in message.dns_servers),
            dns_search=tuple(message.dns_search),
            mtu=message.mtu,
        )


def _method_from_proto(value: int) -> Method:
    try:
        return _METHOD_FROM_PROTO[value]
    except KeyError:
        raise _invalid(f"unknown address method {value}") from None


def _interface_address(message: common_pb2.IpAddress) -> IPInterface:
    address = parse_address(message.address)
    if message.prefix_length > address.max_prefixlen:
        raise _invalid(f"prefix length {message.prefix_length} is too long for {address}")
    return ipaddress.ip_interface(f"{address}/{message.prefix_length}")


@dataclass(frozen=True)
class Identity:
    system: System = System.UNSPECIFIED
    interfaces: tuple[Interface, ...] = ()
    captured_at: datetime | None = None
    from_agent_config: bool = False

    def __post_init__(self) -> None:
        # Interfaces are told apart by name and by MAC: two with the same one are refused.
        if len(self.interfaces) > MAX_INTERFACES:
            raise _invalid(f"more than {MAX_INTERFACES} interfaces")
        names = [i.name for i in self.interfaces]
        macs = [i.mac for i in self.interfaces if i.mac]
        if len(set(names)) != len(names) or len(set(macs)) != len(macs):
            raise _invalid("two interfaces have the same name or the same MAC address")

    @property
    def is_static(self) -> bool:
        return any(i.is_static for i in self.interfaces)

    def to_proto(self) -> common_pb2.NetworkIdentity:
        message = common_pb2.NetworkIdentity(
            system=_SYSTEM_PROTO[self.system],
            interfaces=[i.to_proto() for i in self.interfaces],
            from_agent_config=self.from_agent_config,
        )
        if self.captured_at is not None:
            message.captured_at.FromDatetime(self.captured_at)
        return message

    @classmethod
    def from_proto(cls, message: common_pb2.NetworkIdentity) -> Identity:
        if len(message.interfaces) > MAX_INTERFACES:
            raise _invalid(f"more than {MAX_INTERFACES} interfaces")
        try:
            system = _SYSTEM_FROM_PROTO[message.system]
        except KeyError:
            raise _invalid(f"unknown network system {message.system}") from None
        captured_at = None
        if message.HasField("captured_at"):
            try:
                captured_at = message.captured_at.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError) as exc:
                raise _invalid("the capture time is out of range") from exc
        return cls(
            system=system,
            interfaces=tuple(Interface.from_proto(i) for i in message.interfaces),
            captured_at=captured_at,
            from_agent_config=message.from_agent_config,
        )


def system_from_proto(value: int) -> System:
    try:
        return _SYSTEM_FROM_PROTO[value]
    except KeyError:
        raise _invalid(f"unknown network system {value}") from None


def system_to_proto(system: System) -> int:
    return _SYSTEM_PROTO[system]


def from_dict(data: dict[str, Any]) -> Identity:
    """The identity as the controller stores it (a NetworkIdentity message as JSON), checked."""
    try:
        message = json_format.ParseDict(data, common_pb2.NetworkIdentity(), ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise _invalid(f"the network identity is malformed: {str(exc)[:200]}") from exc
    return Identity.from_proto(message)


def validate_dict(data: Any) -> None:
    if not isinstance(data, dict):
        raise _invalid("the network identity is not a message")
    from_dict(data)
