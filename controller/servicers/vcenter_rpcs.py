"""Admin RPCs about vCenter / ESXi endpoints: thin, the rules are in controller/vcenters.py.

Mixed into AdminServicer, so the Admin service keeps one servicer class.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import structlog

from siterecovery.common import errors
from siterecovery.common.pb import admin_pb2
from siterecovery.controller import inventory_view, vcenters
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import timestamp
from siterecovery.controller.providers.vsphere.session import Trust
from siterecovery.controller.store.base import VcenterRecord

log = structlog.get_logger(__name__)


def vcenter_message(record: VcenterRecord) -> admin_pb2.Vcenter:
    message = admin_pb2.Vcenter(
        id=record.id,
        name=record.name,
        host=record.host,
        port=record.port,
        username=record.username,
        trust=vcenters.trust_of(record).describe(),
        created_at=timestamp(record.created_at),
        discovery_status=record.discovery_status,
        discovery_error=record.discovery_error,
    )
    if record.discovered_at is not None:
        message.discovered_at.CopyFrom(timestamp(record.discovered_at))
    return message


class VcenterRpcs:
    _ctx: ControllerContext

    def _vcenter_deps(self):
        if self._ctx.secrets is None or self._ctx.discovery_job is None:
            raise errors.Unavailable(
                "this server is not set up for vCenter endpoints", code="vcenter-disabled"
            )
        return self._ctx.secrets, self._ctx.discovery_job

    def AddVcenter(self, request, context):
        box, kind = self._vcenter_deps()
        structlog.contextvars.bind_contextvars(vcenter=request.name)
        trust = Trust(
            ca_pem=request.trust.ca_pem, thumbprint=request.trust.thumbprint, insecure=request.trust.insecure
        )
        new = vcenters.NewEndpoint(
            name=request.name,
            host=request.host,
            port=request.port or 443,
            username=request.username,
            password=request.password,
            trust=trust,
        )
        record, job = vcenters.add(self._ctx.store, box, new, kind, now=datetime.now(UTC))
        return admin_pb2.AddVcenterResponse(
            vcenter=vcenter_message(record), discovery=inventory_view.job(job)
        )

    def ListVcenters(self, request, context):
        return admin_pb2.ListVcentersResponse(
            vcenters=[vcenter_message(v) for v in self._ctx.store.list_vcenters()]
        )

    def UpdateVcenterCredentials(self, request, context):
        box, _ = self._vcenter_deps()
        structlog.contextvars.bind_contextvars(vcenter=request.name)
        record = vcenters.update_credentials(
            self._ctx.store, box, request.name, request.username, request.password, now=datetime.now(UTC)
        )
        return vcenter_message(record)

    def RemoveVcenter(self, request, context):
        record = self._ctx.store.get_vcenter(request.name)
        self._ctx.store.remove_vcenter(record.id)
        log.info("vcenter removed", vcenter=record.name)
        return admin_pb2.RemoveVcenterResponse()

    def DiscoverVcenter(self, request, context):
        _, kind = self._vcenter_deps()
        job = vcenters.request_discovery(self._ctx.store, request.name, kind, now=datetime.now(UTC))
        return inventory_view.job(job)

    def GetVcenterInventory(self, request, context):
        record = self._ctx.store.get_vcenter(request.name)
        inventory = self._ctx.store.get_vcenter_inventory(record.id)
        return admin_pb2.VcenterInventory(
            vcenter=vcenter_message(record),
            discovered_at=timestamp(inventory.discovered_at),
            document_json=json.dumps(inventory.document, sort_keys=True),
        )
