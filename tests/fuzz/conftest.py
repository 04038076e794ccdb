"""One real site for the fuzz suite, and the clients that reach each of its ports.

`FuzzSite` is the integration `ReplicatingSite` (configuration server, process
server, master target, one source agent, all real daemons on port 0) with one
replicating pair and one recovery point, quiet (no recovery-point schedule due
while the suite runs), plus:

- a channel per port and per role (`channel`);
- a second source agent identity enrolled through the real protocol
  (`fuzz_source`) for the AgentControl RPCs, so random registrations never
  touch the machine that replicates;
- `digest()`: the store (every table but the columns heartbeats rewrite) and
  every file under the master target's datastore and retention directories and
  the process server's spool.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import settings

from siterecovery.common import enrollment, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, enrollment_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import launcher

from ..integration.conftest import wait_for
from ..integration.replication_site import MiB, ReplicatingSite
from . import hostile

# Reproducible in CI: the same examples on every run (`derandomize`), no example database.
settings.register_profile(
    "fuzz", derandomize=True, database=None, deadline=None, max_examples=40, print_blob=True,
    suppress_health_check=["too_slow", "data_too_large", "function_scoped_fixture"],
)


def pytest_report_header(config):
    return "hypothesis fuzz profile: 'fuzz' (derandomize=True: fixed seed, no example database)"


@dataclass
class FuzzSite:
    site: ReplicatingSite
    ca: pki.CertificateAuthority
    credentials: dict[str, tuple[bytes, bytes]]
    ports: dict[str, int]
    names: dict[str, str]
    pair: dict
    tag_id: str
    fuzz_source_id: str = ""
    channels: dict = field(default_factory=dict)

    @property
    def datastore(self) -> Path:
        return self.site.root / "master-target" / "datastore"

    @property
    def retention(self) -> Path:
        return self.site.root / "master-target" / "retention"

    @property
    def spool(self) -> Path:
        return self.site.root / "process-server" / "spool"

    def channel(self, port: str, role: str, *, key_cert: tuple[bytes, bytes] | None = None) -> grpc.Channel:
        """A cached mutual-TLS channel to `port` with a certificate of `role`."""
        if key_cert is not None:
            return _channel(self.ports[port], self.ca.cert_pem, self.names[port], key_cert)
        if (port, role) not in self.channels:
            self.channels[port, role] = _channel(self.ports[port], self.ca.cert_pem, self.names[port], self.credentials[role])
        return self.channels[port, role]

    def digest(self) -> tuple[str, str]:
        return (
            hostile.store_digest(self.site.cs_dir / "store.db"),
            hostile.tree_digest(self.datastore, self.retention, self.spool),
        )

    def healthy(self, port: str) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        role = pki.ADMIN
        reply = health_pb2_grpc.HealthStub(self.channel(port, role)).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self, name: str) -> None:
        launcher.stop(self.site.agents[name], grace=10)


def _channel(port: int, ca_pem: bytes, name: str, key_cert: tuple[bytes, bytes]) -> grpc.Channel:
    key, cert = key_cert
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key, certificate_chain=cert)
    return secure_channel(f"127.0.0.1:{port}", creds, target_name=name)


def _identity_files(state_dir: Path) -> tuple[bytes, bytes]:
    return (state_dir / "identity" / "agent.key").read_bytes(), (state_dir / "identity" / "agent.crt").read_bytes()


def enroll_request(site: ReplicatingSite, *, role: str = pki.SOURCE, hostname: str = "fuzz-host"):
    """A correctly signed enrollment request: (request, private key PEM)."""
    server_pem = (site.cs_dir / "pki" / "server.crt").read_bytes()
    key = pki.generate_key()
    csr = pki.build_csr(key, common_name=hostname, sans=[])
    nonce = secrets.token_bytes(enrollment.NONCE_BYTES)
    proof = enrollment.agent_proof(
        enrollment.passphrase_key(site.passphrase()), nonce=nonce, server_cert_der=pki.cert_der(server_pem), csr_der=csr
    )
    request = enrollment_pb2.EnrollRequest(
        csr_der=csr, role=pki.role_to_proto(role), hostname=hostname, client_nonce=nonce, proof=proof
    )
    return request, pki.private_key_pem(key)


def fuzz_inventory(hostname: str, endpoint: str = "127.0.0.1:1") -> dict:
    return {"host": {"hostname": hostname}, "data_endpoint": endpoint}


@pytest.fixture(scope="module")
def fuzz_site(tmp_path_factory):
    site = ReplicatingSite(tmp_path_factory.mktemp("fuzz"))
    try:
        site.start(disk_size=8 * MiB, data_bytes=2 * MiB)
        ca = pki.CertificateAuthority.load_or_create(site.cs_dir / "pki")
        credentials = {
            pki.SOURCE: _identity_files(site.root / "source-agent"),
            pki.PROCESS_SERVER: _identity_files(site.root / "process-server"),
            pki.MASTER_TARGET: _identity_files(site.root / "master-target"),
            pki.ADMIN: ((site.cs_dir / "admin" / "client.key").read_bytes(), (site.cs_dir / "admin" / "client.crt").read_bytes()),
            pki.ENROLLEE: pki.bootstrap_client_credentials(),
        }
        ports = {"config-server": site.cs_port}
        names = {"config-server": pki.CONFIG_SERVER_NAME}
        for name in ("process-server", "master-target", "source-agent"):
            ports[name] = site.agents[name].state["port"]
            names[name] = pki.agent_dns_name(site.agents[name].state["agent_id"])
        fuzz = FuzzSite(site, ca, credentials, ports, names, pair={}, tag_id="")

        # One pair, no scheduled points while the suite runs (the longest intervals allowed).
        admin = admin_pb2_grpc.AdminStub(fuzz.channel("config-server", pki.ADMIN))
        policy = rpb.RecoveryPolicy(
            crash_consistent_interval_seconds=86400, app_consistent_interval_seconds=86400,
            retention_window_seconds=86400,
        )
        admin.EnableReplication(
            admin_pb2.EnableReplicationRequest(machine=site.machine, disks=["disk0"], policy=policy), timeout=30
        )
        site.wait_replicating()
        fuzz.tag_id = site.create_point()
        wait_for(lambda: any(p["point"]["tag_id"] == fuzz.tag_id for p in site.points()), what="the recovery point")
        fuzz.pair = site.wait_caught_up()

        # The AgentControl fuzzing's own source agent: enrolled, registered once (its
        # register-server job runs to its end now, not while the suite compares digests).
        request, key_pem = enroll_request(site, hostname="fuzz-source")
        reply = _enroll(fuzz, request)
        fuzz.fuzz_source_id = reply.agent_id
        fuzz.credentials["fuzz-source"] = (key_pem, reply.certificate_pem)
        agent = agent_pb2_grpc.AgentControlStub(fuzz.channel("config-server", "fuzz-source"))
        agent.Register(agent_pb2.RegisterRequest(inventory=_inventory("fuzz-source")), timeout=10)
        wait_for(lambda: _jobs_settled(admin), what="registration jobs to end")
        yield fuzz
    finally:
        for channel in fuzz.channels.values() if "fuzz" in locals() else ():
            channel.close()
        site.stop_all()


def _inventory(hostname: str):
    from siterecovery.common.pb import common_pb2

    return common_pb2.Inventory(host=common_pb2.HostFacts(hostname=hostname), data_endpoint="127.0.0.1:1")


def _enroll(fuzz: FuzzSite, request):
    from siterecovery.common.pb import enrollment_pb2_grpc

    return enrollment_pb2_grpc.EnrollmentStub(fuzz.channel("config-server", pki.ENROLLEE)).Enroll(request, timeout=10)


def _jobs_settled(admin) -> bool:
    jobs = admin.ListJobs(admin_pb2.ListJobsRequest(limit=1000), timeout=10).jobs
    return all(j.status in (admin_pb2.JOB_STATUS_SUCCEEDED, admin_pb2.JOB_STATUS_FAILED,
                            admin_pb2.JOB_STATUS_COMPENSATED, admin_pb2.JOB_STATUS_CANCELLED) for j in jobs)
