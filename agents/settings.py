"""Settings every agent daemon shares, and each one's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.common.errors import InvalidInput

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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retention_reserve_bytes < 0:
            raise InvalidInput(
                f"retention_reserve_bytes {self.retention_reserve_bytes} is negative", code="config-range"
            )

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
    # App-consistent points: run before the tag (exit 0 = the application is frozen)
    # and after it; each is killed after hook_timeout_seconds.
    freeze_script: Path | None = None
    thaw_script: Path | None = None
    hook_timeout_seconds: float = 60.0
