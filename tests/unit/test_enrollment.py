"""Enrollment: the proofs, the server-side checks and rate limit, and a real mTLS round trip."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from siterecovery.common import enrollment as agent
from siterecovery.common import errors, pki
from siterecovery.common.pb import enrollment_pb2, enrollment_pb2_grpc
from siterecovery.controller import enrollment as server

PASSPHRASE = "correct horse battery staple"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the proofs --------------------------------------------------------------------------------


def test_passphrase_key_is_deterministic_and_depends_on_the_passphrase() -> None:
    assert agent.passphrase_key("a") == agent.passphrase_key("a")
    assert agent.passphrase_key("a") != agent.passphrase_key("b")
    assert len(agent.passphrase_key("a")) == 32


def test_agent_proof_is_bound_to_key_nonce_server_certificate_and_csr() -> None:
    key = agent.passphrase_key(PASSPHRASE)
    nonce = secrets.token_bytes(32)
    proof = agent.agent_proof(key, nonce=nonce, server_cert_der=b"cert", csr_der=b"csr")
    assert proof == agent.agent_proof(key, nonce=nonce, server_cert_der=b"cert", csr_der=b"csr")
    others = [
        agent.agent_proof(
            agent.passphrase_key("x"), nonce=nonce, server_cert_der=b"cert", csr_der=b"csr"
        ),
        agent.agent_proof(
            key, nonce=secrets.token_bytes(32), server_cert_der=b"cert", csr_der=b"csr"
        ),
        agent.agent_proof(key, nonce=nonce, server_cert_der=b"mitm", csr_der=b"csr"),
        agent.agent_proof(key, nonce=nonce, server_cert_der=b"cert", csr_der=b"other"),
        # The server's proof over the same bytes is a different value (domain separation).
        agent.server_proof(key, nonce=nonce, ca_cert_der=b"cert", issued_cert_der=b"csr"),
    ]
    assert proof not in others


def test_server_proof_is_bound_to_ca_and_issued_certificate() -> None:
    key = agent.passphrase_key(PASSPHRASE)
    nonce = secrets.token_bytes(32)
    proof = agent.server_proof(key, nonce=nonce, ca_cert_der=b"ca", issued_cert_der=b"leaf")
    assert proof != agent.server_proof(
        key, nonce=nonce, ca_cert_der=b"ca2", issued_cert_der=b"leaf"
    )
    assert proof != agent.server_proof(
        key, nonce=nonce, ca_cert_der=b"ca", issued_cert_der=b"leaf2"
    )


# --- passphrase file and vault -----------------------------------------------------------------


def test_read_passphrase_file(tmp_path: Path) -> None:
    path = tmp_path / "passphrase"
    path.write_text("  s3cret \n")
    assert agent.read_passphrase_file(path) == "s3cret"
    path.write_text("\n  \n")
    with pytest.raises(errors.InvalidInput, match="empty"):
        agent.read_passphrase_file(path)
    with pytest.raises(errors.InvalidInput, match="does not exist") as info:
        agent.read_passphrase_file(tmp_path / "missing")
    assert "srctl passphrase show" in info.value.hint


def test_vault_creates_once_rotates_and_keeps_the_file_private(tmp_path: Path) -> None:
    vault = server.PassphraseVault(tmp_path / "state" / "passphrase.json")
    first = vault.load_or_create()
    assert len(first) >= 32
    assert vault.load_or_create() == first == vault.current()
    assert _mode(vault.path) == 0o600
    assert json.loads(vault.path.read_text())["passphrase"] == first
    assert vault.created_at.tzinfo is not None
    rotated = vault.rotate()
    assert rotated != first and vault.current() == rotated
    assert server.PassphraseVault(vault.path).current() == rotated
    assert _mode(vault.path) == 0o600


def test_vault_without_file_or_with_a_damaged_one(tmp_path: Path) -> None:
    vault = server.PassphraseVault(tmp_path / "passphrase.json")
    with pytest.raises(errors.PreconditionFailed):
        vault.current()
    vault.path.write_text("{not json")
    with pytest.raises(errors.Integrity):
        vault.current()


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:5123", "10.0.0.5"),
        ("ipv6:[::1]:40000", "::1"),
        ("ipv6:[fe80::1%eth0]:40000", "fe80::1"),
        ("unix:/run/sr.sock", "unix:/run/sr.sock"),
    ],
)
def test_host_of_peer(peer: str, host: str) -> None:
    assert server.host_of_peer(peer) == host


# --- enroll_agent ------------------------------------------------------------------------------


@dataclass
class Env:
    ca: pki.CertificateAuthority
    server_cert_pem: bytes
    limiter: server.FailureLimiter
    clock: FakeClock
    records: list[tuple[pki.Identity, str, bytes]] = field(default_factory=list)


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    ca = pki.CertificateAuthority.load_or_create(tmp_path / "ca")
    _, cert = ca.issue_keypair(pki.Identity("configuration-server", "admin"), sans=["cs"])
    clock = FakeClock()
    limiter = server.FailureLimiter(
        max_failures=5, window_seconds=60, lockout_seconds=60, clock=clock
    )
    return Env(ca, cert, limiter, clock)


def _call(
    env: Env,
    *,
    passphrase: str = PASSPHRASE,
    peer: str = "10.0.0.5",
    role: str = "source",
    hostname: str = "host1",
    nonce: bytes | None = None,
    seen_server_cert: bytes | None = None,
) -> tuple[server.EnrollmentResult, bytes, bytes]:
    key = pki.generate_key()
    csr = pki.build_csr(key, common_name=hostname, sans=["host1.example.net"])
    nonce = secrets.token_bytes(32) if nonce is None else nonce
    proof = agent.agent_proof(
        agent.passphrase_key(passphrase),
        nonce=nonce,
        server_cert_der=pki.cert_der(seen_server_cert or env.server_cert_pem),
        csr_der=csr,
    )
    result = server.enroll_agent(
        ca=env.ca,
        passphrase=PASSPHRASE,
        server_cert_pem=env.server_cert_pem,
        limiter=env.limiter,
        peer_host=peer,
        csr_der=csr,
        role=role,
        hostname=hostname,
        client_nonce=nonce,
        proof=proof,
        record=lambda identity, host, cert: env.records.append((identity, host, cert)),
    )
    return result, nonce, csr


def test_right_passphrase_enrolls(env: Env) -> None:
    result, nonce, _ = _call(env)
    identity = pki.identity_from_cert_pem(result.certificate_pem)
    assert identity == pki.Identity(result.agent_id, "source")
    pki.verify_issued_by(result.certificate_pem, env.ca.cert_pem)
    assert result.ca_certificate_pem == env.ca.cert_pem
    assert env.records == [(identity, "host1", result.certificate_pem)]
    assert result.proof == agent.server_proof(
        agent.passphrase_key(PASSPHRASE),
        nonce=nonce,
        ca_cert_der=pki.cert_der(env.ca.cert_pem),
        issued_cert_der=pki.cert_der(result.certificate_pem),
    )


def test_wrong_passphrase_is_unauthenticated_with_a_hint(env: Env) -> None:
    with pytest.raises(errors.Unauthenticated, match="passphrase is wrong") as info:
        _call(env, passphrase="guess")
    assert "srctl passphrase show" in info.value.hint
    assert env.records == []


def test_proof_over_another_server_certificate_is_refused(env: Env) -> None:
    # What a man in the middle relays: a proof bound to the certificate he showed.
    _, mitm_cert = env.ca.issue_keypair(pki.Identity("mitm", "admin"))
    with pytest.raises(errors.Unauthenticated):
        _call(env, seen_server_cert=mitm_cert)


def test_sixth_attempt_is_rate_limited_even_with_the_right_passphrase(env: Env) -> None:
    for _ in range(5):
        env.clock.advance(1)
        with pytest.raises(errors.Unauthenticated):
            _call(env, passphrase="guess")
    with pytest.raises(errors.RateLimited) as info:
        _call(env)
    assert "retry in 60 s" in info.value.hint
    env.clock.advance(59.5)
    with pytest.raises(errors.RateLimited):
        _call(env)
    # Other hosts are unaffected, and their success does not unlock the first.
    _call(env, peer="10.0.0.6")
    with pytest.raises(errors.RateLimited):
        _call(env)
    env.clock.advance(1)
    result, _, _ = _call(env)
    assert result.agent_id


def test_failures_spread_beyond_the_window_do_not_lock_out(env: Env) -> None:
    for _ in range(10):
        with pytest.raises(errors.Unauthenticated):
            _call(env, passphrase="guess")
        env.clock.advance(15)  # 4 failures per 60 s at most
    _call(env)


@pytest.mark.parametrize("role", ["admin", "reader", "enrollee"])
def test_roles_that_cannot_be_enrolled_are_refused(env: Env, role: str) -> None:
    with pytest.raises(errors.InvalidInput):
        _call(env, role=role)


@pytest.mark.parametrize(
    "kwargs",
    [{"nonce": b"short"}, {"hostname": ""}, {"hostname": "a\nb"}, {"hostname": "h" * 254}],
    ids=["nonce", "empty-host", "control-char", "long-host"],
)
def test_malformed_requests_are_invalid_input(env: Env, kwargs: dict) -> None:
    with pytest.raises(errors.InvalidInput):
        _call(env, **kwargs)


def test_a_csr_that_does_not_parse_is_invalid_input(env: Env) -> None:
    nonce = secrets.token_bytes(32)
    with pytest.raises(errors.InvalidInput):
        server.enroll_agent(
            ca=env.ca,
            passphrase=PASSPHRASE,
            server_cert_pem=env.server_cert_pem,
            limiter=env.limiter,
            peer_host="h",
            csr_der=b"junk",
            role="source",
            hostname="h",
            client_nonce=nonce,
            proof=b"x" * 32,
            record=lambda *a: None,
        )


# --- a real server on 127.0.0.1:0 --------------------------------------------------------------


class _Servicer(enrollment_pb2_grpc.EnrollmentServicer):
    """What the real servicer does, minus the store: identity check, enroll_agent, errors."""

    def __init__(
        self,
        ca: pki.CertificateAuthority,
        server_cert_pem: bytes,
        limiter: server.FailureLimiter,
        tamper: bool,
    ) -> None:
        self.ca = ca
        self.server_cert_pem = server_cert_pem
        self.limiter = limiter
        self.tamper = tamper
        self.records: list[tuple[pki.Identity, str, bytes]] = []

    def Enroll(self, request, context):
        try:
            caller = pki.identity_from_cert_pem(context.auth_context()["x509_pem_cert"][0])
            if caller.role != pki.ENROLLEE:
                raise errors.PermissionDenied("already enrolled", code="already-enrolled")
            result = server.enroll_agent(
                ca=self.ca,
                passphrase=PASSPHRASE,
                server_cert_pem=self.server_cert_pem,
                limiter=self.limiter,
                peer_host=server.host_of_peer(context.peer()),
                csr_der=request.csr_der,
                role=pki.role_from_proto(request.role),
                hostname=request.hostname,
                client_nonce=request.client_nonce,
                proof=request.proof,
                record=lambda identity, host, cert: self.records.append((identity, host, cert)),
            )
        except errors.SiteRecoveryError as exc:
            errors.abort(context, exc)
        proof = result.proof
        if self.tamper:
            proof = bytes([proof[0] ^ 1]) + proof[1:]
        return enrollment_pb2.EnrollResponse(
            agent_id=result.agent_id,
            certificate_pem=result.certificate_pem,
            ca_certificate_pem=result.ca_certificate_pem,
            proof=proof,
        )


@dataclass
class Running:
    address: str
    port: int
    ca: pki.CertificateAuthority
    servicer: _Servicer


@contextlib.contextmanager
def _serve(
    tmp_path: Path, *, tamper: bool = False, serving_ca: pki.CertificateAuthority | None = None
) -> Iterator[Running]:
    ca = pki.CertificateAuthority.load_or_create(tmp_path / "server-ca")
    key_pem, cert_pem = (serving_ca or ca).issue_keypair(
        pki.Identity("configuration-server", pki.CONFIG_SERVER),
        sans=[pki.CONFIG_SERVER_NAME, "localhost", "127.0.0.1"],
    )
    servicer = _Servicer(ca, cert_pem, server.FailureLimiter(clock=FakeClock()), tamper)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(servicer, grpc_server)
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca.cert_pem + pki.bootstrap_ca_pem(),
        require_client_auth=True,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        yield Running(f"127.0.0.1:{port}", port, ca, servicer)
    finally:
        grpc_server.stop(None)


def _rpc_code(
    address: str, credentials: grpc.ChannelCredentials, *, target_name: str = ""
) -> grpc.StatusCode:
    """The status an empty Enroll call with these credentials ends with."""
    options = [("grpc.ssl_target_name_override", target_name)] if target_name else []
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _enroll(running: Running, state_dir: Path, passphrase: str = PASSPHRASE):
    return agent.enroll(
        server_address=running.address,
        passphrase=passphrase,
        role="process-server",
        state_dir=state_dir,
        hostname="ps1",
        sans=["ps1.example.net", "127.0.0.1"],
        timeout=10,
    )


def test_enroll_over_the_network_writes_a_private_identity(tmp_path: Path) -> None:
    state = tmp_path / "agent-state"
    with _serve(tmp_path) as running:
        creds = _enroll(running, state)

        ident = state / "identity"
        assert _mode(state) == 0o700 and _mode(ident) == 0o700
        assert sorted(p.name for p in ident.iterdir()) == [
            "agent.crt",
            "agent.key",
            "ca.crt",
            "identity.json",
        ]
        assert _mode(ident / "agent.key") == 0o600
        assert _mode(ident / "identity.json") == 0o600
        pki.verify_issued_by((ident / "agent.crt").read_bytes(), running.ca.cert_pem)
        assert (ident / "ca.crt").read_bytes() == running.ca.cert_pem
        meta = json.loads((ident / "identity.json").read_text())
        assert meta["id"] == creds.identity.id and meta["role"] == "process-server"
        assert meta["server_address"] == running.address
        assert agent.load_credentials(state) == creds
        assert running.servicer.records[0][0] == creds.identity
        assert running.servicer.records[0][1] == "ps1"

        # The new certificate speaks mutual TLS with the server under our CA alone
        # (the test servicer, like the interceptor, refuses Enroll to a non-enrollee).
        code = _rpc_code(running.address, creds.channel_credentials())
        assert code == grpc.StatusCode.PERMISSION_DENIED

        # The agent's own port: mutual TLS under our CA alone, and the agent's
        # certificate answers to its address-independent name.
        assert pki.cert_has_names(creds.cert_pem, [pki.agent_dns_name(creds.identity.id)])
        agent_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(running.servicer, agent_server)
        agent_port = agent_server.add_secure_port("127.0.0.1:0", creds.server_credentials())
        agent_server.start()
        try:
            admin_key, admin_cert = running.ca.issue_keypair(pki.Identity("op", pki.ADMIN))
            peer = grpc.ssl_channel_credentials(running.ca.cert_pem, admin_key, admin_cert)
            name = pki.agent_dns_name(creds.identity.id)
            code = _rpc_code(f"127.0.0.1:{agent_port}", peer, target_name=name)
            assert code == grpc.StatusCode.PERMISSION_DENIED  # reached the servicer
            boot = grpc.ssl_channel_credentials(
                running.ca.cert_pem, *pki.bootstrap_client_credentials()
            )
            code = _rpc_code(f"127.0.0.1:{agent_port}", boot, target_name=name)
            assert code == grpc.StatusCode.UNAVAILABLE  # agents do not trust the bootstrap CA
        finally:
            agent_server.stop(None)

        # Enrolling again replaces the identity and leaves nothing stray behind.
        again = _enroll(running, state)
        assert again.identity != creds.identity
        assert agent.load_credentials(state) == again
        assert sorted(p.name for p in state.iterdir()) == ["identity"]


def test_wrong_passphrase_over_the_network_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "agent-state"
    with (
        _serve(tmp_path) as running,
        pytest.raises(errors.Unauthenticated, match="passphrase is wrong") as info,
    ):
        _enroll(running, state, passphrase="guess")
    assert "srctl passphrase show" in info.value.hint
    assert not state.exists()


def test_a_server_that_cannot_prove_the_passphrase_gets_nothing_stored(tmp_path: Path) -> None:
    state = tmp_path / "agent-state"
    with _serve(tmp_path, tamper=True) as running, pytest.raises(errors.Integrity, match="prove"):
        _enroll(running, state)
    assert not state.exists()


def test_a_server_certificate_outside_the_returned_ca_gets_nothing_stored(tmp_path: Path) -> None:
    other = pki.CertificateAuthority.load_or_create(tmp_path / "other-ca")
    state = tmp_path / "agent-state"
    with (
        _serve(tmp_path, serving_ca=other) as running,
        pytest.raises(errors.Integrity, match="not issued by"),
    ):
        _enroll(running, state)
    assert not state.exists()


def test_a_client_without_a_certificate_is_refused_at_the_handshake(tmp_path: Path) -> None:
    with _serve(tmp_path) as running:
        server_pem = agent.fetch_server_certificate(running.address, timeout=10)
        plain = grpc.ssl_channel_credentials(root_certificates=server_pem)
        code = _rpc_code(running.address, plain)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert running.servicer.records == []


def test_a_client_with_a_foreign_certificate_is_refused_at_the_handshake(tmp_path: Path) -> None:
    foreign = pki.CertificateAuthority.load_or_create(tmp_path / "foreign")
    key_pem, cert_pem = foreign.issue_keypair(pki.Identity("mallory", "admin"))
    with _serve(tmp_path) as running:
        server_pem = agent.fetch_server_certificate(running.address, timeout=10)
        creds = grpc.ssl_channel_credentials(server_pem, key_pem, cert_pem)
        code = _rpc_code(running.address, creds)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_an_unreachable_address_is_unavailable_and_names_it(tmp_path: Path) -> None:
    # A bound socket that does not listen: connections are refused, and the port stays ours.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(errors.Unavailable, match=address):
            agent.enroll(
                server_address=address,
                passphrase=PASSPHRASE,
                role="source",
                state_dir=tmp_path / "s",
                hostname="h",
                sans=[],
                timeout=5,
            )
    assert not (tmp_path / "s").exists()


def test_agent_side_input_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidInput):
        agent.enroll(
            server_address="127.0.0.1:1",
            passphrase=PASSPHRASE,
            role="admin",
            state_dir=tmp_path / "s",
            hostname="h",
            sans=[],
        )
    with pytest.raises(errors.InvalidInput):
        agent.enroll(
            server_address="no-port",
            passphrase=PASSPHRASE,
            role="source",
            state_dir=tmp_path / "s",
            hostname="h",
            sans=[],
        )
    assert not (tmp_path / "s").exists()


def test_load_credentials_absent_and_damaged(tmp_path: Path) -> None:
    assert agent.load_credentials(tmp_path) is None
    ident = tmp_path / "identity"
    ident.mkdir()
    (ident / "identity.json").write_text(
        json.dumps({"id": "a", "role": "source", "server_address": "x:1"})
    )
    with pytest.raises(errors.Integrity, match="missing"):
        agent.load_credentials(tmp_path)
