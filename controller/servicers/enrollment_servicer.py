"""Enrollment.Enroll: thin — all rules live in controller/enrollment.py."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from siterecovery.common import pki
from siterecovery.common.pb import enrollment_pb2, enrollment_pb2_grpc
from siterecovery.controller import enrollment
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.store.base import ServerRecord


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, ctx: ControllerContext) -> None:
        self._ctx = ctx

    def Enroll(self, request: enrollment_pb2.EnrollRequest, context: grpc.ServicerContext):
        def record(identity: pki.Identity, hostname: str, cert_pem: bytes) -> None:
            self._ctx.store.add_server(
                ServerRecord(
                    id=identity.id,
                    role=identity.role,
                    hostname=hostname,
                    cert_serial=pki.cert_serial(cert_pem),
                    cert_fingerprint=pki.cert_fingerprint(cert_pem),
                    enrolled_at=datetime.now(UTC),
                )
            )

        result = enrollment.enroll_agent(
            ca=self._ctx.ca,
            passphrase=self._ctx.vault.current(),
            server_cert_pem=self._ctx.server_cert_pem,
            limiter=self._ctx.limiter,
            peer_host=peer_host(context.peer()),
            csr_der=request.csr_der,
            role=pki.role_from_proto(request.role),
            hostname=request.hostname,
            client_nonce=request.client_nonce,
            proof=request.proof,
            record=record,
            nonces=self._ctx.nonces,
        )
        return enrollment_pb2.EnrollResponse(
            agent_id=result.agent_id,
            certificate_pem=result.certificate_pem,
            ca_certificate_pem=result.ca_certificate_pem,
            proof=result.proof,
        )


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' → '127.0.0.1'; 'ipv6:[::1]:5555' → '::1'."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] if rest.count(":") >= 1 else rest
    return host.strip("[]") or peer
