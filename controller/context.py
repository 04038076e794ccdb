"""What the configuration server's servicers share: store, CA, passphrase, settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from siterecovery.common.pki import CertificateAuthority
from siterecovery.controller.assignments import Assignments
from siterecovery.controller.enrollment import FailureLimiter, NonceRegistry, PassphraseVault
from siterecovery.controller.heartbeats import HeartbeatWriter
from siterecovery.controller.jobs.engine import JobKind
from siterecovery.controller.network_orders import NetworkOrderHooks, cached_hooks
from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.revocation import Revocations
from siterecovery.controller.secrets import SecretBox
from siterecovery.controller.settings import ConfigServerSettings
from siterecovery.controller.store.base import Store


@dataclass
class ControllerContext:
    settings: ConfigServerSettings
    store: Store
    ca: CertificateAuthority
    vault: PassphraseVault
    limiter: FailureLimiter
    server_cert_pem: bytes
    # host:port where this server is reached (as written into srctl.toml).
    endpoint: str = ""
    # Started for every server the first time it registers.
    registration_job: JobKind | None = None
    # The client certificate (role admin) this server dials agents' data ports with.
    agent_client_credentials: grpc.ChannelCredentials | None = None
    # Revoked identities, refused on every RPC (set up by the daemon).
    revocations: Revocations | None = None
    # Encrypts the vCenter passwords kept in the store.
    secrets: SecretBox | None = None
    # Discovery of a vCenter / ESXi endpoint (controller/vcenters.py).
    discovery_job: JobKind | None = None
    # Nonces of accepted enrollments, in the store: a replayed request is refused (default: on `store`).
    nonces: NonceRegistry | None = None
    # The Azure job kinds by name (controller/azure_sites.py), as the runner has them.
    azure_jobs: dict[str, JobKind] = field(default_factory=dict)
    # The protection workflows (controller/protection/) and what they need.
    protection: Environment | None = None
    protection_jobs: dict[str, JobKind] = field(default_factory=dict)
    # Pending network orders per agent and where their results go (controller/network_orders.py).
    network_orders: NetworkOrderHooks = field(default_factory=cached_hooks)
    # Writes agents' heartbeats to the store in groups (default: on `store`).
    heartbeats: HeartbeatWriter | None = None
    # The pairs and tag requests heartbeat answers carry, read when they change (default: on `store`).
    assignments: Assignments | None = None

    def __post_init__(self) -> None:
        if self.nonces is None:
            self.nonces = NonceRegistry(self.store)
        if self.heartbeats is None:
            self.heartbeats = HeartbeatWriter(self.store)
        if self.assignments is None:
            self.assignments = Assignments(self.store)

    def revoked_ids(self) -> list[str]:
        return self.revocations.sorted_ids() if self.revocations is not None else []
