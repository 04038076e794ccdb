"""Enrollment, agent side: turn the connection passphrase into a certificate.

The protocol (the server side is `siterecovery.controller.enrollment`)::

    key          = HKDF-SHA256(passphrase, salt="siterecovery-enroll-v1", info="proof", 32 bytes)
    agent proof  = HMAC-SHA256(key, "agent"  || nonce || sha256(server cert DER) || sha256(CSR DER))
    server proof = HMAC-SHA256(key, "server" || nonce || sha256(CA cert DER)     || sha256(issued cert DER))

1. The agent fetches the certificate the server presents (first contact: it
   trusts what it is shown), presenting a bootstrap client certificate so the
   handshake completes (see `siterecovery.common.pki`).
2. It pins that exact certificate as the gRPC root, sends a CSR and the agent
   proof. The proof is bound to the certificate the agent saw, so a man in the
   middle (who must show a different certificate) cannot relay it: the real
   server recomputes it over its own certificate and refuses.
3. The server answers with the certificate, its CA and the server proof. The
   agent stores nothing unless the proof checks out, the issued certificate
   is for its own key and identity, and both it and the pinned server
   certificate were signed by the returned CA.

The passphrase itself never travels and is never logged.

On-disk layout, written only after every check passed::

    <state_dir>/            0700 (made if missing)
        identity/           0700
            agent.key       0600  the agent's EC P-256 private key, PKCS#8 PEM
            agent.crt       0600  its certificate, issued by the configuration server's CA
            ca.crt          0600  the configuration server's CA certificate
            identity.json   0600  {"id", "role", "server_address", "enrolled_at"}

The files are written into a temporary sibling directory which is then renamed
to ``identity``; a previous identity is renamed aside first and removed
afterwards. A crash leaves either no ``identity`` (the agent enrolls again),
the old one or the new one complete, plus perhaps a stray ``.identity.*``
directory, which the next enrollment removes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from siterecovery.common import errors, pki
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import enrollment_pb2, enrollment_pb2_grpc

log = get_logger(__name__)

IDENTITY_DIR = "identity"
KEY_FILE = "agent.key"
CERT_FILE = "agent.crt"
CA_FILE = "ca.crt"
IDENTITY_FILE = "identity.json"

NONCE_BYTES = 32
PASSPHRASE_HINT = (
    "copy it from `srctl passphrase show` on the configuration server into the agent's "
    "passphrase file"
)

# --- the proofs (shared with the server side) --------------------------------------------------


def passphrase_key(passphrase: str) -> bytes:
    """The 32-byte HMAC key derived from the connection passphrase."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"siterecovery-enroll-v1", info=b"proof"
    ).derive(passphrase.encode("utf-8"))


def agent_proof(key: bytes, *, nonce: bytes, server_cert_der: bytes, csr_der: bytes) -> bytes:
    """What the agent sends: it knows the passphrase, saw this server certificate, sent this CSR."""
    message = (
        b"agent"
        + nonce
        + hashlib.sha256(server_cert_der).digest()
        + hashlib.sha256(csr_der).digest()
    )
    return hmac.new(key, message, hashlib.sha256).digest()


def server_proof(key: bytes, *, nonce: bytes, ca_cert_der: bytes, issued_cert_der: bytes) -> bytes:
    """What the server answers: it knows the passphrase and issued this certificate from this CA."""
    message = (
        b"server"
        + nonce
        + hashlib.sha256(ca_cert_der).digest()
        + hashlib.sha256(issued_cert_der).digest()
    )
    return hmac.new(key, message, hashlib.sha256).digest()


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentCredentials:
    identity: pki.Identity
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    server_address: str

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return (
            f"AgentCredentials(identity={self.identity!r}, server_address={self.server_address!r})"
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Mutual TLS towards any siterecovery server: trust our CA, present our certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS for this agent's own port: clients need a certificate from our CA only."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )


def _corrupt(path: Path, what: str) -> errors.Integrity:
    return errors.Integrity(
        f"the agent identity in {path} is damaged: {what}",
        hint=f"remove {path} and enroll the agent again",
        code="identity-corrupt",
    )


def load_credentials(state_dir: Path) -> AgentCredentials | None:
    """The stored identity, or None when the agent has not enrolled; `Integrity` when damaged."""
    directory = Path(state_dir) / IDENTITY_DIR
    if not (directory / IDENTITY_FILE).exists():
        return None
    try:
        meta = json.loads((directory / IDENTITY_FILE).read_text("utf-8"))
        identity = pki.Identity(id=meta["id"], role=meta["role"])
        server_address = str(meta["server_address"])
        key_path = directory / KEY_FILE
        key_pem = key_path.read_bytes()
        cert_pem = (directory / CERT_FILE).read_bytes()
        ca_pem = (directory / CA_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise _corrupt(directory, f"{Path(exc.filename).name} is missing") from exc
    except (ValueError, KeyError, TypeError, errors.InvalidInput) as exc:
        raise _corrupt(directory, f"{IDENTITY_FILE} is not valid") from exc
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        log.warning("agent key readable by others", path=str(key_path), mode=oct(mode))
    try:
        key = pki.load_private_key(key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise _corrupt(directory, "the key or certificate cannot be parsed") from exc
    if cert.public_key() != key.public_key():
        raise _corrupt(directory, "the certificate does not belong to the key")
    try:
        pki.verify_issued_by(cert_pem, ca_pem)
        named = pki.identity_from_cert_pem(cert_pem)
    except (errors.Integrity, errors.Unauthenticated) as exc:
        raise _corrupt(directory, exc.message) from exc
    if named != identity:
        raise _corrupt(directory, "the certificate names a different identity")
    return AgentCredentials(identity, key_pem, cert_pem, ca_pem, server_address)


def read_passphrase_file(path: Path) -> str:
    """The passphrase in `path`, stripped of surrounding whitespace."""
    path = Path(path)
    try:
        text = path.read_text("utf-8").strip()
    except FileNotFoundError:
        raise errors.InvalidInput(
            f"the passphrase file {path} does not exist",
            hint=PASSPHRASE_HINT,
            code="passphrase-file-missing",
        ) from None
    except PermissionError:
        raise errors.InvalidInput(
            f"the passphrase file {path} cannot be read (permission denied)",
            hint="run the agent as a user that can read it, or fix its owner",
            code="passphrase-file-unreadable",
        ) from None
    except IsADirectoryError:
        raise errors.InvalidInput(
            f"the passphrase file {path} is a directory",
            hint=PASSPHRASE_HINT,
            code="passphrase-file-unreadable",
        ) from None
    except UnicodeDecodeError:
        raise errors.InvalidInput(
            f"the passphrase file {path} is not UTF-8 text",
            hint=PASSPHRASE_HINT,
            code="passphrase-file-unreadable",
        ) from None
    if not text:
        raise errors.InvalidInput(
            f"the passphrase file {path} is empty",
            hint=PASSPHRASE_HINT,
            code="passphrase-file-empty",
        )
    return text


# --- talking to the server ---------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 < number < 65536:
        raise errors.InvalidInput(
            f"server address {address!r} is not host:port",
            hint="write it as host:port, e.g. config.example.net:443 or [fd00::1]:443",
            code="bad-address",
        )
    return host, number


def _unreachable(address: str, why: object) -> errors.Unavailable:
    return errors.Unavailable(
        f"cannot reach the configuration server at {address}: {why}",
        hint="check that it runs and that the address and port are right",
        code="unreachable",
    )


def fetch_server_certificate(address: str, timeout: float) -> bytes:
    """The certificate (PEM) the server at `address` presents, unverified (first contact).

    The bootstrap client certificate is presented so a server that requires
    client certificates completes the handshake.
    """
    host, port = _split_address(address)
    key_pem, cert_pem = pki.bootstrap_client_credentials()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # first contact; the proofs bind what we saw
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    # The stdlib loads client certificates only from files. The bootstrap key
    # is throwaway (its certificate is signed by a public key), and the files
    # live for the length of this call.
    with tempfile.TemporaryDirectory(prefix="sr-bootstrap-") as tmp:
        (Path(tmp) / "c.pem").write_bytes(cert_pem)
        pki.write_private(Path(tmp) / "k.pem", key_pem)
        context.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            server_hostname = None if _is_ip(host) else host
            with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        raise errors.Unavailable(
            f"the TLS handshake with {address} failed: {exc.reason or exc}",
            hint="check that the address is the configuration server's gRPC port",
            code="handshake-failed",
        ) from exc
    except (OSError, TimeoutError) as exc:
        raise _unreachable(address, exc.strerror or exc) from exc
    if not der:
        raise errors.Unavailable(
            f"the server at {address} presented no certificate",
            hint="check that the address is the configuration server's gRPC port",
            code="handshake-failed",
        )
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target_name_override(host: str, cert: x509.Certificate) -> str | None:
    """A name from `cert` for gRPC's host check when `host` is not among its names.

    Safe because the certificate is pinned as the only root: the check cannot
    let a different server through.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    dns = [d.lower() for d in sans.get_values_for_type(x509.DNSName)]
    ips = sans.get_values_for_type(x509.IPAddress)
    if _is_ip(host):
        if ipaddress.ip_address(host) in ips:
            return None
    elif host.lower().rstrip(".") in dns:
        return None
    if dns:
        return dns[0]
    if ips:
        return str(ips[0])
    cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else None


def enroll(
    *,
    server_address: str,
    passphrase: str,
    role: str,
    state_dir: Path,
    hostname: str,
    sans: Sequence[str],
    timeout: float = 10.0,
) -> AgentCredentials:
    """Enroll with the configuration server and store the identity under `state_dir`.

    Raises a `SiteRecoveryError` on any failure, having written nothing.
    """
    if role not in pki.ENROLLABLE_ROLES:
        raise errors.InvalidInput(
            f"an agent cannot enroll as {role!r}",
            hint=f"use one of: {', '.join(pki.ENROLLABLE_ROLES)}",
            code="bad-role",
        )
    if not passphrase:
        raise errors.InvalidInput("the passphrase is empty", hint=PASSPHRASE_HINT)
    host, _ = _split_address(server_address)
    log.info("enrolling", server=server_address, role=role, hostname=hostname)

    server_pem = fetch_server_certificate(server_address, timeout)
    server_cert = x509.load_pem_x509_certificate(server_pem)
    server_der = pki.cert_der(server_pem)

    key = pki.generate_key()
    key_pem = pki.private_key_pem(key)
    csr_der = pki.build_csr(key, common_name=hostname, sans=sans)
    nonce = secrets.token_bytes(NONCE_BYTES)
    proof_key = passphrase_key(passphrase)
    request = enrollment_pb2.EnrollRequest(
        csr_der=csr_der,
        role=pki.role_to_proto(role),
        hostname=hostname,
        client_nonce=nonce,
        proof=agent_proof(proof_key, nonce=nonce, server_cert_der=server_der, csr_der=csr_der),
    )

    boot_key, boot_cert = pki.bootstrap_client_credentials()
    options: list[tuple[str, str]] = []
    override = _target_name_override(host, server_cert)
    if override:
        options.append(("grpc.ssl_target_name_override", override))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_pem, private_key=boot_key, certificate_chain=boot_cert
    )
    try:
        with grpc.secure_channel(server_address, credentials, options=options) as channel:
            response = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc, target=server_address) from exc  # type: ignore[arg-type]

    credentials_out = _verify_response(
        response,
        proof_key=proof_key,
        nonce=nonce,
        key=key,
        key_pem=key_pem,
        server_pem=server_pem,
        role=role,
        server_address=server_address,
    )
    _store(Path(state_dir), credentials_out)
    log.info("enrolled", server=server_address, agent=credentials_out.identity.id, role=role)
    return credentials_out


def _not_genuine(what: str) -> errors.Integrity:
    return errors.Integrity(
        f"the configuration server's answer does not check out: {what}; nothing was stored",
        hint=(
            "make sure the address is your configuration server and nothing intercepts the "
            "connection, then enroll again"
        ),
        code="enrollment-not-genuine",
    )


def _verify_response(
    response: enrollment_pb2.EnrollResponse,
    *,
    proof_key: bytes,
    nonce: bytes,
    key: object,
    key_pem: bytes,
    server_pem: bytes,
    role: str,
    server_address: str,
) -> AgentCredentials:
    cert_pem = bytes(response.certificate_pem)
    ca_pem = bytes(response.ca_certificate_pem)
    try:
        cert_der = pki.cert_der(cert_pem)
        ca_der = pki.cert_der(ca_pem)
    except errors.Integrity as exc:
        raise _not_genuine("a returned certificate cannot be parsed") from exc
    expected = server_proof(proof_key, nonce=nonce, ca_cert_der=ca_der, issued_cert_der=cert_der)
    if not hmac.compare_digest(expected, bytes(response.proof)):
        raise _not_genuine("the server could not prove it knows the passphrase")
    try:
        pki.verify_issued_by(cert_pem, ca_pem)
        pki.verify_issued_by(server_pem, ca_pem)
    except errors.Integrity as exc:
        raise _not_genuine(exc.message) from exc
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.public_key() != key.public_key():  # type: ignore[attr-defined]
        raise _not_genuine("the certificate is not for this agent's key")
    try:
        identity = pki.identity_from_cert_pem(cert_pem)
    except errors.Unauthenticated as exc:
        raise _not_genuine(exc.message) from exc
    if identity.role != role or identity.id != response.agent_id:
        raise _not_genuine(
            f"the certificate names {identity.uri}, not role {role} and id {response.agent_id}"
        )
    return AgentCredentials(identity, key_pem, cert_pem, ca_pem, server_address)


def _store(state_dir: Path, creds: AgentCredentials) -> None:
    """Write the identity directory in one rename (layout in the module docstring)."""
    created_state_dir = not state_dir.exists()
    pki.make_private_dir(state_dir)
    for stray in state_dir.glob(f".{IDENTITY_DIR}.*"):
        shutil.rmtree(stray, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{IDENTITY_DIR}.new-", dir=state_dir))
    try:
        os.chmod(staging, 0o700)
        pki.write_private(staging / KEY_FILE, creds.key_pem)
        pki.write_private(staging / CERT_FILE, creds.cert_pem)
        pki.write_private(staging / CA_FILE, creds.ca_pem)
        meta = {
            "id": creds.identity.id,
            "role": creds.identity.role,
            "server_address": creds.server_address,
            "enrolled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        pki.write_private(
            staging / IDENTITY_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        )
        final = state_dir / IDENTITY_DIR
        old: Path | None = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{IDENTITY_DIR}.old-", dir=state_dir))
            os.rename(final, old / IDENTITY_DIR)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created_state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        raise errors.Unavailable(
            f"cannot store the agent identity in {state_dir}: {exc.strerror or exc}",
            hint="check free space and permissions, then enroll again",
            code="identity-write-failed",
        ) from exc
