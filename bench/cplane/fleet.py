"""The simulated agents: real enrolled identities and what a source agent sends.

Enrollment goes through the real passphrase flow (`Enrollment.Enroll` with a
bootstrap certificate, the agent's HMAC proof over the server certificate and
its CSR, the server's proof checked on the way back), so every identity is a
server row the configuration server created itself. Only the per-agent TLS
probe for the server certificate is done once for the fleet: every agent would
fetch the same certificate. Requests go out in parallel on one grpc.aio
channel, which is what makes 2,000 enrollments take seconds rather than minutes.

The inventory and heartbeat mirror agents/source/daemon.py and
agents/runtime.py: host facts with a network identity, two disks with
by-id identities, the state directory's free space, the data endpoint; a
heartbeat carries the state directory's facts and the problems derived from
them (none while it has room), no pairs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

import siterecovery
from siterecovery.common import pki
from siterecovery.common.enrollment import NONCE_BYTES, agent_proof, passphrase_key, server_proof
from siterecovery.common.inventory import space_problems
from siterecovery.common.pb import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
)

GIB = 1 << 30
STATE_DIR = "/var/lib/siterecovery/source-agent"


@dataclass(frozen=True)
class AgentIdentity:
    index: int
    id: str
    hostname: str
    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class Server:
    """How to reach the configuration server, from its state directory (as srctl's profile has it)."""

    address: str
    ca_pem: bytes
    server_cert_pem: bytes
    admin_key_pem: bytes
    admin_cert_pem: bytes

    @classmethod
    def from_state_dir(cls, state_dir: Path, port: int) -> Server:
        admin = state_dir / "admin"
        return cls(
            address=f"127.0.0.1:{port}",
            ca_pem=(admin / "ca.crt").read_bytes(),
            # What an agent's first-contact TLS probe returns (common/enrollment.fetch_server_certificate).
            server_cert_pem=(state_dir / "pki" / "server.crt").read_bytes(),
            admin_key_pem=(admin / "client.key").read_bytes(),
            admin_cert_pem=(admin / "client.crt").read_bytes(),
        )

    def options(self) -> list[tuple[str, object]]:
        from siterecovery.common.channels import CHANNEL_OPTIONS

        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", pki.CONFIG_SERVER_NAME)]

    def admin_channel(self) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca_pem, self.admin_key_pem, self.admin_cert_pem)
        return grpc.aio.secure_channel(self.address, credentials, options=self.options())


def hostname_of(index: int) -> str:
    return f"bench-src-{index:04d}"


async def passphrase(server: Server) -> str:
    """The connection passphrase, as `srctl passphrase show` asks for it."""
    async with server.admin_channel() as channel:
        reply = await admin_pb2_grpc.AdminStub(channel).GetPassphrase(admin_pb2.GetPassphraseRequest(), timeout=10)
    return reply.passphrase


async def enroll_fleet(server: Server, count: int, *, concurrency: int = 32) -> list[AgentIdentity]:
    key = passphrase_key(await passphrase(server))
    boot_key, boot_cert = pki.bootstrap_client_credentials()
    credentials = grpc.ssl_channel_credentials(server.server_cert_pem, boot_key, boot_cert)
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.secure_channel(server.address, credentials, options=server.options()) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)

        async def one(index: int) -> AgentIdentity:
            async with gate:
                return await _enroll(stub, server, key, index)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _enroll(stub: enrollment_pb2_grpc.EnrollmentStub, server: Server, key: bytes, index: int) -> AgentIdentity:
    hostname = hostname_of(index)
    private = pki.generate_key()
    csr_der = pki.build_csr(private, common_name=hostname, sans=[])
    nonce = secrets.token_bytes(NONCE_BYTES)
    request = enrollment_pb2.EnrollRequest(
        csr_der=csr_der,
        role=pki.role_to_proto(pki.SOURCE),
        hostname=hostname,
        client_nonce=nonce,
        proof=agent_proof(key, nonce=nonce, server_cert_der=pki.cert_der(server.server_cert_pem), csr_der=csr_der),
    )
    reply = await stub.Enroll(request, timeout=60)
    expected = server_proof(key, nonce=nonce, ca_cert_der=pki.cert_der(reply.ca_certificate_pem),
                            issued_cert_der=pki.cert_der(reply.certificate_pem))
    if not hmac.compare_digest(expected, reply.proof):
        raise SystemExit(f"enrollment of {hostname}: the server's proof does not check out")
    return AgentIdentity(index=index, id=reply.agent_id, hostname=hostname,
                         key_pem=pki.private_key_pem(private), cert_pem=reply.certificate_pem)


# --- what a source agent sends ----------------------------------------------------------------


def _octets(index: int) -> tuple[int, int]:
    return 10 + index // 250, index % 250 + 2


def state_directory(index: int, tick: int = 0) -> common_pb2.DirectoryFacts:
    """The state directory's facts; free space drifts a little between heartbeats, as it does."""
    return common_pb2.DirectoryFacts(
        kind=common_pb2.DIRECTORY_KIND_STATE,
        path=STATE_DIR,
        total_bytes=100 * GIB,
        free_bytes=60 * GIB - (tick % 97) * (1 << 20),
        used_by_agent_bytes=GIB + (tick % 97) * (1 << 20),
    )


def network_identity(index: int) -> common_pb2.NetworkIdentity:
    b, c = _octets(index)
    mac = hashlib.sha256(f"mac{index}".encode()).hexdigest()[:10]
    message = common_pb2.NetworkIdentity(
        system=common_pb2.NETWORK_SYSTEM_NETPLAN,
        interfaces=[
            common_pb2.NetworkInterface(
                name="ens192",
                mac_address="02:" + ":".join(mac[i:i + 2] for i in range(0, 10, 2)),
                ipv4_method=common_pb2.ADDRESS_METHOD_STATIC,
                ipv6_method=common_pb2.ADDRESS_METHOD_DISABLED,
                addresses=[common_pb2.IpAddress(address=f"10.{b}.{c}.10", prefix_length=16)],
                gateways=[f"10.{b}.0.1"],
                dns_servers=["10.0.0.53", "10.0.1.53"],
                dns_search=["corp.example"],
                mtu=1500,
            )
        ],
    )
    message.captured_at.GetCurrentTime()
    return message


def inventory(identity: AgentIdentity) -> common_pb2.Inventory:
    b, c = _octets(identity.index)
    host = common_pb2.HostFacts(
        hostname=identity.hostname,
        os="Ubuntu 24.04.1 LTS",
        addresses=[f"10.{b}.{c}.10", f"fd00::{identity.index + 1:x}"],
        agent_version=siterecovery.__version__,
        machine_uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, identity.hostname)),
    )
    disks = [
        common_pb2.DiskFacts(identity=f"wwn-0x5000c500{identity.index:06x}{n:02x}", path=f"/dev/sd{letter}",
                             size_bytes=size * GIB, name=f"sd{letter}")
        for n, (letter, size) in enumerate((("a", 64), ("b", 256)))
    ]
    return common_pb2.Inventory(
        host=host,
        disks=disks,
        directories=[state_directory(identity.index)],
        data_endpoint=f"{identity.hostname}:9444",
        network=network_identity(identity.index),
    )


def heartbeat(index: int, tick: int) -> agent_pb2.HeartbeatRequest:
    directories = [state_directory(index, tick)]
    return agent_pb2.HeartbeatRequest(problems=space_problems(directories), directories=directories)
