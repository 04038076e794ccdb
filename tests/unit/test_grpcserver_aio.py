"""The asyncio server of common/grpcserver.py (the configuration server's): the same guard
and statuses as the threaded server, for coroutine handlers and for the synchronous
handlers it runs on threads, and RPC metrics with the same codes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from siterecovery.common import errors, metrics, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.grpcserver import Service, caller, start_server
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

ADMIN_ID, READER_ID, AGENT_ID, REVOKED_ID = "admin-1", "reader-1", "agent-1", "agent-revoked"


class Admin(admin_pb2_grpc.AdminServicer):
    """Synchronous handlers, as the configuration server's Admin servicer has them."""

    def __init__(self) -> None:
        self.watch_started = threading.Event()
        self.watch_saw_inactive = threading.Event()
        self.thread_names: list[str] = []

    def GetJob(self, request, context):  # who called, from the guard's context var
        self.thread_names.append(threading.current_thread().name)
        return admin_pb2.Job(id=caller().id, target=context.peer())

    def ListJobs(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    def ListMachines(self, request, context):
        raise errors.NotFound("no machine", hint="add one", code="machine-not-found")

    def ListOperators(self, request, context):
        raise RuntimeError("a bug with a secret in it")

    def WatchJob(self, request, context):
        yield admin_pb2.Job(id="first")
        self.watch_started.set()
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)  # a servicer polling the store, as WatchJob does
        if not context.is_active():
            self.watch_saw_inactive.set()


class Agents(agent_pb2_grpc.AgentControlServicer):
    """A coroutine handler, as Heartbeat is."""

    async def Heartbeat(self, request, context):
        if request.problems:
            raise errors.InvalidInput("bad heartbeat", code="heartbeat-invalid")
        return agent_pb2.HeartbeatResponse(revoked_ids=[caller().id])


@pytest.fixture
def served(tmp_path: Path):
    ca = pki.CertificateAuthority.load_or_create(tmp_path / "pki")
    key, cert = ca.issue_keypair(pki.Identity(id="config-server", role=pki.CONFIG_SERVER),
                                 sans=[pki.CONFIG_SERVER_NAME])
    daemon_metrics = metrics.DaemonMetrics(pki.CONFIG_SERVER)
    admin = Admin()
    running = start_server(
        host="127.0.0.1",
        port=0,
        credentials=grpc.ssl_server_credentials([(key, cert)], root_certificates=ca.cert_pem,
                                                require_client_auth=True),
        services=[
            Service(admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name, admin,
                    admin_pb2_grpc.add_AdminServicer_to_server),
            Service(agent_pb2.DESCRIPTOR.services_by_name["AgentControl"].full_name, Agents(),
                    agent_pb2_grpc.add_AgentControlServicer_to_server),
        ],
        is_revoked=lambda who, _pem: who.id == REVOKED_ID,
        observers=[daemon_metrics.rpc_interceptor(aio=True)],
        aio=True,
    )
    channels: list[grpc.Channel] = []

    def channel(identity_id: str, role: str) -> grpc.Channel:
        sans = [pki.agent_dns_name(identity_id)] if role in pki.ENROLLABLE_ROLES else []
        k, c = ca.issue_keypair(pki.Identity(id=identity_id, role=role), sans=sans)
        creds = AgentCredentials(pki.Identity(identity_id, role), k, c, ca.cert_pem, "")
        made = secure_channel(f"127.0.0.1:{running.port}", creds.channel_credentials(),
                              target_name=pki.CONFIG_SERVER_NAME)
        channels.append(made)
        return made

    yield running, admin, daemon_metrics, channel
    for made in channels:
        made.close()
    running.stop(grace=1.0)


def count_of(daemon_metrics: metrics.DaemonMetrics, service: str, method: str, code: str,
             rpc_type: str = "unary") -> float | None:
    return daemon_metrics.registry.get_sample_value(
        "siterecovery_grpc_server_handling_seconds_count",
        {"grpc_service": f"siterecovery.v1.{service}", "grpc_method": method, "grpc_type": rpc_type,
         "grpc_code": code},
    )


def wait_until(condition, timeout: float = 10.0) -> None:
    """An RPC is observed when its handler returns, which may be just after its client has the
    answer (an abort sends the status first)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_synchronous_handler_runs_on_the_pool_with_its_caller(served) -> None:
    running, admin, daemon_metrics, channel = served
    job = admin_pb2_grpc.AdminStub(channel(ADMIN_ID, pki.ADMIN)).GetJob(admin_pb2.GetJobRequest(id="x"), timeout=10)
    assert job.id == ADMIN_ID
    assert job.target.startswith("ipv4:127.0.0.1:")
    assert admin.thread_names[0].startswith("rpc")
    wait_until(lambda: count_of(daemon_metrics, "Admin", "GetJob", "OK") == 1)


def test_a_coroutine_handler_has_its_caller_and_its_errors_become_statuses(served) -> None:
    running, _admin, daemon_metrics, channel = served
    stub = agent_pb2_grpc.AgentControlStub(channel(AGENT_ID, pki.SOURCE))
    assert list(stub.Heartbeat(agent_pb2.HeartbeatRequest(), timeout=10).revoked_ids) == [AGENT_ID]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Heartbeat(agent_pb2.HeartbeatRequest(problems=[common_pb2.Problem(code="x")]), timeout=10)
    error = errors.from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.code == "heartbeat-invalid"
    wait_until(lambda: count_of(daemon_metrics, "AgentControl", "Heartbeat", "OK") == 1)
    wait_until(lambda: count_of(daemon_metrics, "AgentControl", "Heartbeat", "INVALID_ARGUMENT") == 1)


def test_synchronous_aborts_errors_and_crashes_keep_their_statuses(served) -> None:
    running, _admin, daemon_metrics, channel = served
    stub = admin_pb2_grpc.AdminStub(channel(ADMIN_ID, pki.ADMIN))
    with pytest.raises(grpc.RpcError) as aborted:
        stub.ListJobs(admin_pb2.ListJobsRequest(), timeout=10)
    assert (aborted.value.code(), aborted.value.details()) == (grpc.StatusCode.NOT_FOUND, "nothing here")
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListMachines(admin_pb2.ListMachinesRequest(), timeout=10)
    error = errors.from_rpc_error(refused.value)
    assert (refused.value.code(), error.code, error.hint) == (grpc.StatusCode.NOT_FOUND, "machine-not-found", "add one")
    with pytest.raises(grpc.RpcError) as crashed:
        stub.ListOperators(admin_pb2.ListOperatorsRequest(), timeout=10)
    assert crashed.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in crashed.value.details()
    wait_until(lambda: count_of(daemon_metrics, "Admin", "ListJobs", "NOT_FOUND") == 1)
    wait_until(lambda: count_of(daemon_metrics, "Admin", "ListMachines", "NOT_FOUND") == 1)
    wait_until(lambda: count_of(daemon_metrics, "Admin", "ListOperators", "INTERNAL") == 1)


def test_roles_and_revoked_certificates_are_refused_and_counted(served) -> None:
    running, _admin, daemon_metrics, channel = served
    with pytest.raises(grpc.RpcError) as denied:
        admin_pb2_grpc.AdminStub(channel(READER_ID, pki.READER)).GetPassphrase(
            admin_pb2.GetPassphraseRequest(), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as agent_denied:
        admin_pb2_grpc.AdminStub(channel(AGENT_ID, pki.SOURCE)).GetJob(admin_pb2.GetJobRequest(), timeout=10)
    assert agent_denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as revoked:
        agent_pb2_grpc.AgentControlStub(channel(REVOKED_ID, pki.SOURCE)).Heartbeat(
            agent_pb2.HeartbeatRequest(), timeout=10)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert errors.from_rpc_error(revoked.value).code == "certificate-revoked"
    wait_until(lambda: count_of(daemon_metrics, "Admin", "GetPassphrase", "PERMISSION_DENIED") == 1)
    wait_until(lambda: count_of(daemon_metrics, "AgentControl", "Heartbeat", "UNAUTHENTICATED") == 1)


def test_a_synchronous_stream_sees_its_client_go_away(served) -> None:
    running, admin, daemon_metrics, channel = served
    call = admin_pb2_grpc.AdminStub(channel(ADMIN_ID, pki.ADMIN)).WatchJob(admin_pb2.GetJobRequest(id="x"),
                                                                           timeout=10)
    assert next(call).id == "first"
    assert admin.watch_started.wait(10)
    call.cancel()
    assert admin.watch_saw_inactive.wait(10)
    wait_until(lambda: count_of(daemon_metrics, "Admin", "WatchJob", "CANCELLED", "server_stream") == 1)


def test_health_and_stop(served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running, _admin, _metrics, channel = served
    health = health_pb2_grpc.HealthStub(channel(ADMIN_ID, pki.ADMIN))
    answer = health.Check(health_pb2.HealthCheckRequest(service="siterecovery.v1.Admin"), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    running.stop(grace=1.0)
    with pytest.raises(grpc.RpcError) as stopped:
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
