"""Admin.Diagnose: what `srctl doctor` asks the configuration server. Thin: the checks are in
controller/diagnostics.py and controller/protection/prerequisites.py."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509

from siterecovery.common.inventory import directory_facts
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.controller import diagnostics
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import timestamp, to_dict
from siterecovery.controller.protection import prerequisites

STATUS = {
    "ok": admin_pb2.CHECK_STATUS_OK,
    "warning": admin_pb2.CHECK_STATUS_WARNING,
    "failed": admin_pb2.CHECK_STATUS_FAILED,
    "skipped": admin_pb2.CHECK_STATUS_SKIPPED,
}


class DiagnoseRpcs:
    _ctx: ControllerContext

    def Diagnose(self, request: admin_pb2.DiagnoseRequest, context) -> admin_pb2.DiagnoseResponse:
        now = datetime.now(UTC)
        prerequisites.check_request(request)
        settings = self._ctx.settings
        state = to_dict(directory_facts(common_pb2.DIRECTORY_KIND_STATE, settings.state_dir, used_by_agent=0))
        checks = diagnostics.server_checks(
            self._ctx.store.list_servers(), interval=settings.heartbeat_interval, now=now, state_dir_facts=state,
            server_cert_expires=x509.load_pem_x509_certificate(self._ctx.server_cert_pem).not_valid_after_utc,
            expected_silent=prerequisites.expected_silent(self._ctx.store),
        )
        if request.machine:
            checks += prerequisites.failback_checks(self._ctx.store, self._ctx.protection, request)
        return admin_pb2.DiagnoseResponse(
            server_time=timestamp(now),
            checks=[
                admin_pb2.Check(name=c.name, status=STATUS[c.status], message=c.message, hint=c.hint, code=c.code,
                                subject=c.subject)
                for c in checks
            ],
        )
