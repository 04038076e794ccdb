"""AgentControl: Register and Heartbeat from enrolled agents."""

from __future__ import annotations

import asyncio
import contextvars
from datetime import UTC, datetime

import grpc
import structlog

from siterecovery.common import pki
from siterecovery.common.grpcserver import caller
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc
from siterecovery.controller import agents, network_orders, replication
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import problem_to_dict, to_dict
from siterecovery.controller.store.base import ChangeCounters

log = structlog.get_logger(__name__)


class AgentControlServicer(agent_pb2_grpc.AgentControlServicer):
    def __init__(self, ctx: ControllerContext) -> None:
        self._ctx = ctx

    def Register(self, request: agent_pb2.RegisterRequest, context: grpc.ServicerContext):
        inventory = to_dict(request.inventory)
        # The server's to say, from the certificate the agent connected with (srctl doctor warns before it expires).
        inventory.pop("certificate_expires_at", None)
        expires = _certificate_expiry(context)
        if expires:
            inventory["certificate_expires_at"] = expires
        server = agents.register(
            self._ctx.store,
            caller(),
            inventory,
            now=datetime.now(UTC),
            first_registration_job=self._ctx.registration_job,
        )
        log.info("agent registered", hostname=server.hostname)
        return agent_pb2.RegisterResponse(
            server_id=server.id,
            heartbeat_interval_seconds=self._ctx.settings.heartbeat_interval,
            pairs=replication.assignments_for(self._ctx.store, server.id),
            revoked_ids=self._ctx.revoked_ids(),
        )

    async def Heartbeat(self, request: agent_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext):
        """A coroutine on the configuration server's event loop (common/grpcserver.py): the
        write waits in a group without a thread; the answer is built on the loop when it
        comes from what is in memory, else on a thread (a pair report or order result to
        write, or a copy to read again)."""
        identity, now = caller(), datetime.now(UTC)
        network_orders.check_results(request.network_results)  # before anything is written
        counters = await agents.heartbeat_async(
            self._ctx.store,
            identity,
            problems=[problem_to_dict(p) for p in request.problems],
            directories=[to_dict(d) for d in request.directories] or None,
            now=now,
            writer=self._ctx.heartbeats,
        )
        if request.pairs or request.network_results or not self._answers_now(identity.id, counters):
            return await asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, self._answer, request, identity, counters, now
            )
        return self._answer(request, identity, counters, now)

    def _answers_now(self, server_id: str, counters: ChangeCounters) -> bool:
        revocations = self._ctx.revocations
        return (
            self._ctx.assignments.answers_now(server_id, counters)
            and self._ctx.network_orders.answers_now(self._ctx.store)
            and (revocations is None or revocations.answers_now())
        )

    def _answer(self, request: agent_pb2.HeartbeatRequest, identity: pki.Identity, counters: ChangeCounters,
                now: datetime) -> agent_pb2.HeartbeatResponse:
        replication.record_reports(self._ctx.store, identity, request.pairs, now=now)
        hooks = self._ctx.network_orders
        if request.network_results:
            hooks.record_results(self._ctx.store, identity, request.network_results, now=now)
        pairs, tag_requests = self._ctx.assignments.orders_for(identity.id, counters, now=now)
        return agent_pb2.HeartbeatResponse(
            heartbeat_interval_seconds=self._ctx.settings.heartbeat_interval,
            pairs=pairs,
            tag_requests=tag_requests,
            revoked_ids=self._ctx.revoked_ids(),
            network_order=hooks.order_for(self._ctx.store, identity.id, now=now),
        )

    def HoldBarrier(self, request: agent_pb2.HoldBarrierRequest, context: grpc.ServicerContext):
        outcome, reason = replication.hold_barrier(self._ctx.store, caller(), request.tag_id, now=datetime.now(UTC))
        return agent_pb2.HoldBarrierResponse(outcome=outcome, reason=reason)


def _certificate_expiry(context: grpc.ServicerContext) -> str:
    """The caller's certificate's notAfter as a protobuf JSON timestamp, or "" when it cannot be read."""
    from cryptography import x509
    from google.protobuf.timestamp_pb2 import Timestamp

    try:
        pem = context.auth_context()["x509_pem_cert"][0]
        not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    except (KeyError, IndexError, TypeError, ValueError):
        return ""
    stamp = Timestamp()
    stamp.FromDatetime(not_after)
    return stamp.ToJsonString()
