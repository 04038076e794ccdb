"""Operators: people and scripts that use srctl, each with its own client certificate.

`srctl user add NAME --role admin|reader` makes a key on the operator's side,
sends only a certificate request, and gets back a certificate naming a new
identity `op-<name>-<random>` with the role; the store records it (name, role,
identity, serial, validity). A reader may list and watch everything and change
nothing: `common/authz.py` gives every changing RPC to admin alone.

`srctl user remove NAME` revokes the operator's current certificate, by its
identity id (see revocation.py): every port refuses it from then on. Adding
the name again issues a new identity, so the old certificate stays refused.

The configuration server's own `local-admin` (in its state directory) is not
an operator row and cannot be removed: it is how the host's administrator
gets back in.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from cryptography import x509

from siterecovery.common import errors, pki
from siterecovery.common.logging import get_logger
from siterecovery.controller.revocation import Revocations
from siterecovery.controller.store.base import OPERATOR_ROLES, OperatorRecord, Store

log = get_logger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,47}")
VALIDITY_DAYS = 365


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise errors.InvalidInput(
            f"operator name {name!r} is not allowed",
            hint="use 1-48 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="name-invalid",
        )
    return name


def add(store: Store, ca: pki.CertificateAuthority, *, name: str, role: str, csr_der: bytes,
        now: datetime) -> tuple[OperatorRecord, bytes]:
    """Issue a certificate for the operator's CSR and record it; (record, certificate PEM)."""
    check_name(name)
    if role not in OPERATOR_ROLES:
        raise errors.InvalidInput(f"an operator is admin or reader, not {role!r}", code="role-invalid")
    if any(o.name == name for o in store.list_operators()):
        raise errors.Conflict(
            f"operator {name!r} already has a certificate",
            hint=f"remove it first (`srctl user remove {name}`), or choose another name",
            code="operator-exists",
        )
    identity = pki.Identity(id=f"op-{name}-{secrets.token_hex(6)}", role=role)
    cert_pem = ca.issue_from_csr(csr_der, identity=identity, validity_days=VALIDITY_DAYS)
    certificate = x509.load_pem_x509_certificate(cert_pem)
    record = store.add_operator(
        OperatorRecord(
            identity_id=identity.id,
            name=name,
            role=role,
            cert_serial=pki.cert_serial(cert_pem),
            issued_at=now,
            expires_at=certificate.not_valid_after_utc.astimezone(UTC),
        )
    )
    log.info("operator certificate issued", operator=name, role=role, identity=identity.id)
    return record, cert_pem


def remove(store: Store, revocations: Revocations, name: str, *, now: datetime) -> OperatorRecord:
    record = store.revoke_operator(check_name(name), now=now)
    revocations.add(record.identity_id)
    log.info("operator certificate revoked", operator=name, identity=record.identity_id)
    return record
