"""AgentControl: Register and Heartbeat from enrolled agents."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import structlog

from siterecovery.common.grpcserver import caller
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc
from siterecovery.controller import agents, network_orders, replication
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.convert import problem_to_dict, to_dict

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

    def Heartbeat(self, request: agent_pb2.HeartbeatRequest, context: grpc.ServicerContext):
        identity, now = caller(), datetime.now(UTC)
        network_orders.check_results(request.network_results)  # before anything is written
        counters = agents.heartbeat(
            self._ctx.store,
            identity,
            problems=[problem_to_dict(p) for p in request.problems],
            directories=[to_dict(d) for d in request.directories] or None,
            now=now,
            writer=self._ctx.heartbeats,
        )
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
