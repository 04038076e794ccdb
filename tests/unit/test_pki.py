"""The CA, identities in certificates, SAN checks and the bootstrap CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siterecovery.common import authz, errors, pki
from siterecovery.common.pb import common_pb2


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def ca(tmp_path: Path) -> pki.CertificateAuthority:
    return pki.CertificateAuthority.load_or_create(tmp_path / "ca")


def _csr_with(sans: list[x509.GeneralName]) -> bytes:
    key = pki.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- roles -------------------------------------------------------------------------------------


def test_roles_map_to_the_proto_enum_and_back() -> None:
    assert pki.role_to_proto("source") == common_pb2.ROLE_SOURCE
    assert pki.role_to_proto("process-server") == common_pb2.ROLE_PROCESS_SERVER
    for role in pki.ROLES:
        assert pki.role_from_proto(pki.role_to_proto(role)) == role
    with pytest.raises(errors.InvalidInput):
        pki.role_from_proto(common_pb2.ROLE_UNSPECIFIED)
    with pytest.raises(errors.InvalidInput):
        pki.role_to_proto("root")


def test_identity_rejects_unknown_roles_and_odd_ids() -> None:
    with pytest.raises(errors.InvalidInput):
        pki.Identity(id="a", role="root")
    with pytest.raises(errors.InvalidInput):
        pki.Identity(id="a/b", role="source")
    assert pki.Identity.from_uri("sr://source/abc") == pki.Identity("abc", "source")


# --- the CA ------------------------------------------------------------------------------------


def test_ca_creation_is_idempotent_and_the_key_is_private(tmp_path: Path) -> None:
    first = pki.CertificateAuthority.load_or_create(tmp_path / "ca")
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    second = pki.CertificateAuthority.load_or_create(tmp_path / "ca")
    assert second.cert_pem == first.cert_pem
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    assert not list((tmp_path / "ca").glob("*.tmp"))
    cert = x509.load_pem_x509_certificate(first.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_concurrent_creation_yields_one_ca(tmp_path: Path) -> None:
    results: list[bytes] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait()
        results.append(pki.CertificateAuthority.load_or_create(tmp_path / "ca").cert_pem)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert pki.CertificateAuthority.load_or_create(tmp_path / "ca").cert_pem == results[0]


def test_a_lost_certificate_is_re_signed_with_the_same_key(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    _, cert_pem = ca.issue_keypair(pki.Identity("a1", "source"))
    (tmp_path / "ca" / "ca.crt").unlink()
    again = pki.CertificateAuthority.load_or_create(tmp_path / "ca")
    pki.verify_issued_by(cert_pem, again.cert_pem)  # earlier certificates still chain


def test_a_certificate_without_its_key_is_an_integrity_error(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(errors.Integrity):
        pki.CertificateAuthority.load_or_create(tmp_path / "ca")


def test_issued_certificate_carries_the_identity_and_chains(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    csr = pki.build_csr(key, common_name="host1", sans=["host1.example.net", "10.0.0.5", "::1"])
    identity = pki.Identity(id="0b7c", role="source")
    pem = ca.issue_from_csr(csr, identity=identity)

    assert pki.identity_from_cert_pem(pem) == identity
    pki.verify_issued_by(pem, ca.cert_pem)
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "0b7c"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        pki.agent_dns_name("0b7c"),
        "host1.example.net",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["sr://source/0b7c"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=824) < validity <= dt.timedelta(days=826)


def test_serials_are_random_and_helpers_agree(ca: pki.CertificateAuthority) -> None:
    _, a = ca.issue_keypair(pki.Identity("a", "admin"))
    _, b = ca.issue_keypair(pki.Identity("a", "admin"))
    assert pki.cert_serial(a) != pki.cert_serial(b)
    assert int(pki.cert_serial(a), 16) == x509.load_pem_x509_certificate(a).serial_number
    assert len(pki.cert_fingerprint(a)) == 64


def test_issue_keypair_gives_a_matching_key(ca: pki.CertificateAuthority) -> None:
    key_pem, cert_pem = ca.issue_keypair(
        pki.Identity("configuration-server", "admin"),
        sans=["localhost", "127.0.0.1"],
        validity_days=30,
    )
    key = pki.load_private_key(key_pem)
    assert x509.load_pem_x509_certificate(cert_pem).public_key() == key.public_key()
    assert pki.identity_from_cert_pem(cert_pem).role == pki.ADMIN


def test_config_server_identity_and_cert_has_names(ca: pki.CertificateAuthority) -> None:
    names = [pki.CONFIG_SERVER_NAME, "localhost", "127.0.0.1", "::1", "host_1"]
    _, cert_pem = ca.issue_keypair(
        pki.Identity("configuration-server", pki.CONFIG_SERVER), sans=names
    )
    assert pki.identity_from_cert_pem(cert_pem).role == pki.CONFIG_SERVER
    assert pki.cert_has_names(cert_pem, names)
    assert pki.cert_has_names(cert_pem, ["LOCALHOST", "0:0:0:0:0:0:0:1"])
    assert pki.cert_has_names(cert_pem, [])
    assert not pki.cert_has_names(cert_pem, [*names, "10.0.0.9"])
    assert not pki.cert_has_names(cert_pem, ["not a name"])
    # It names the server (ListServers shows it) but the role table lets it call nothing.
    assert pki.role_to_proto(pki.CONFIG_SERVER) == common_pb2.ROLE_CONFIG_SERVER
    assert not any(authz.allowed(method, pki.CONFIG_SERVER) for method in authz.RPC_ROLES)
    # Only agents get the address-independent agent name.
    assert not pki.cert_has_names(cert_pem, [pki.agent_dns_name("configuration-server")])


@pytest.mark.parametrize(
    "sans",
    [
        [x509.UniformResourceIdentifier("sr://admin/evil")],
        [x509.RFC822Name("a@example.net")],
        [x509.DNSName("bad name")],
        [x509.DNSName("-leading.example.net")],
        [x509.DNSName(f"h{i}.example.net") for i in range(17)],
    ],
    ids=["uri", "email", "space", "hyphen", "too-many"],
)
def test_ca_refuses_bad_sans(ca: pki.CertificateAuthority, sans: list[x509.GeneralName]) -> None:
    with pytest.raises(errors.InvalidInput):
        ca.issue_from_csr(_csr_with(sans), identity=pki.Identity("a", "source"))


def test_build_csr_refuses_invalid_names() -> None:
    with pytest.raises(errors.InvalidInput):
        pki.build_csr(pki.generate_key(), common_name="x", sans=["not a host"])
    with pytest.raises(errors.InvalidInput):
        pki.build_csr(pki.generate_key(), common_name="x", sans=[f"h{i}" for i in range(17)])


def test_csr_with_a_bad_signature_is_refused(ca: pki.CertificateAuthority) -> None:
    csr = bytearray(pki.build_csr(pki.generate_key(), common_name="x", sans=["host"]))
    csr[-3] ^= 0x01  # inside the signature
    with pytest.raises(errors.InvalidInput):
        ca.issue_from_csr(bytes(csr), identity=pki.Identity("a", "source"))


def test_csr_that_is_not_a_csr_is_refused(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(errors.InvalidInput):
        ca.issue_from_csr(b"hello", identity=pki.Identity("a", "source"))


def test_ca_never_issues_enrollee_certificates(ca: pki.CertificateAuthority) -> None:
    csr = pki.build_csr(pki.generate_key(), common_name="x", sans=[])
    with pytest.raises(errors.InvalidInput):
        ca.issue_from_csr(csr, identity=pki.Identity("enrollee", "enrollee"))


def test_verify_issued_by_refuses_another_ca(tmp_path: Path) -> None:
    ours = pki.CertificateAuthority.load_or_create(tmp_path / "ours")
    theirs = pki.CertificateAuthority.load_or_create(tmp_path / "theirs")
    _, cert = theirs.issue_keypair(pki.Identity("a", "source"))
    with pytest.raises(errors.Integrity):
        pki.verify_issued_by(cert, ours.cert_pem)
    with pytest.raises(errors.Integrity):  # a leaf is not a CA
        pki.verify_issued_by(cert, cert)


# --- identities in foreign certificates ---------------------------------------------------------


def _self_signed(sans: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "sans",
    [
        [],
        [x509.DNSName("example.net")],
        [x509.UniformResourceIdentifier("sr://root/x")],
        [x509.UniformResourceIdentifier("sr://source/a/b")],
        [
            x509.UniformResourceIdentifier("sr://source/a"),
            x509.UniformResourceIdentifier("sr://admin/b"),
        ],
    ],
    ids=["no-san", "dns-only", "unknown-role", "extra-slash", "two-identities"],
)
def test_identity_of_a_foreign_certificate_is_refused(sans: list[x509.GeneralName]) -> None:
    with pytest.raises(errors.Unauthenticated):
        pki.identity_from_cert_pem(_self_signed(sans))


def test_garbage_is_not_an_identity() -> None:
    with pytest.raises(errors.Unauthenticated):
        pki.identity_from_cert_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_ca_is_deterministic() -> None:
    pem = pki.bootstrap_ca_pem()
    assert pem == pki.bootstrap_ca_pem()
    # Rebuilt from scratch (caches cleared), it is byte-identical: every process agrees.
    pki._bootstrap_ca.cache_clear()
    pki._bootstrap_key.cache_clear()
    assert pki.bootstrap_ca_pem() == pem
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_bootstrap_client_credentials_are_fresh_short_lived_enrollees() -> None:
    key_a, cert_a = pki.bootstrap_client_credentials()
    key_b, _ = pki.bootstrap_client_credentials()
    assert key_a != key_b
    assert pki.identity_from_cert_pem(cert_a) == pki.Identity("enrollee", "enrollee")
    pki.verify_issued_by(cert_a, pki.bootstrap_ca_pem())
    assert pki.is_bootstrap_certificate(cert_a)
    cert = x509.load_pem_x509_certificate(cert_a)
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    assert cert.public_key() == pki.load_private_key(key_a).public_key()


def test_a_bootstrap_certificate_claiming_another_role_is_refused() -> None:
    # Anyone can derive the bootstrap key, so anyone can mint this; it must not pass as admin.
    key = pki.generate_key()
    forged = pki._leaf_certificate(
        issuer_key=pki._bootstrap_key(),
        issuer=pki._bootstrap_ca(),
        public_key=key.public_key(),
        identity=pki.Identity("mallory", "admin"),
        sans=(),
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    ).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(errors.Unauthenticated):
        pki.identity_from_cert_pem(forged)


def test_write_private_is_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "secret"
    pki.write_private(target, b"one")
    pki.write_private(target, b"two")
    assert target.read_bytes() == b"two"
    assert _mode(target) == 0o600
    assert _mode(tmp_path / "a") == 0o700
    with pytest.raises(FileExistsError):
        pki.write_private(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret"]
