"""Admin: what srctl calls. Reads are open to admin and reader, changes to admin only."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import PurePosixPath

import structlog

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc, common_pb2
from siterecovery.controller import backup, inventory_view, operators, replication, revocation
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import timestamp
from siterecovery.controller.servicers.azure_rpcs import AzureRpcs
from siterecovery.controller.servicers.diagnose_rpcs import DiagnoseRpcs
from siterecovery.controller.servicers.vcenter_rpcs import VcenterRpcs

log = structlog.get_logger(__name__)

WATCH_POLL_SECONDS = 0.2
BACKUP_CHUNK = 1024 * 1024
MAX_JOBS = 1000


class AdminServicer(VcenterRpcs, AzureRpcs, DiagnoseRpcs, admin_pb2_grpc.AdminServicer):
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
                    if request.include_removed or s.revoked_at is None
                ),
            ]
        )

    def RemoveServer(self, request, context):
        assert self._ctx.revocations is not None
        now = datetime.now(UTC)
        server = revocation.remove_server(self._ctx.store, self._ctx.revocations, request.server, now=now)
        return inventory_view.server_info(server, interval=self._ctx.settings.heartbeat_interval, now=now)

    # -- backup ------------------------------------------------------------------

    def CreateBackup(self, request, context):
        data = backup.create(self._ctx.store, self._ctx.settings.state_dir, request.passphrase)
        log.info("backup created on request", bytes=len(data))
        for start in range(0, len(data), BACKUP_CHUNK):
            yield admin_pb2.BackupChunk(data=data[start : start + BACKUP_CHUNK])

    # -- operators ---------------------------------------------------------------

    def AddOperator(self, request, context):
        role = pki.role_from_proto(request.role)
        record, cert_pem = operators.add(
            self._ctx.store, self._ctx.ca, name=request.name, role=role, csr_der=request.csr_der,
            now=datetime.now(UTC),
        )
        return admin_pb2.AddOperatorResponse(
            operator=_operator(record), cert_pem=cert_pem, ca_pem=self._ctx.ca.cert_pem, endpoint=self._ctx.endpoint,
        )

    def ListOperators(self, request, context):
        records = self._ctx.store.list_operators(include_revoked=request.include_removed)
        return admin_pb2.ListOperatorsResponse(operators=[_operator(r) for r in records])

    def RemoveOperator(self, request, context):
        assert self._ctx.revocations is not None
        return _operator(operators.remove(self._ctx.store, self._ctx.revocations, request.name, now=datetime.now(UTC)))

    def ListMachines(self, request, context):
        now = datetime.now(UTC)
        interval = self._ctx.settings.heartbeat_interval
        servers = {s.id: s for s in self._ctx.store.list_servers(role=pki.SOURCE)}
        machines = []
        for record in self._ctx.store.list_machines():
            server = servers.get(record.server_id)
            if server is not None and server.revoked_at is not None:
                continue  # its agent was removed (or its VM deleted): not a machine of this site any more
            health = (
                inventory_view.server_info(server, interval=interval, now=now).health
                if server
                else common_pb2.HEALTH_CRITICAL
            )
            machines.append(inventory_view.machine(record, health, server))
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

    # -- replication ---------------------------------------------------------------

    def _views(self, pairs) -> admin_pb2.ListPairsResponse:
        return admin_pb2.ListPairsResponse(
            pairs=replication.views(
                self._ctx.store, pairs, heartbeat_interval=self._ctx.settings.heartbeat_interval, now=datetime.now(UTC)
            )
        )

    def EnableReplication(self, request, context):
        pairs = replication.enable(self._ctx.store, request, now=datetime.now(UTC))
        for pair in pairs:
            log.info("replication enabled", pair=pair.id, machine=pair.machine_id, disk=pair.disk_name)
        return self._views(pairs)

    def ListPairs(self, request, context):
        if request.machine:
            machine = replication.resolve_machine(self._ctx.store, request.machine)
            return self._views(self._ctx.store.list_pairs(machine_id=machine.id))
        return self._views(self._ctx.store.list_pairs())

    def SetPairState(self, request, context):
        state = replication.DESIRED.get(request.desired_state)
        if state is None:
            raise errors.InvalidInput("say replicating or paused", code="pair-state-invalid")
        pair = self._ctx.store.set_pair_desired_state(request.pair_id, state, now=datetime.now(UTC))
        log.info("pair state set", pair=pair.id, desired_state=state)
        return self._views([pair]).pairs[0]

    def DisableReplication(self, request, context):
        pairs = replication.pairs_of(self._ctx.store, request.machine)
        if request.disks:
            unknown = set(request.disks) - {p.disk_name for p in pairs}
            if unknown:
                raise errors.NotFound(
                    f"no replicated disk {', '.join(sorted(unknown))}", code="pair-not-found"
                )
            pairs = [p for p in pairs if p.disk_name in request.disks]
        response = self._views(pairs)
        for pair in pairs:
            self._ctx.store.delete_pair(pair.id)
            log.info("replication disabled", pair=pair.id)
        return response

    def ListRecoveryPoints(self, request, context):
        out = admin_pb2.ListRecoveryPointsResponse()
        for pair in replication.pairs_of(self._ctx.store, request.machine, request.disk):
            for point in replication.points(self._ctx.store, pair):
                out.points.add(pair_id=pair.id, machine_id=pair.machine_id, disk_name=pair.disk_name, point=point)
        return out

    def CreateRecoveryPoint(self, request, context):
        tag_id, pairs = replication.request_point(
            self._ctx.store,
            machine=request.machine,
            group=request.group,
            kind=request.kind,
            now=datetime.now(UTC),
            heartbeat_interval=self._ctx.settings.heartbeat_interval,
        )
        log.info("recovery point requested", tag=tag_id, pairs=[p.id for p in pairs])
        return admin_pb2.CreateRecoveryPointResponse(tag_id=tag_id, pair_ids=[p.id for p in pairs])

    def MaterializePoint(self, request, context):
        pairs = replication.pairs_of(self._ctx.store, request.machine, request.disk)
        if len(pairs) > 1:
            raise errors.InvalidInput(
                "the machine has several replicated disks; say which one with --disk",
                hint="disks: " + ", ".join(p.disk_name for p in pairs),
                code="disk-ambiguous",
            )
        pair = pairs[0]
        chosen = replication.choose_point(replication.points(self._ctx.store, pair), request.point)
        output_path = request.output_path
        if chosen is not None and not output_path:
            target = PurePosixPath(pair.target_path)
            output_path = str(target.with_name(f"{target.stem}.{chosen.tag_id}{target.suffix}"))
        assert self._ctx.agent_client_credentials is not None
        result = replication.materialize_on_target(
            self._ctx.store,
            self._ctx.agent_client_credentials,
            pair,
            point=chosen.tag_id if chosen is not None else "latest",
            output_path=output_path,
        )
        log.info("point materialised", pair=pair.id, tag=result.tag_id, path=result.path, copied=result.copied)
        return admin_pb2.MaterializePointResponse(pair_id=pair.id, master_target_id=pair.master_target_id, result=result)

    def OpenPointView(self, request, context):
        pair = self._one_pair(request.machine, request.disk)
        chosen = replication.choose_point(replication.points(self._ctx.store, pair), request.point)
        assert self._ctx.agent_client_credentials is not None
        view = replication.open_view_on_target(
            self._ctx.store, self._ctx.agent_client_credentials, pair,
            point=chosen.tag_id if chosen is not None else "latest",
        )
        log.info("point view opened", pair=pair.id, tag=view.tag_id, view=view.view_id, uri=view.nbd_uri)
        return admin_pb2.OpenPointViewResponse(pair_id=pair.id, master_target_id=pair.master_target_id, view=view)

    def ClosePointView(self, request, context):
        pair = self._one_pair(request.machine, request.disk)
        assert self._ctx.agent_client_credentials is not None
        reply = replication.close_view_on_target(
            self._ctx.store, self._ctx.agent_client_credentials, pair, view_id=request.view_id
        )
        log.info("point views closed", pair=pair.id, views=list(reply.closed_view_ids))
        return admin_pb2.ClosePointViewResponse(pair_id=pair.id, closed_view_ids=reply.closed_view_ids)

    def _one_pair(self, machine: str, disk: str):
        pairs = replication.pairs_of(self._ctx.store, machine, disk)
        if len(pairs) > 1:
            raise errors.InvalidInput(
                "the machine has several replicated disks; say which one with --disk",
                hint="disks: " + ", ".join(p.disk_name for p in pairs),
                code="disk-ambiguous",
            )
        return pairs[0]

    def _passphrase(self) -> admin_pb2.Passphrase:
        return admin_pb2.Passphrase(
            passphrase=self._ctx.vault.current(), created_at=timestamp(self._ctx.vault.created_at)
        )


def _job_id(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c == "-" for c in text):
        raise errors.InvalidInput(f"{text!r} is not a job id", hint="see `srctl jobs list`", code="bad-job-id")
    return text


def _operator(record) -> admin_pb2.Operator:
    return admin_pb2.Operator(
        name=record.name,
        role=pki.role_to_proto(record.role),
        identity_id=record.identity_id,
        issued_at=timestamp(record.issued_at),
        expires_at=timestamp(record.expires_at),
        revoked_at=timestamp(record.revoked_at),
    )
