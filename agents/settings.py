"""Settings every agent daemon shares, and each one's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.common.errors import InvalidInput
from siterecovery.common.settings import parse_listen

DATA_PORT = 9443
SOURCE_PORT = 9444


@dataclass(frozen=True)
class AgentSettings:
    state_dir: Path = Path("/var/lib/siterecovery/agent")
    # The configuration server, host:port.
    server: str = ""
    # A file holding the connection passphrase; read once, at enrollment.
    passphrase_file: Path | None = None
    # Used until the configuration server says otherwise.
    heartbeat_interval: float = 10.0
    log_level: str = "info"
    log_json: bool | None = None
    # Every agent serves gRPC (health, reflection, and its own services) on this
    # address and port, mutual TLS only.
    listen: str = "0.0.0.0"
    port: int = DATA_PORT
    # The host name or address peers use to reach that port; reported to the
    # configuration server. Default: this host's name.
    advertise: str = ""
    # The port peers dial when NAT or a proxy forwards another port to this one.
    # Default (0): the port bound.
    advertise_port: int = 0
    # The name this agent's machine goes by (default: the host name). Set it
    # when one host runs several agents of a role (the lab).
    hostname: str = ""
    # Serve Prometheus metrics at http://<this>/metrics ("127.0.0.1:9464"; port 0
    # picks a free one, written to the state file as metrics_port). Empty: off.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        if self.metrics_listen:
            parse_listen(self.metrics_listen, setting="metrics_listen")
        if not self.server:
            raise InvalidInput(
                "no configuration server given",
                hint="set server = \"host:443\" in the config file or pass --server",
                code="config-missing-server",
            )
        if not 0 <= self.advertise_port <= 65535:
            raise InvalidInput(f"advertise_port {self.advertise_port} is outside 0-65535", code="config-range")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port} is outside 0-65535", code="config-range")


@dataclass(frozen=True)
class ProcessServerSettings(AgentSettings):
    state_dir: Path = Path("/var/lib/siterecovery/process-server")
    spool_dir: Path | None = None
    # The spool never grows past this; sources are pushed back when it is full.
    spool_limit_bytes: int = 64 * 1024**3
    # Encrypt spooled frames at rest (AES-256-GCM, common/sealing.py) with the key
    # in spool_key_file (default <state_dir>/spool.key, made 0600 on first use).
    spool_encryption: bool = False
    spool_key_file: Path | None = None
    # Forward protection to Azure: a file (0600, owner only) holding one Azure
    # Storage connection string (account key or SAS) for the storage account of
    # the Azure site; with it the process server writes azure-page-blob pairs
    # into page blobs itself (agents/process_server/azure_storage.py).
    azure_storage_connection_string_file: Path | None = None

    @property
    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    @property
    def resolved_spool_key_file(self) -> Path:
        return self.spool_key_file or self.state_dir / "spool.key"


@dataclass(frozen=True)
class MasterTargetSettings(AgentSettings):
    state_dir: Path = Path("/var/lib/siterecovery/master-target")
    datastore_dirs: tuple[Path, ...] = ()
    retention_dir: Path | None = None
    # Free space kept on the retention disk: below it a pair pauses (retention-full)
    # instead of filling the disk, and resumes by itself when space returns.
    retention_reserve_bytes: int = 64 * 1024**2
    # The master target VM's BIOS UUID, by which failback finds it in vCenter's
    # inventory (its host, its datastores). Empty: read it (root on Linux).
    machine_uuid: str = ""
    # Where the read-only NBD exports of point views listen (OpenView; port 0: any free
    # port). NBD has no authentication: keep it on loopback or a trusted network.
    view_nbd_host: str = "127.0.0.1"
    view_nbd_port: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retention_reserve_bytes < 0:
            raise InvalidInput(
                f"retention_reserve_bytes {self.retention_reserve_bytes} is negative", code="config-range"
            )
        if not 0 <= self.view_nbd_port <= 65535:
            raise InvalidInput(f"view_nbd_port {self.view_nbd_port} is not a port number (0-65535)",
                               code="config-range")

    @property
    def resolved_datastore_dirs(self) -> tuple[Path, ...]:
        return self.datastore_dirs or (self.state_dir / "datastore",)

    @property
    def resolved_retention_dir(self) -> Path:
        return self.retention_dir or self.state_dir / "retention"


@dataclass(frozen=True)
class DiskSettings:
    path: Path = Path()
    name: str = ""


@dataclass(frozen=True)
class NetworkInterfaceSettings:
    """One interface of a network identity stated in the config file ([[network.interfaces]])."""

    name: str = ""
    mac_address: str = ""
    # static, dhcp, disabled (IPv6 also auto); empty: static when addresses has one of that family.
    ipv4_method: str = ""
    ipv6_method: str = ""
    # "10.0.0.5/24", "fd00::5/64"
    addresses: tuple[str, ...] = ()
    # At most one per family.
    gateways: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int = 0


@dataclass(frozen=True)
class NetworkSettings:
    """A network identity stated in the config file instead of read from the OS.

    On Windows the agent cannot read one (there are no files to read; netsh or WMI
    output may be read in the future): state it here. On Linux it overrides what
    agents/source/netidentity/capture.py would read.
    """

    # Which system the machine uses: networkmanager, ifcfg, netplan or windows.
    # Empty: windows on Windows, else the system found under network_root.
    system: str = ""
    interfaces: tuple[NetworkInterfaceSettings, ...] = ()


@dataclass(frozen=True)
class SourceSettings(AgentSettings):
    state_dir: Path = Path("/var/lib/siterecovery/source")
    # A source agent's own port serves health and reflection to local monitoring.
    listen: str = "127.0.0.1"
    port: int = SOURCE_PORT
    disks: tuple[DiskSettings, ...] = field(default_factory=tuple)
    # Every configured disk is served over NBD on this address (export name = disk
    # name); writes made through it are journaled and replicated. Port 0 picks one.
    nbd_listen: str = "127.0.0.1"
    nbd_port: int = 10809
    # Bytes a pair may have sent to its process server and not yet had acknowledged.
    send_window_bytes: int = 64 * 1024 * 1024
    # A pair's journal holds at most this many bytes of writes not yet acknowledged, and
    # stops short of leaving less than journal_reserve_percent of the state volume free.
    # Past either, the pair tracks changed blocks instead and resends them once the
    # process server catches up (no guest write fails; the RPO grows meanwhile).
    journal_limit_bytes: int = 8 * 1024 * 1024 * 1024
    journal_reserve_percent: float = 5.0
    # App-consistent points: run before the tag (exit 0 = the application is frozen)
    # and after it; each is killed after hook_timeout_seconds.
    freeze_script: Path | None = None
    thaw_script: Path | None = None
    hook_timeout_seconds: float = 60.0
    # How the configuration server recognises this machine (default: the BIOS
    # UUID, readable by root on Linux).
    machine_uuid: str = ""
    # Network identity (failback restores the static IP configuration): the OS's network
    # configuration is read under this directory, and a network order writes there.
    network_root: Path = Path("/")
    # Run after a network order wrote its files ("nmcli connection reload", "netplan apply");
    # empty: only write them, and log what an administrator should run.
    network_apply_command: str = ""
    # Prints the disk generation failback stamps on a VM before it rewrites its disks
    # (agents/source/generation.py); a new value drops the old pairs' journals
    # instead of replaying them. VMware VMs (Tools installed):
    # 'vmware-rpctool "info-get guestinfo.siterecovery.disk-generation"'. Empty: not asked.
    disk_generation_command: str = ""
    # A network identity stated here instead of read from the OS (Windows; or an override).
    network: NetworkSettings = field(default_factory=NetworkSettings)
    # A delta sync asks the process server for this many 64 KiB blocks' digests per
    # call (1 to 16384; 4096 = 256 MiB of disk, 64 KiB of digests), two calls ahead.
    delta_hash_blocks: int = 4096
