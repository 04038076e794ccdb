"""`srctl servers remove`: a removed agent's certificate is refused on every port,
also by an agent restarted before it heard from the configuration server; a
server that still serves replicated disks is not removed, and nothing changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from siterecovery.common import errors, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc, dataplane_pb2, dataplane_pb2_grpc

from .conftest import Site, wait_for


def _identity(state_dir: Path) -> tuple[bytes, bytes]:
    return (state_dir / "identity" / "agent.key").read_bytes(), (state_dir / "identity" / "agent.crt").read_bytes()


def _channel(port: int, ca_pem: bytes, name: str, key_cert: tuple[bytes, bytes]) -> grpc.Channel:
    key, cert = key_cert
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key, certificate_chain=cert)
    return secure_channel(f"127.0.0.1:{port}", creds, target_name=name)


def _probe_error(port: int, ca_pem: bytes, name: str, key_cert) -> errors.SiteRecoveryError | None:
    with _channel(port, ca_pem, name, key_cert) as channel:
        try:
            dataplane_pb2_grpc.ProcessServerStub(channel).Probe(dataplane_pb2.ProbeRequest(), timeout=10)
        except grpc.RpcError as exc:
            return errors.from_rpc_error(exc)
    return None


@pytest.fixture
def site(tmp_path: Path):
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


def test_a_removed_agent_is_refused_everywhere_and_a_server_in_use_is_not_removed(site: Site):
    site.start_config_server()
    ps = site.start_agent("process-server")
    site.start_agent("master-target")
    source = site.start_agent("source-agent")
    wait_for(lambda: len(site.servers()) == 3 and all(s["health"] == "healthy" for s in site.servers()),
             what="healthy agents")
    ca_pem = (site.cs_dir / "admin" / "ca.crt").read_bytes()
    source_id, ps_id = source.state["agent_id"], ps.state["agent_id"]
    source_cert = _identity(site.root / "source-agent")
    ps_name = pki.agent_dns_name(ps_id)
    assert _probe_error(ps.state["port"], ca_pem, ps_name, source_cert) is None

    # In use: refused with the reason and the fix, and nothing changes.
    (pair,) = site.srctl_json("replication", "enable", source_id, "--disk", "disk0")
    refused = site.srctl("servers", "remove", ps_id, "--yes")
    assert refused.returncode != 0
    assert "still serves 1 replicated disk" in refused.stderr and "replication disable" in refused.stderr
    assert ps_id in {s["id"] for s in site.servers()}
    assert _probe_error(ps.state["port"], ca_pem, ps_name, source_cert) is None
    site.srctl_json("replication", "disable", source_id)

    removed = site.srctl_json("servers", "remove", source_id, "--yes")
    assert removed["id"] == source_id and removed["revoked_at"]
    assert source_id not in {s["id"] for s in site.servers()}
    listed = {s["id"]: s for s in site.srctl_json("servers", "list", "--all")}
    assert listed[source_id]["health"] == "critical" and "revoked" in listed[source_id]["health_reason"]

    # The configuration server refuses the certificate at once...
    with _channel(site.cs_port, ca_pem, pki.CONFIG_SERVER_NAME, source_cert) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            agent_pb2_grpc.AgentControlStub(channel).Heartbeat(agent_pb2.HeartbeatRequest(), timeout=10)
    error = errors.from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and error.code == "certificate-revoked"

    # ...the process server after its next heartbeat...
    def refused_by_ps():
        error = _probe_error(ps.state["port"], ca_pem, ps_name, source_cert)
        return error if error is not None else None

    error = wait_for(refused_by_ps, what="the process server to refuse the removed agent")
    assert isinstance(error, errors.Unauthenticated) and error.code == "certificate-revoked"
    assert json.loads((site.root / "process-server" / "revoked.json").read_text())["revoked_ids"] == [source_id]

    # Removing it again changes nothing; an unknown name is a clear error.
    again = site.srctl_json("servers", "remove", source_id, "--yes")
    assert again["revoked_at"] == removed["revoked_at"]
    unknown = site.srctl("servers", "remove", "no-such-server", "--yes")
    assert unknown.returncode != 0 and "no server 'no-such-server'" in unknown.stderr

    # ...and still after a restart, before it has heard from the configuration server.
    site.stop_all()
    restarted = site.start_agent("process-server", passphrase_file=site.root / "passphrase")
    error = _probe_error(restarted.state["port"], ca_pem, ps_name, source_cert)
    assert isinstance(error, errors.Unauthenticated) and error.code == "certificate-revoked"
