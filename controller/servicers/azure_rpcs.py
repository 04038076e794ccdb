"""Admin RPCs about Azure sites: thin, the rules are in controller/azure_sites.py.

Mixed into AdminServicer, so the Admin service keeps one servicer class. The
client secret arrives in a request and goes straight into `ClientSecret`
(which never shows in a repr or a log); no response carries it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from siterecovery.common import errors
from siterecovery.common.azure.site import AzureSite, ClientSecret
from siterecovery.common.pb import admin_pb2
from siterecovery.controller import azure_sites, inventory_view
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import timestamp
from siterecovery.controller.providers.azure.compute import ImageRef
from siterecovery.controller.providers.azure.steps import DEPLOY_PROCESS_SERVER
from siterecovery.controller.store.base import AzureSiteRecord

log = structlog.get_logger(__name__)

_SETTINGS = tuple(AzureSite.__dataclass_fields__)


def azure_site_message(record: AzureSiteRecord) -> admin_pb2.AzureSite:
    return admin_pb2.AzureSite(
        id=record.id,
        name=record.name,
        settings=admin_pb2.AzureSiteSettings(**{k: record.settings.get(k, "") for k in _SETTINGS}),
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
    )


def _site(settings: admin_pb2.AzureSiteSettings) -> AzureSite:
    values = {k: getattr(settings, k) for k in _SETTINGS}
    values["container"] = values["container"] or AzureSite.container
    return AzureSite(**values)


class AzureRpcs:
    _ctx: ControllerContext

    def _box(self):
        if self._ctx.secrets is None:
            raise errors.Unavailable("this server is not set up for Azure sites", code="azure-disabled")
        return self._ctx.secrets

    def AddAzureSite(self, request, context):
        structlog.contextvars.bind_contextvars(azure_site=request.name)
        record = azure_sites.add(
            self._ctx.store,
            self._box(),
            request.name,
            _site(request.settings),
            ClientSecret(request.client_secret),
            now=datetime.now(UTC),
        )
        return azure_site_message(record)

    def ListAzureSites(self, request, context):
        return admin_pb2.ListAzureSitesResponse(
            sites=[azure_site_message(s) for s in self._ctx.store.list_azure_sites()]
        )

    def UpdateAzureSiteCredentials(self, request, context):
        structlog.contextvars.bind_contextvars(azure_site=request.name)
        record = azure_sites.update_credentials(
            self._ctx.store,
            self._box(),
            request.name,
            request.client_id,
            ClientSecret(request.client_secret),
            now=datetime.now(UTC),
        )
        return azure_site_message(record)

    def RemoveAzureSite(self, request, context):
        structlog.contextvars.bind_contextvars(azure_site=request.name)
        azure_sites.remove(self._ctx.store, request.name)
        return admin_pb2.RemoveAzureSiteResponse()

    def DeployAzureProcessServer(self, request, context):
        structlog.contextvars.bind_contextvars(azure_site=request.site, vm=request.name)
        kind = self._ctx.azure_jobs.get(DEPLOY_PROCESS_SERVER)
        if kind is None:
            raise errors.Unavailable("this server does not run Azure jobs", code="azure-disabled")
        image = azure_sites.DEFAULT_PROCESS_SERVER_IMAGE
        if request.HasField("image"):
            image = ImageRef(
                request.image.publisher, request.image.offer, request.image.sku, request.image.version or "latest"
            )
        deployment = azure_sites.ProcessServerDeployment(
            site=request.site,
            name=request.name,
            subnet=request.subnet,
            private_ip=request.private_ip,
            ssh_public_key=request.ssh_public_key,
            config_server=request.config_server or self._ctx.endpoint,
            size=request.size or azure_sites.DEFAULT_PROCESS_SERVER_SIZE,
            image=image,
            admin_username=request.admin_username or "sradmin",
            install_command=request.install_command or azure_sites.DEFAULT_INSTALL_COMMAND,
        )
        job = azure_sites.deploy_process_server(self._ctx.store, kind, deployment, now=datetime.now(UTC))
        return inventory_view.job(job)
