"""Every port refuses a client without our certificate; every RPC checks the caller's role.

The matrix is generated from the role table in common/authz.py: each RPC served
on a port is called with a certificate of each role, and must be refused with
PERMISSION_DENIED exactly when the table says so.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from siterecovery.common import authz, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import dataplane_pb2, dataplane_pb2_grpc

from .conftest import Site, wait_for

SERVICES_BY_PORT = {
    "config-server": ("siterecovery.v1.Enrollment", "siterecovery.v1.AgentControl", "siterecovery.v1.Admin",
                      "siterecovery.v1.Protection"),
    "process-server": ("siterecovery.v1.ProcessServer",),
    "master-target": ("siterecovery.v1.MasterTarget",),
    "source-agent": (),
}
STANDARD = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
STREAMING = {
    "/siterecovery.v1.ProcessServer/Replicate": "stream_stream",
    "/siterecovery.v1.MasterTarget/Apply": "stream_stream",
    "/siterecovery.v1.Admin/WatchJob": "unary_stream",
    "/grpc.health.v1.Health/Watch": "unary_stream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "stream_stream",
}
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("secure"))
    try:
        site.start_config_server()
        agents = {name: site.start_agent(name) for name in ("process-server", "master-target", "source-agent")}
        wait_for(lambda: len(site.servers()) == 3, what="servers")
        ca = pki.CertificateAuthority.load_or_create(site.cs_dir / "pki")
        credentials = {
            pki.SOURCE: _identity_files(site.root / "source-agent"),
            pki.PROCESS_SERVER: _identity_files(site.root / "process-server"),
            pki.MASTER_TARGET: _identity_files(site.root / "master-target"),
            pki.ADMIN: ((site.cs_dir / "admin" / "client.key").read_bytes(), (site.cs_dir / "admin" / "client.crt").read_bytes()),
            pki.READER: ca.issue_keypair(pki.Identity(id="reader-1", role=pki.READER)),
            pki.ENROLLEE: pki.bootstrap_client_credentials(),
            pki.CONFIG_SERVER: ((site.cs_dir / "pki" / "server.key").read_bytes(), (site.cs_dir / "pki" / "server.crt").read_bytes()),
        }
        ports = {
            "config-server": site.cs_port,
            "process-server": agents["process-server"].state["port"],
            "master-target": agents["master-target"].state["port"],
            "source-agent": agents["source-agent"].state["port"],
        }
        names = {
            "config-server": pki.CONFIG_SERVER_NAME,
            "process-server": pki.agent_dns_name(agents["process-server"].state["agent_id"]),
            "master-target": pki.agent_dns_name(agents["master-target"].state["agent_id"]),
            "source-agent": pki.agent_dns_name(agents["source-agent"].state["agent_id"]),
        }
        yield site, ca, credentials, ports, names
    finally:
        site.stop_all()


def _identity_files(state_dir: Path) -> tuple[bytes, bytes]:
    return (state_dir / "identity" / "agent.key").read_bytes(), (state_dir / "identity" / "agent.crt").read_bytes()


def _channel(port: int, ca_pem: bytes, name: str, key_cert: tuple[bytes, bytes] | None) -> grpc.Channel:
    key, cert = key_cert or (None, None)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key, certificate_chain=cert)
    return secure_channel(f"127.0.0.1:{port}", creds, target_name=name)


def _call(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    kind = STREAMING.get(method, "unary_unary")
    try:
        if kind == "unary_unary":
            channel.unary_unary(method)(b"", timeout=10)
        elif kind == "unary_stream":
            call = channel.unary_stream(method)(b"", timeout=10)
            next(iter(call), None)
            call.cancel()
        else:
            call = channel.stream_stream(method)(iter([b""]), timeout=10)
            next(iter(call), None)
            call.cancel()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _methods(port_name: str) -> list[str]:
    services = SERVICES_BY_PORT[port_name] + STANDARD
    return sorted(m for m in authz.RPC_ROLES if m.split("/")[1] in services)


CASES = [(port, method) for port in SERVICES_BY_PORT for method in _methods(port)]


@pytest.mark.parametrize(("port_name", "method"), CASES, ids=[f"{p}{m}" for p, m in CASES])
def test_role_matrix(secured, port_name, method):
    _site, ca, credentials, ports, names = secured
    outcomes = {}
    for role, key_cert in credentials.items():
        if role == pki.ENROLLEE and port_name != "config-server":
            continue  # data ports do not trust the bootstrap CA at all; see below
        with _channel(ports[port_name], ca.cert_pem, names[port_name], key_cert) as channel:
            outcomes[role] = _call(channel, method)
    for role, code in outcomes.items():
        if authz.allowed(method, role):
            assert code not in REFUSED, f"{role} was refused {method}: {code}"
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, f"{role} calling {method} got {code}"


@pytest.mark.parametrize("port_name", list(SERVICES_BY_PORT))
def test_no_client_certificate_is_refused_on_every_port(secured, port_name):
    _site, ca, _credentials, ports, names = secured
    with _channel(ports[port_name], ca.cert_pem, names[port_name], None) as channel:
        assert _call(channel, "/grpc.health.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("port_name", list(SERVICES_BY_PORT))
def test_certificate_from_a_foreign_ca_is_refused_on_every_port(secured, port_name, tmp_path):
    _site, ca, _credentials, ports, names = secured
    foreign = pki.CertificateAuthority.load_or_create(tmp_path / "foreign")
    key_cert = foreign.issue_keypair(pki.Identity(id="intruder", role=pki.ADMIN))
    with _channel(ports[port_name], ca.cert_pem, names[port_name], key_cert) as channel:
        assert _call(channel, "/grpc.health.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("port_name", ["process-server", "master-target", "source-agent"])
def test_agent_ports_refuse_the_enrollment_certificate(secured, port_name):
    _site, ca, credentials, ports, names = secured
    with _channel(ports[port_name], ca.cert_pem, names[port_name], credentials[pki.ENROLLEE]) as channel:
        assert _call(channel, "/grpc.health.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE


def test_probe_names_both_ends(secured):
    _site, ca, credentials, ports, names = secured
    with _channel(ports["process-server"], ca.cert_pem, names["process-server"], credentials[pki.SOURCE]) as channel:
        reply = dataplane_pb2_grpc.ProcessServerStub(channel).Probe(dataplane_pb2.ProbeRequest(), timeout=10)
    assert pki.role_from_proto(reply.role) == pki.PROCESS_SERVER
    assert pki.role_from_proto(reply.caller_role) == pki.SOURCE
    assert reply.caller_id == pki.identity_from_cert_pem(credentials[pki.SOURCE][1]).id


def test_every_port_serves_health_and_reflection(secured):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _site, ca, credentials, ports, names = secured
    for port_name, services in SERVICES_BY_PORT.items():
        with _channel(ports[port_name], ca.cert_pem, names[port_name], credentials[pki.ADMIN]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            listed = {s.name for s in next(iter(replies)).list_services_response.service}
            assert set(services) <= listed
