"""Certificates, keys and identities: the configuration server's CA and the bootstrap CA.

Identities
    Every certificate our CA issues names exactly one identity in a URI SAN
    ``sr://<role>/<id>``; the subject CN repeats the id for humans. Interceptors
    read it with `identity_from_cert_pem` on every RPC (cached on the PEM bytes).
    Roles are those of the proto enum `Role` plus ``config-server``, which only
    names the configuration server's serving certificate and is no caller role.

Names
    The serving certificate carries `CONFIG_SERVER_NAME` and every agent
    certificate carries `agent_dns_name(id)`, so a client can reach a server at
    any address and still check, by TLS name, which server answered.

Our CA (`CertificateAuthority`)
    An EC P-256 key and a self-signed certificate kept in one directory::

        <directory>/            0700
            ca.key              0600  PKCS#8 PEM, unencrypted (the directory is the boundary)
            ca.crt              0644  PEM

    The key is written first, the certificate second, each to a temporary file
    in the same directory that is then linked into place only if the name does
    not exist yet. A crash leaves: nothing; a stray ``.tmp`` file (ignored);
    the key without the certificate (the next start signs a new certificate
    for the same key and name, so nothing issued earlier is invalidated); or
    both. Two processes starting together end up with the same pair: the loser
    of each race loads what the winner linked.

The bootstrap CA — public by design
    Python gRPC cannot make a client certificate optional, and every port must
    refuse a client that has no certificate from a CA we trust. A new agent has
    no certificate yet, so the configuration server's port trusts a second
    root, the *bootstrap CA*, whose private key is derived from the public
    constant `BOOTSTRAP_SEED`. **Anyone can derive that key**, and that is the
    point: a bootstrap certificate proves nothing about who the caller is. It
    only gets a TLS handshake done so the caller can reach `Enrollment.Enroll`,
    where the connection passphrase (which never travels; see
    `siterecovery.common.enrollment`) is what authorises anything.

    What keeps this safe:

    * Only the configuration server's port trusts the bootstrap CA; agent and
      data-plane ports trust our CA alone.
    * `identity_from_cert_pem` refuses a bootstrap-signed certificate that
      claims any role but ``enrollee`` (anyone could mint one claiming
      ``admin``), and the interceptor lets ``enrollee`` call nothing but
      ``Enroll``.
    * Our CA never issues an ``enrollee`` certificate.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siterecovery.common import errors
from siterecovery.common.pb import common_pb2

# --- roles and identities ----------------------------------------------------------------------

SOURCE = "source"
PROCESS_SERVER = "process-server"
MASTER_TARGET = "master-target"
ADMIN = "admin"
READER = "reader"
ENROLLEE = "enrollee"

# The roles callers carry, each with its value in the proto enum `common_pb2.Role`.
ROLES: tuple[str, ...] = (SOURCE, PROCESS_SERVER, MASTER_TARGET, ADMIN, READER, ENROLLEE)
# The roles an agent may ask for with the connection passphrase.
ENROLLABLE_ROLES: tuple[str, ...] = (SOURCE, PROCESS_SERVER, MASTER_TARGET)
# The configuration server's own serving certificate. Not a caller role (the
# authorisation table grants it nothing); it names the server, and ListServers shows
# the server with it (proto ROLE_CONFIG_SERVER).
CONFIG_SERVER = "config-server"
IDENTITY_ROLES: tuple[str, ...] = (*ROLES, CONFIG_SERVER)

# DNS names that do not depend on addresses. The configuration server's certificate
# carries CONFIG_SERVER_NAME and clients check it (grpc.ssl_target_name_override), so
# the server can be reached at any address. Every agent certificate carries
# agent_dns_name(id), so a peer dialling an agent can check which agent answered.
DNS_SUFFIX = "siterecovery.internal"
CONFIG_SERVER_NAME = f"config-server.{DNS_SUFFIX}"


def agent_dns_name(agent_id: str) -> str:
    """The DNS name in agent `agent_id`'s certificate: ``<id>.agents.siterecovery.internal``."""
    return f"{agent_id.lower()}.agents.{DNS_SUFFIX}"


_ROLE_TO_PROTO: dict[str, int] = {
    SOURCE: common_pb2.ROLE_SOURCE,
    PROCESS_SERVER: common_pb2.ROLE_PROCESS_SERVER,
    MASTER_TARGET: common_pb2.ROLE_MASTER_TARGET,
    ADMIN: common_pb2.ROLE_ADMIN,
    READER: common_pb2.ROLE_READER,
    ENROLLEE: common_pb2.ROLE_ENROLLEE,
    CONFIG_SERVER: common_pb2.ROLE_CONFIG_SERVER,
}
_PROTO_TO_ROLE: dict[int, str] = {value: name for name, value in _ROLE_TO_PROTO.items()}


def role_to_proto(role: str) -> int:
    """``"source"`` → ``common_pb2.ROLE_SOURCE``."""
    try:
        return _ROLE_TO_PROTO[role]
    except KeyError:
        raise errors.InvalidInput(
            f"unknown role {role!r}", hint=f"use one of: {', '.join(ROLES)}", code="unknown-role"
        ) from None


def role_from_proto(value: int) -> str:
    """``common_pb2.ROLE_SOURCE`` → ``"source"``; ROLE_UNSPECIFIED and unknown values are refused."""
    try:
        return _PROTO_TO_ROLE[value]
    except KeyError:
        raise errors.InvalidInput(
            f"role {value} is unspecified or unknown",
            hint=f"set the role to one of: {', '.join(ROLES)}",
            code="unknown-role",
        ) from None


_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
URI_SCHEME = "sr"


@dataclass(frozen=True)
class Identity:
    id: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in IDENTITY_ROLES:
            raise errors.InvalidInput(
                f"unknown role {self.role!r}", hint=f"use one of: {', '.join(IDENTITY_ROLES)}"
            )
        if not _ID_RE.fullmatch(self.id):
            raise errors.InvalidInput(
                f"identity id {self.id!r} is not valid",
                hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.role}/{self.id}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix) or uri.count("/") != 3:
            raise ValueError(f"not an identity URI: {uri!r}")
        role, _, ident = uri[len(prefix) :].partition("/")
        return cls(id=ident, role=role)


@functools.lru_cache(maxsize=4096)
def identity_from_cert_pem(pem: bytes) -> Identity:
    """The identity a certificate names; `Unauthenticated` when it names none or lies.

    Call this only on a certificate the TLS handshake already verified against
    our roots: it checks the identity, not the chain. A certificate signed by
    the (public) bootstrap key may only claim the ``enrollee`` role.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise errors.Unauthenticated(
            "the peer certificate cannot be parsed", code="bad-certificate"
        ) from exc
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u
            for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{URI_SCHEME}://")
        ]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise errors.Unauthenticated(
            "the peer certificate names no siterecovery identity",
            hint="use a certificate issued by this configuration server's CA (enroll the agent)",
            code="no-identity",
        )
    try:
        identity = Identity.from_uri(uris[0])
    except (ValueError, errors.InvalidInput) as exc:
        raise errors.Unauthenticated(
            f"the peer certificate names a malformed identity {uris[0]!r}",
            hint="use a certificate issued by this configuration server's CA (enroll the agent)",
            code="no-identity",
        ) from exc
    if identity.role != ENROLLEE and _signed_by(cert, _bootstrap_key().public_key()):
        raise errors.Unauthenticated(
            f"a bootstrap certificate claims the role {identity.role!r}",
            hint="bootstrap certificates may only enroll; enroll to get a real certificate",
            code="forged-identity",
        )
    return identity


# --- keys and CSRs -----------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.Integrity("the private key is not an EC key", code="bad-key")
    return key


MAX_SANS = 16
# Letters, digits and hyphens (RFC 1123), plus '_', which real host names sometimes
# carry and TLS name matching accepts.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _parse_san(name: str) -> x509.GeneralName:
    """A DNS name or an IP address as a GeneralName; `InvalidInput` when it is neither."""
    name = name.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    host = name.removesuffix(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(p) for p in host.split(".")):
        raise errors.InvalidInput(
            f"{name!r} is neither a DNS name nor an IP address",
            hint="list host names (letters, digits, '-', dots) or IP addresses",
            code="bad-san",
        )
    return x509.DNSName(host.lower())


def _check_sans(sans: Sequence[x509.GeneralName]) -> list[x509.GeneralName]:
    if len(sans) > MAX_SANS:
        raise errors.InvalidInput(
            f"{len(sans)} subject alternative names requested; at most {MAX_SANS} are allowed",
            hint="list only the names and addresses this machine is reached at",
            code="too-many-sans",
        )
    out: list[x509.GeneralName] = []
    for san in sans:
        if isinstance(san, x509.DNSName):
            checked = _parse_san(san.value)
        elif isinstance(san, x509.IPAddress):
            if not isinstance(san.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise errors.InvalidInput(
                    f"IP network {san.value} is not an address", code="bad-san"
                )
            checked = san
        else:
            raise errors.InvalidInput(
                f"subject alternative name {san!r} is not a DNS name or an IP address",
                hint="a CSR may carry only DNS names and IP addresses; the identity is added by the CA",
                code="bad-san",
            )
        if checked not in out:
            out.append(checked)
    return out


def build_csr(key: ec.EllipticCurvePrivateKey, *, common_name: str, sans: Sequence[str]) -> bytes:
    """A PKCS#10 request (DER) for `key`; `sans` are DNS names or IP addresses."""
    names = _check_sans([_parse_san(s) for s in sans])
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "agent")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- files -------------------------------------------------------------------------------------


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically with mode 0600; missing parents are made 0700.

    The data goes to a 0600 temporary file in the same directory first, then
    `os.replace` puts it in place. With ``exclusive=True`` it is linked into
    place instead and `FileExistsError` is raised when `path` already exists,
    so of two concurrent creators exactly one wins.
    """
    path = Path(path)
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(path.parent)


def load_or_create_key_file(path: Path, size: int = 32) -> bytes:
    """The random key in `path`, made (`size` bytes, 0600, exclusively) when missing.

    Of two processes making it at once, one wins and both use its key.
    """
    path = Path(path)
    if not path.exists():
        try:
            write_private(path, os.urandom(size), exclusive=True)
        except FileExistsError:
            pass  # another process made it first: use theirs
    return path.read_bytes()


def make_private_dir(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700; existing ones are left alone."""
    directory = Path(directory)
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- certificates ------------------------------------------------------------------------------


def _load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise errors.Integrity("the certificate cannot be parsed", code="bad-certificate") from exc


def cert_der(pem: bytes) -> bytes:
    return _load_cert(pem).public_bytes(serialization.Encoding.DER)


def cert_fingerprint(pem: bytes) -> str:
    """SHA-256 of the DER certificate, lower-case hex."""
    return hashlib.sha256(cert_der(pem)).hexdigest()


def cert_has_names(pem: bytes, names: Sequence[str]) -> bool:
    """Whether the certificate's SANs include every DNS name / IP address in `names`."""
    try:
        sans = _load_cert(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return not names
    except errors.Integrity:
        return False
    present = {
        *(x509.DNSName(d.lower()) for d in sans.value.get_values_for_type(x509.DNSName)),
        *(x509.IPAddress(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)),
    }
    try:
        wanted = {_parse_san(n) for n in names}
    except errors.InvalidInput:
        return False
    return wanted <= present


def cert_serial(pem: bytes) -> str:
    """The serial number, lower-case hex."""
    return format(_load_cert(pem).serial_number, "x")


def _signed_by(cert: x509.Certificate, public_key: object) -> bool:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                ec.ECDSA(cert.signature_hash_algorithm),
            )
            return True
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        pass
    return False


def verify_issued_by(cert_pem: bytes, ca_pem: bytes) -> None:
    """Check that `ca_pem` (a CA certificate) signed `cert_pem`; `Integrity` otherwise.

    Checks the issuer name and the signature, and that the issuer is a CA. It
    does not check validity dates.
    """
    cert = _load_cert(cert_pem)
    ca = _load_cert(ca_pem)
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise errors.Integrity("the issuing certificate is not a CA", code="not-a-ca")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise errors.Integrity(
            f"the certificate for {cert.subject.rfc4514_string()!r} was not issued by "
            f"{ca.subject.rfc4514_string()!r}",
            code="wrong-issuer",
        ) from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# Tolerate clocks that run a little behind the CA's.
_BACKDATE = dt.timedelta(minutes=5)


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    deterministic: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=deterministic or None)


def _leaf_certificate(
    *,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    public_key: object,
    identity: Identity,
    sans: Sequence[x509.GeneralName],
    not_after: dt.datetime,
    server_auth: bool = True,
) -> x509.Certificate:
    now = _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_auth:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.id)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(not_after, issuer.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([*sans, x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _check_public_key(public_key: object) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        supported = public_key.curve.name in ("secp256r1", "secp384r1")
    elif isinstance(public_key, rsa.RSAPublicKey):
        supported = public_key.key_size >= 2048
    else:
        supported = False
    if supported:
        return
    raise errors.InvalidInput(
        "the CSR's key type is not supported",
        hint="use an EC P-256 key (what the siterecovery agent generates)",
        code="bad-key",
    )


class CertificateAuthority:
    """The configuration server's CA. See the module docstring for the on-disk layout."""

    KEY_FILE = "ca.key"
    CERT_FILE = "ca.crt"
    VALIDITY_DAYS = 20 * 365

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if key.public_key() != cert.public_key():
            raise errors.Integrity(
                "the CA certificate does not belong to the CA key",
                hint="restore ca.key and ca.crt from the same backup",
                code="ca-mismatch",
            )
        self._key = key
        self._cert = cert
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(
        cls, directory: Path, *, name: str = "siterecovery CA"
    ) -> CertificateAuthority:
        directory = Path(directory)
        make_private_dir(directory)
        key_path = directory / cls.KEY_FILE
        cert_path = directory / cls.CERT_FILE
        if not key_path.exists():
            if cert_path.exists():
                raise errors.Integrity(
                    f"{cert_path} exists but {key_path} does not",
                    hint="restore ca.key from the backup; without it nothing can be signed",
                    code="ca-key-missing",
                )
            try:
                write_private(key_path, private_key_pem(generate_key()), exclusive=True)
            except FileExistsError:
                pass  # another process created it first: use theirs
        try:
            key = load_private_key(key_path.read_bytes())
        except ValueError as exc:
            raise errors.Integrity(
                f"{key_path} is not a readable private key",
                hint="restore ca.key from the backup",
                code="ca-key-corrupt",
            ) from exc
        if not cert_path.exists():
            now = _now()
            cert = _ca_certificate(
                key,
                name,
                serial=x509.random_serial_number(),
                not_before=now - _BACKDATE,
                not_after=now + dt.timedelta(days=cls.VALIDITY_DAYS),
            )
            try:
                write_private(
                    cert_path, cert.public_bytes(serialization.Encoding.PEM), exclusive=True
                )
                os.chmod(cert_path, 0o644)
            except FileExistsError:
                pass
        return cls(key, _load_cert(cert_path.read_bytes()))

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def issue_from_csr(
        self, csr_der: bytes, *, identity: Identity, validity_days: int = 825
    ) -> bytes:
        """Sign a certificate (PEM) for the CSR's key naming `identity`.

        The CSR's subject is ignored (CN becomes the id); its DNS and IP SANs are
        kept; any other SAN, more than `MAX_SANS` names, a bad signature or an
        unsupported key type is `InvalidInput`. An agent's certificate also gets
        the DNS name `agent_dns_name(id)` and the identity URI.
        """
        if identity.role == ENROLLEE:
            raise errors.InvalidInput(
                "the CA does not issue enrollee certificates", code="bad-role"
            )
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as exc:
            raise errors.InvalidInput(
                "the certificate request is not a DER PKCS#10 CSR", code="bad-csr"
            ) from exc
        if not csr.is_signature_valid:
            raise errors.InvalidInput(
                "the certificate request's signature does not match its key", code="bad-csr"
            )
        public_key = csr.public_key()
        _check_public_key(public_key)
        try:
            requested = list(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            )
        except x509.ExtensionNotFound:
            requested = []
        except ValueError as exc:
            raise errors.InvalidInput(
                "the certificate request's extensions cannot be parsed", code="bad-csr"
            ) from exc
        sans = _check_sans(requested)
        return self._issue(public_key, identity, sans, validity_days)

    def issue_keypair(
        self, identity: Identity, *, sans: Sequence[str] = (), validity_days: int = 825
    ) -> tuple[bytes, bytes]:
        """A fresh key and a certificate for it: (key PEM, certificate PEM)."""
        if identity.role == ENROLLEE:
            raise errors.InvalidInput(
                "the CA does not issue enrollee certificates", code="bad-role"
            )
        key = generate_key()
        names = _check_sans([_parse_san(s) for s in sans])
        return private_key_pem(key), self._issue(key.public_key(), identity, names, validity_days)

    def _issue(
        self,
        public_key: object,
        identity: Identity,
        sans: Sequence[x509.GeneralName],
        validity_days: int,
    ) -> bytes:
        if not 1 <= validity_days <= 3650:
            raise errors.InvalidInput(
                f"validity of {validity_days} days is out of range (1..3650)", code="bad-validity"
            )
        if identity.role in ENROLLABLE_ROLES:
            own = _parse_san(agent_dns_name(identity.id))
            sans = [own, *(san for san in sans if san != own)]
        cert = _leaf_certificate(
            issuer_key=self._key,
            issuer=self._cert,
            public_key=public_key,
            identity=identity,
            sans=sans,
            not_after=_now() + dt.timedelta(days=validity_days),
        )
        return cert.public_bytes(serialization.Encoding.PEM)


# --- the bootstrap CA (public by design; see the module docstring) -----------------------------

BOOTSTRAP_SEED = (
    b"siterecovery bootstrap CA v1. This key is public by design: it lets a new agent "
    b"complete a TLS handshake to call Enrollment.Enroll and grants nothing else."
)
BOOTSTRAP_CA_NAME = "siterecovery bootstrap CA (public key, enrollment only)"
ENROLLEE_ID = "enrollee"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@functools.lru_cache(maxsize=1)
def _bootstrap_key() -> ec.EllipticCurvePrivateKey:
    material = HKDF(
        algorithm=hashes.SHA256(), length=48, salt=b"siterecovery-bootstrap-v1", info=b"p256"
    ).derive(BOOTSTRAP_SEED)
    scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


@functools.lru_cache(maxsize=1)
def _bootstrap_ca() -> x509.Certificate:
    # Fixed fields and a deterministic (RFC 6979) signature: every process
    # derives the byte-identical certificate.
    return _ca_certificate(
        _bootstrap_key(),
        BOOTSTRAP_CA_NAME,
        serial=1,
        not_before=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        deterministic=True,
    )


def bootstrap_ca_pem() -> bytes:
    """The bootstrap CA certificate (PEM), the same in every process."""
    return _bootstrap_ca().public_bytes(serialization.Encoding.PEM)


def bootstrap_client_credentials() -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for a one-hour ``sr://enrollee/enrollee`` client certificate."""
    key = generate_key()
    cert = _leaf_certificate(
        issuer_key=_bootstrap_key(),
        issuer=_bootstrap_ca(),
        public_key=key.public_key(),
        identity=Identity(id=ENROLLEE_ID, role=ENROLLEE),
        sans=(),
        not_after=_now() + dt.timedelta(hours=1),
        server_auth=False,
    )
    return private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def is_bootstrap_certificate(pem: bytes) -> bool:
    """Whether the bootstrap key signed this certificate."""
    return _signed_by(_load_cert(pem), _bootstrap_key().public_key())
