"""What the protection workflows need from the configuration server, in one object.

Built once by the daemon and handed to the job kinds; tests build their own.
Nothing here is a global: the sites, the credentials and the clock arrive here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from siterecovery.common import errors
from siterecovery.controller.providers.local.site import AgentLaunch, LocalSite
from siterecovery.controller.store.base import VcenterRecord

if TYPE_CHECKING:  # pyVmomi takes ~0.3 s to import; srctl imports this module for every command
    from siterecovery.controller.providers.vsphere.session import Session


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LocalSites:
    """The `local` provider's two sites under one directory (the lab)."""

    root: Path

    @property
    def onprem(self) -> LocalSite:
        return LocalSite(self.root / "onprem", role="on-premises")

    @property
    def cloud(self) -> LocalSite:
        return LocalSite(self.root / "cloud", role="cloud")


@dataclass
class Environment:
    # The controller's client certificate: it dials master targets (materialise).
    credentials: grpc.ChannelCredentials | None
    heartbeat_interval: float
    scripts_dir: Path
    local: LocalSites | None = None
    # What a VM's agent needs to enrol (the passphrase is read when it is needed).
    agent_launch: Callable[[], AgentLaunch] | None = None
    clock: Callable[[], datetime] = field(default=utcnow)
    # How long a failover waits for its final point before it goes on without one.
    final_point_timeout: float = 300.0
    # Opens a session to a stored vCenter / ESXi endpoint (vSphere provider); None: none here.
    vsphere_session: Callable[[VcenterRecord], Session] | None = None
    # Clients for stored Azure sites (azure_sites.SiteClients); None: no Azure here.
    azure: Any = None

    def local_sites(self) -> LocalSites:
        if self.local is None:
            raise errors.PreconditionFailed(
                "this configuration server has no local provider",
                hint="set local_site_dir in its settings (the lab does), or protect to Azure",
                code="provider-missing",
            )
        return self.local

    def launch(self) -> AgentLaunch:
        if self.agent_launch is None:
            raise errors.PreconditionFailed("this server cannot start agents", code="provider-missing")
        return self.agent_launch()

    def master_target_credentials(self) -> grpc.ChannelCredentials:
        if self.credentials is None:
            raise errors.PreconditionFailed("this server has no client certificate for agents", code="no-credentials")
        return self.credentials
