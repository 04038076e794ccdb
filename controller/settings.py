"""Settings of the configuration server (sr-config-server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from siterecovery.common.errors import InvalidInput
from siterecovery.common.settings import parse_listen

DEFAULT_PORT = 443
DEFAULT_STATE_DIR = Path("/var/lib/siterecovery/config-server")


@dataclass(frozen=True)
class ConfigServerSettings:
    state_dir: Path = DEFAULT_STATE_DIR
    # Address to listen on; "0.0.0.0" for every IPv4 address.
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # Host names and addresses agents and srctl use to reach this server; they
    # are written into its certificate.
    advertise: tuple[str, ...] = ()
    # SQLAlchemy URL; empty means SQLite in <state_dir>/store.db.
    store_url: str = ""
    # Agents are told to heartbeat this often.
    heartbeat_interval: float = 10.0
    # How often the job runner looks for work (jobs created by other replicas too).
    job_poll_interval: float = 1.0
    # How often every vCenter / ESXi endpoint is discovered again, in seconds.
    vcenter_discovery_interval: float = 900.0
    # Scheduled backups (controller/backup.py): every backup_interval seconds into
    # backup_dir, sealed with the passphrase in backup_passphrase_file (0600); the
    # newest backup_keep are kept. Off while backup_dir is unset.
    backup_dir: Path | None = None
    backup_passphrase_file: Path | None = None
    backup_interval: float = 86400.0
    backup_keep: int = 7
    # The `local` provider (the lab): a directory with `onprem/` and `cloud/`
    # sites of directory-backed VMs (controller/providers/local/). Off while unset.
    local_site_dir: Path | None = None
    # Recovery plans run scripts from here only (default <state_dir>/scripts).
    plan_scripts_dir: Path | None = None
    log_level: str = "info"
    log_json: bool | None = None
    # Serve Prometheus metrics at http://<this>/metrics ("127.0.0.1:9464"; port 0
    # picks a free one, written to the state file as metrics_port). Empty: off.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        if self.metrics_listen:
            parse_listen(self.metrics_listen, setting="metrics_listen")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port} is outside 0-65535", code="config-range")
        if not 0.05 <= self.heartbeat_interval <= 3600:
            raise InvalidInput(
                f"heartbeat_interval {self.heartbeat_interval} s is outside 0.05-3600 s",
                code="config-range",
            )

        if not 1 <= self.vcenter_discovery_interval <= 7 * 86400:
            raise InvalidInput(
                f"vcenter_discovery_interval {self.vcenter_discovery_interval} s is outside 1 s-7 days",
                code="config-range",
            )

        if self.backup_dir is not None and self.backup_passphrase_file is None:
            raise InvalidInput(
                "backup_dir is set but backup_passphrase_file is not",
                hint="set backup_passphrase_file to a 0600 file holding the passphrase the backups are sealed with",
                code="config-backup",
            )
        if not 60 <= self.backup_interval <= 30 * 86400:
            raise InvalidInput(f"backup_interval {self.backup_interval} s is outside 60 s-30 days", code="config-range")
        if not 1 <= self.backup_keep <= 1000:
            raise InvalidInput(f"backup_keep {self.backup_keep} is outside 1-1000", code="config-range")

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.state_dir / 'store.db'}"

    @property
    def resolved_plan_scripts_dir(self) -> Path:
        return self.plan_scripts_dir or self.state_dir / "scripts"
