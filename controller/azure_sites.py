"""Azure sites: registering them, their credential, and the clients Azure jobs get.

- `add` checks the settings (`AzureSite` validates GUIDs, region, names) and
  stores the site with its service principal's secret encrypted by
  `secrets.SecretBox`, bound to the row (the site id is the AEAD context). It
  does not contact Azure: a wrong secret shows at the first job step, as an
  authentication error naming `srctl azure update-credentials`.
- `update_credentials` replaces the client id and the secret.
- `remove` refuses while an active Azure job names the site (`azure-site-in-use`).
- `kinds(box, vault, connector)` are the Azure job kinds for the configuration
  server's JobRunner. Every Azure job carries `params["site_id"]`; at each step
  `compute_factory` reads that site from the store, decrypts its secret and
  builds an `AzureCompute` through an `AzureConnector`. Nothing about the
  credential is kept between steps, so `update-credentials` takes effect at
  the next step, on any replica.
- `deploy_process_server` starts an `azure-deploy-process-server` job. The
  enrollment passphrase is not in its params: `custom_data_factory` reads it
  from the configuration server's vault when the create-vm step runs.

The secret is never logged, never returned by an RPC and never put in params.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from siterecovery.common import errors
from siterecovery.common.azure.clients import container_client
from siterecovery.common.azure.site import AzureSite, ClientSecret, make_credential
from siterecovery.common.logging import get_logger
from siterecovery.controller.enrollment import PassphraseVault
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import JobKind, StepContext, create_job
from siterecovery.controller.providers.azure import steps
from siterecovery.controller.providers.azure.compute import AzureCompute, ImageRef
from siterecovery.controller.secrets import SecretBox
from siterecovery.controller.store.base import AzureSiteRecord, JobRecord, Store

log = get_logger(__name__)

# Every job kind whose params name a site (`site_id`): a site they use is not removed.
KINDS = frozenset({steps.DEPLOY_PROCESS_SERVER})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Azure VM names: 1-64 letters, digits, '-' (Linux VMs may use '.' and '_'; we keep it portable).
_VM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?")
_VM_SIZE = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,63}")
_ADMIN_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

DEFAULT_PROCESS_SERVER_SIZE = "Standard_D4s_v3"
# Ubuntu 24.04 LTS (Gen2): its Python 3.12 meets requires-python (>= 3.11); 22.04's 3.10 did not.
DEFAULT_PROCESS_SERVER_IMAGE = ImageRef("Canonical", "ubuntu-24_04-lts", "server")
DEFAULT_INSTALL_COMMAND = (
    f"apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv {steps.INSTALL_DIR} "
    f"&& {steps.INSTALL_DIR}/bin/pip install siterecovery"
)


# --- sites ------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise errors.InvalidInput(
            f"{name!r} is not a usable site name",
            hint="use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="azure-site-name-invalid",
        )


def site_of(record: AzureSiteRecord) -> AzureSite:
    return AzureSite(**record.settings)


def secret_of(record: AzureSiteRecord, box: SecretBox) -> ClientSecret:
    return ClientSecret(box.decrypt(record.secret, context=record.id))


def add(store: Store, box: SecretBox, name: str, site: AzureSite, secret: ClientSecret, *, now: datetime) -> AzureSiteRecord:
    """Store a new site; Conflict when the name is taken (nothing changes)."""
    _check_name(name)
    sid = uuid.uuid4().hex
    record = store.add_azure_site(
        AzureSiteRecord(
            id=sid,
            name=name,
            settings=site.to_dict(),
            secret=box.encrypt(secret.reveal(), context=sid),
            created_at=now,
            updated_at=now,
        )
    )
    log.info("azure site added", azure_site=name, subscription=site.subscription_id, region=site.region)
    return record


def update_credentials(
    store: Store, box: SecretBox, name: str, client_id: str, secret: ClientSecret, *, now: datetime
) -> AzureSiteRecord:
    """Replace the service principal (client id, may stay the same) and its secret."""
    record = store.get_azure_site(name)
    site = replace(site_of(record), client_id=client_id or site_of(record).client_id)  # validates the GUID
    updated = store.update_azure_site_credentials(
        record.id, client_id=site.client_id, secret=box.encrypt(secret.reveal(), context=record.id), now=now
    )
    log.info("azure site credentials updated", azure_site=record.name)
    return updated


def remove(store: Store, name: str) -> AzureSiteRecord:
    record = store.get_azure_site(name)
    # A protected machine keeps naming its site after its pairs are gone (a failed-over VM,
    # the replica blobs a reprotect writes again): removing the site would strand them.
    using = [i.name for i in store.list_protected_items() if i.details.get("forward", {}).get("azure_site") == record.id]
    if using:
        raise errors.Conflict(
            f"Azure site {record.name!r} is the cloud of protected machine(s) {', '.join(sorted(using)[:5])}",
            hint="a site stays while it is the cloud of a protected machine (`srctl machine list` shows them)",
            code="azure-site-in-use",
        )
    store.remove_azure_site(record.id, unless_used_by_kinds=KINDS)
    log.info("azure site removed", azure_site=record.name)
    return record


# --- clients for job steps -------------------------------------------------------------


@dataclass(frozen=True)
class AzureConnector:
    """How the configuration server builds Azure clients for a job step.

    The defaults are production: azure-identity's ClientSecretCredential and
    the SDK's own HTTP transport. Tests pass an azure-core `transport` (e.g.
    tests/azure_replay.py), a `credential` factory that needs no sign-in,
    `polling_interval=0` and a `sleep` that records; `daemon.run(..., azure=…)`
    takes one, which is the only way to set it (no global, no setting).
    """

    transport: Any = None
    credential: Callable[[AzureSite, ClientSecret], Any] = make_credential
    polling_interval: float | None = None
    sleep: Callable[[float], None] | None = None
    # The credential for the site's blob container (failover point copies); None: `credential`
    # (the service principal needs a data role on the account, e.g. Storage Blob
    # Data Contributor). Tests against Azurite pass its shared key.
    storage_credential: Callable[[AzureSite, ClientSecret], Any] | None = None

    def storage(self, site: AzureSite, secret: ClientSecret) -> Any:
        """The site's blob container (where the replica page blobs and failover copies live)."""
        credential = (self.storage_credential or self.credential)(site, secret)
        return container_client(site, credential)

    def compute(self, site: AzureSite, secret: ClientSecret) -> AzureCompute:
        return AzureCompute.connect(
            site,
            self.credential(site, secret),
            transport=self.transport,
            polling_interval=self.polling_interval,
            sleep=self.sleep,
        )


@dataclass(frozen=True)
class SiteClients:
    """Clients for a stored site, its secret decrypted at each call (the protection workflows' way in)."""

    box: SecretBox
    connector: AzureConnector

    def compute(self, record: AzureSiteRecord, *, subnet: str = "") -> AzureCompute:
        site = site_of(record)
        if subnet:  # (the test subnet, or another of the network: no second one to keep apart from it)
            site = replace(site, subnet=subnet, test_subnet="")
        return self.connector.compute(site, secret_of(record, self.box))

    def container(self, record: AzureSiteRecord) -> Any:
        return self.connector.storage(site_of(record), secret_of(record, self.box))


def _site_for(ctx: StepContext) -> AzureSiteRecord:
    site_id = ctx.params.get("site_id")
    if not site_id:
        raise errors.InvalidInput(f"job {ctx.job.id} names no Azure site", code="azure-site-missing")
    return ctx.store.get_azure_site(site_id)


def compute_factory(box: SecretBox, connector: AzureConnector) -> steps.ComputeFactory:
    """`compute_for(ctx)`: the site of `params["site_id"]`, read and decrypted at step time.

    `params["subnet"]`, when set, replaces the site's subnet (a process server
    may live in another subnet of the same virtual network).
    """

    def compute_for(ctx: StepContext) -> AzureCompute:
        record = _site_for(ctx)
        site = site_of(record)
        if ctx.params.get("subnet"):
            site = replace(site, subnet=ctx.params["subnet"], test_subnet="")
        return connector.compute(site, secret_of(record, box))

    return compute_for


def custom_data_factory(vault: PassphraseVault) -> steps.CustomDataFactory:
    """cloud-init for a process server, with the vault's passphrase as it is when the step runs."""

    def custom_data_for(ctx: StepContext) -> bytes:
        return steps.process_server_cloud_init(
            config_server=ctx.params["config_server"],
            passphrase=vault.current(),
            install_command=ctx.params.get("install_command") or DEFAULT_INSTALL_COMMAND,
        )

    return custom_data_for


def kinds(box: SecretBox, vault: PassphraseVault, connector: AzureConnector | None = None) -> list[JobKind]:
    """The Azure job kinds, wired to the store's sites and the vault."""
    connector = connector or AzureConnector()
    return steps.kinds(compute_factory(box, connector), custom_data_factory(vault))


# --- process server deployment ---------------------------------------------------------


@dataclass(frozen=True)
class ProcessServerDeployment:
    site: str  # name or id
    name: str
    subnet: str
    private_ip: str
    ssh_public_key: str
    config_server: str
    size: str = DEFAULT_PROCESS_SERVER_SIZE
    image: ImageRef = DEFAULT_PROCESS_SERVER_IMAGE
    admin_username: str = "sradmin"
    install_command: str = DEFAULT_INSTALL_COMMAND


def _invalid(message: str, hint: str = "") -> errors.InvalidInput:
    return errors.InvalidInput(message, hint=hint, code="azure-deploy-invalid")


def deploy_process_server(
    store: Store, kind: JobKind, request: ProcessServerDeployment, *, now: datetime
) -> JobRecord:
    """Check the request and start the job; nothing is created in Azure before the job runs."""
    record = store.get_azure_site(request.site)
    replace(site_of(record), subnet=request.subnet)  # validates the subnet name
    if not _VM_NAME.fullmatch(request.name or ""):
        raise _invalid(f"{request.name!r} is not a usable VM name", "use 1-64 letters, digits and '-'")
    try:
        ip = ipaddress.IPv4Address(request.private_ip)
    except ValueError:
        raise _invalid(f"{request.private_ip!r} is not an IPv4 address", "give a free address of the subnet") from None
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        raise _invalid(f"{ip} cannot be a VM's private address", "give a free address of the subnet")
    if not _VM_SIZE.fullmatch(request.size):
        raise _invalid(f"{request.size!r} is not a VM size", "for example Standard_D4s_v3")
    if not _ADMIN_USER.fullmatch(request.admin_username):
        raise _invalid(f"{request.admin_username!r} is not a usable admin user name")
    key = request.ssh_public_key.strip()
    if "\n" in key or not key.startswith(("ssh-", "ecdsa-")):
        raise _invalid("the SSH public key is not one OpenSSH public key line", "give the .pub file")
    if not request.config_server or "\n" in request.config_server or any(c.isspace() for c in request.config_server):
        raise _invalid(f"{request.config_server!r} is not an address the process server can reach")
    for job in store.list_jobs(statuses=states.ACTIVE_JOB_STATUSES, limit=500):
        if job.kind in KINDS and job.params.get("site_id") == record.id and job.params.get("vm", {}).get("name") == request.name:
            raise errors.Conflict(
                f"job {job.id} is already working on VM {request.name} in site {record.name}",
                hint=f"follow it with `srctl jobs watch {job.id}`",
                code="azure-deploy-running",
            )
    params = {
        "site_id": record.id,
        "subnet": request.subnet,
        "nic": {"name": f"{request.name}-nic0", "private_ip": str(ip)},
        "vm": {
            "name": request.name,
            "size": request.size,
            "image": {
                "publisher": request.image.publisher,
                "offer": request.image.offer,
                "sku": request.image.sku,
                "version": request.image.version,
            },
            "admin_username": request.admin_username,
            "ssh_public_key": key,
            "tags": {"sr-role": "process-server"},
        },
        "config_server": request.config_server,
        "install_command": request.install_command,
    }
    job = create_job(store, kind, target=f"process server {request.name} in Azure site {record.name}", params=params, now=now)
    log.info("process server deployment started", azure_site=record.name, vm=request.name, job=job.id)
    return job
