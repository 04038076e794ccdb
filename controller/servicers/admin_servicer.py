"""Admin: what srctl calls. Reads are open to admin and reader, changes to admin only."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import structlog

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc, common_pb2
from siterecovery.controller import inventory_view
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import timestamp

log = structlog.get_logger(__name__)

WATCH_POLL_SECONDS = 0.2
MAX_JOBS = 1000


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, ctx: ControllerContext, stop: threading.Event) -> None:
        self._ctx = ctx
        self._stop = stop

    def ListServers(self, request, context):
        now = datetime.now(UTC)
        interval = self._ctx.settings.heartbeat_interval
        return admin_pb2.ListServersResponse(
            servers=[
                inventory_view.config_server_info(self._ctx.settings, self._ctx.endpoint, now=now),
                *(
                    inventory_view.server_info(s, interval=interval, now=now)
                    for s in self._ctx.store.list_servers()
                ),
            ]
        )

    def ListMachines(self, request, context):
        now = datetime.now(UTC)
        interval = self._ctx.settings.heartbeat_interval
        servers = {s.id: s for s in self._ctx.store.list_servers(role=pki.SOURCE)}
        machines = []
        for record in self._ctx.store.list_machines():
            server = servers.get(record.server_id)
            health = (
                inventory_view.server_info(server, interval=interval, now=now).health
                if server
                else common_pb2.HEALTH_CRITICAL
            )
            machines.append(inventory_view.machine(record, health))
        return admin_pb2.ListMachinesResponse(machines=machines)

    def ListJobs(self, request, context):
        statuses = [inventory_view.JOB_STATUS_NAMES[s] for s in request.statuses if s in inventory_view.JOB_STATUS_NAMES]
        limit = min(request.limit or 100, MAX_JOBS)
        jobs = self._ctx.store.list_jobs(statuses=statuses or None, limit=limit)
        return admin_pb2.ListJobsResponse(jobs=[inventory_view.job(j) for j in jobs])

    def GetJob(self, request, context):
        return inventory_view.job(self._ctx.store.get_job(_job_id(request.id)))

    def WatchJob(self, request, context):
        job_id = _job_id(request.id)
        version = -1
        while context.is_active() and not self._stop.is_set():
            record = self._ctx.store.get_job(job_id)
            if record.version != version:
                version = record.version
                yield inventory_view.job(record)
            if record.status in inventory_view.FINISHED:
                return
            self._stop.wait(WATCH_POLL_SECONDS)

    def GetPassphrase(self, request, context):
        return self._passphrase()

    def RotatePassphrase(self, request, context):
        self._ctx.vault.rotate()
        log.info("passphrase rotated")
        return self._passphrase()

    def _passphrase(self) -> admin_pb2.Passphrase:
        return admin_pb2.Passphrase(
            passphrase=self._ctx.vault.current(), created_at=timestamp(self._ctx.vault.created_at)
        )


def _job_id(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c == "-" for c in text):
        raise errors.InvalidInput(f"{text!r} is not a job id", hint="see `srctl jobs list`", code="bad-job-id")
    return text
