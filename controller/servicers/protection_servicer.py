"""Protection: groups, protected machines, recovery plans and their workflows. Thin: the
rules are in controller/protection/."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from siterecovery.common import errors
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.common.pb import protection_pb2_grpc
from siterecovery.controller import inventory_view
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.jobs import states
from siterecovery.controller.protection import service

log = structlog.get_logger(__name__)


class ProtectionServicer(protection_pb2_grpc.ProtectionServicer):
    def __init__(self, ctx: ControllerContext) -> None:
        self._ctx = ctx

    @property
    def _store(self):
        return self._ctx.store

    def CreateProtectionGroup(self, request, context):
        policy = request.policy if request.HasField("policy") else None
        group = service.create_group(self._store, request.name, policy, now=datetime.now(UTC))
        log.info("protection group created", group=group.name)
        return service.group_message(self._store, group)

    def ListProtectionGroups(self, request, context):
        return ppb.ListProtectionGroupsResponse(
            groups=[service.group_message(self._store, g) for g in self._store.list_protection_groups()]
        )

    def RemoveProtectionGroup(self, request, context):
        self._store.remove_protection_groups(request.name)
        log.info("protection group removed", group=request.name)
        return ppb.RemoveProtectionGroupResponse()

    def ProtectMachine(self, request, context):
        job = service.protect(
            self._store, self._ctx.protection, self._ctx.protection_jobs["protect"], request, now=datetime.now(UTC)
        )
        log.info("protection started", machine=request.machine, job=job.id)
        return inventory_view.job(job)

    def StartWorkflow(self, request, context):
        job = service.start_workflow(self._store, self._ctx.protection, self._ctx.protection_jobs, request, now=datetime.now(UTC))
        log.info("workflow started", machine=request.machine, kind=job.kind, job=job.id)
        return inventory_view.job(job)

    def ListProtectedMachines(self, request, context):
        now = datetime.now(UTC)
        return ppb.ListProtectedMachinesResponse(
            machines=[
                service.item_message(self._store, i, heartbeat_interval=self._ctx.settings.heartbeat_interval, now=now)
                for i in self._store.list_protected_items()
            ]
        )

    def GetProtectedMachine(self, request, context):
        item = service.find_item(self._store, request.machine)
        return service.item_message(
            self._store, item, heartbeat_interval=self._ctx.settings.heartbeat_interval, now=datetime.now(UTC)
        )

    def SaveRecoveryPlan(self, request, context):
        plan = service.save_plan(self._store, request, now=datetime.now(UTC))
        log.info("recovery plan saved", plan=plan.name, version=plan.version)
        return service.plan_message(self._store, plan)

    def ListRecoveryPlans(self, request, context):
        return ppb.ListRecoveryPlansResponse(
            plans=[service.plan_message(self._store, p) for p in self._store.list_recovery_plans()]
        )

    def RemoveRecoveryPlan(self, request, context):
        self._store.remove_recovery_plan(request.name)
        return ppb.RemoveRecoveryPlanResponse()

    def StartPlanWorkflow(self, request, context):
        job = service.start_plan_workflow(self._store, self._ctx.protection, self._ctx.protection_jobs, request, now=datetime.now(UTC))
        log.info("plan workflow started", plan=request.plan, kind=job.kind, job=job.id)
        return inventory_view.job(job)

    def ResumeJob(self, request, context):
        job = self._store.get_job(request.id)
        if job.status not in states.ACTIVE_JOB_STATUSES:
            raise errors.PreconditionFailed(f"job {job.id} is {job.status}", code="job-finished")
        self._store.signal_job(job.id, "resume", now=datetime.now(UTC))
        log.info("job resumed by an operator", job=job.id)
        return inventory_view.job(self._store.get_job(job.id))
