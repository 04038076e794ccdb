"""Enrollment, server side: check the agent's proof, issue its certificate.

The protocol and the proofs are described in `siterecovery.common.enrollment`.
This module holds the domain logic the Enrollment servicer calls:

* `PassphraseVault` keeps the connection passphrase in one JSON file::

      <path>   0600   {"passphrase": "...", "created_at": "2026-01-01T00:00:00+00:00"}

  written atomically (temporary file + rename), so a crash leaves the old or
  the new passphrase, never a torn file. It is read on every `current()`, so
  ``srctl passphrase rotate`` in another process takes effect at once.
* `FailureLimiter` counts wrong passphrases per peer host. It lives in the
  process's memory: with several controller replicas each keeps its own
  count, so a host may try (replicas x max_failures) times per window.
* `NonceRegistry` remembers the client nonces of accepted enrollments for a
  day, in the store (shared by replicas, kept across restarts), so the same
  signed request sent again (a replay) is refused. A replayed request could
  only ever get a certificate for the public key in the recorded CSR, of no use
  without the agent's private key; refusing it keeps a captured request from
  filling the store with server rows.
* `enroll_agent` checks one request and returns what the servicer sends back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from siterecovery.common import errors, pki
from siterecovery.common.enrollment import (
    NONCE_BYTES,
    PASSPHRASE_HINT,
    agent_proof,
    passphrase_key,
    server_proof,
)
from siterecovery.common.logging import get_logger
from siterecovery.controller.store.base import Store

log = get_logger(__name__)


# --- rate limiting -----------------------------------------------------------------------------


class FailureLimiter:
    """Refuses a peer host for `lockout_seconds` once it failed `max_failures` times in a window.

    Thread-safe. `clock` returns seconds (monotonic); tests inject their own.
    """

    # Bound the memory an attacker with many addresses can make us spend.
    MAX_TRACKED_HOSTS = 10_000

    def __init__(
        self,
        max_failures: int = 5,
        window_seconds: float = 60,
        lockout_seconds: float = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_seconds <= 0 or lockout_seconds <= 0:
            raise ValueError("max_failures, window_seconds and lockout_seconds must be positive")
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.lockout_seconds = lockout_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def check(self, peer_host: str) -> None:
        """Raise `RateLimited` while `peer_host` is locked out."""
        with self._lock:
            now = self._clock()
            until = self._locked_until.get(peer_host)
            if until is None:
                return
            if now >= until:
                del self._locked_until[peer_host]
                return
            wait = max(1, math.ceil(until - now))
        log.warning("enrollment refused: host locked out", peer=peer_host, retry_in_s=wait)
        raise errors.RateLimited(
            f"too many wrong passphrases from {peer_host}; enrollment from this host is refused "
            f"for another {wait} s",
            hint=f"retry in {wait} s, with the passphrase from `srctl passphrase show`",
            code="enrollment-locked-out",
        )

    def record_failure(self, peer_host: str) -> None:
        with self._lock:
            now = self._clock()
            self._prune(now)
            window = self._failures.setdefault(peer_host, deque())
            window.append(now)
            while window and window[0] <= now - self.window_seconds:
                window.popleft()
            if len(window) >= self.max_failures:
                self._locked_until[peer_host] = now + self.lockout_seconds
                del self._failures[peer_host]
                locked = True
            else:
                locked = False
        if locked:
            log.warning(
                "host locked out of enrollment", peer=peer_host, lockout_s=self.lockout_seconds
            )

    def _prune(self, now: float) -> None:
        if len(self._failures) + len(self._locked_until) < self.MAX_TRACKED_HOSTS:
            return
        for host, window in list(self._failures.items()):
            if not window or window[-1] <= now - self.window_seconds:
                del self._failures[host]
        for host, until in list(self._locked_until.items()):
            if until <= now:
                del self._locked_until[host]
        while len(self._failures) >= self.MAX_TRACKED_HOSTS:  # still full: forget the oldest
            del self._failures[next(iter(self._failures))]


class NonceRegistry:
    """The client nonces of accepted enrollments, kept a day in the store.

    Only nonces of requests whose proof checked out are kept, so an attacker
    without the passphrase cannot fill it. The store is shared by every replica
    and survives restarts, so a captured request cannot be replayed to another
    replica or after a restart either. Nonces are kept as SHA-256 digests.
    """

    def __init__(self, store: Store, keep_seconds: float = 86_400, clock: Callable[[], dt.datetime] | None = None):
        self.store = store
        self.keep_seconds = keep_seconds
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def claim(self, nonce: bytes) -> bool:
        """Remember `nonce`; False when it was seen already (the request is a replay)."""
        digest = hashlib.sha256(nonce).hexdigest()
        return self.store.claim_enrollment_nonce(digest, now=self._clock(), keep_seconds=self.keep_seconds)


def host_of_peer(grpc_peer: str) -> str:
    """The host part of `grpc.ServicerContext.peer()`: ``ipv4:10.0.0.5:5123`` → ``10.0.0.5``."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv6":
        match = re.fullmatch(r"\[(.*)\](?::\d+)?", rest)
        if match:
            return match.group(1).split("%")[0]
        return rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return grpc_peer  # unix sockets and the like: one bucket per peer string


# --- the passphrase ----------------------------------------------------------------------------


class PassphraseVault:
    """The connection passphrase, in a 0600 JSON file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load_or_create(self) -> str:
        if not self.path.exists():
            try:
                pki.write_private(self.path, self._encode(self._generate()), exclusive=True)
                log.info("connection passphrase created", path=str(self.path))
            except FileExistsError:
                pass  # another process made it first; use theirs
        return self.current()

    def current(self) -> str:
        return self._read()["passphrase"]

    def rotate(self) -> str:
        passphrase = self._generate()
        pki.write_private(self.path, self._encode(passphrase))
        log.info("connection passphrase rotated", path=str(self.path))
        return passphrase

    @property
    def created_at(self) -> dt.datetime:
        """When the current passphrase was made (UTC)."""
        return dt.datetime.fromisoformat(self._read()["created_at"])

    @staticmethod
    def _generate() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def _encode(passphrase: str) -> bytes:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return (json.dumps({"passphrase": passphrase, "created_at": now}) + "\n").encode()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            if not isinstance(data.get("passphrase"), str) or not data["passphrase"]:
                raise ValueError("no passphrase")
            dt.datetime.fromisoformat(data["created_at"])
        except FileNotFoundError:
            raise errors.PreconditionFailed(
                f"no connection passphrase yet ({self.path} does not exist)",
                hint="start the configuration server once, or run `srctl passphrase rotate`",
                code="no-passphrase",
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise errors.Integrity(
                f"the passphrase file {self.path} is damaged",
                hint="run `srctl passphrase rotate` and give agents the new passphrase",
                code="passphrase-corrupt",
            ) from exc
        return data


# --- enrolling ---------------------------------------------------------------------------------


@dataclass
class EnrollmentResult:
    """What the servicer sends back in `EnrollResponse`."""

    agent_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    proof: bytes


def _check_hostname(hostname: str) -> None:
    if not 1 <= len(hostname) <= 253 or any(
        ch.isspace() or not ch.isprintable() for ch in hostname
    ):
        raise errors.InvalidInput(
            "the hostname must be 1 to 253 printable characters without spaces",
            hint="send the machine's host name",
            code="bad-hostname",
        )


def enroll_agent(
    *,
    ca: pki.CertificateAuthority,
    passphrase: str,
    server_cert_pem: bytes,
    limiter: FailureLimiter,
    peer_host: str,
    csr_der: bytes,
    role: str,
    hostname: str,
    client_nonce: bytes,
    proof: bytes,
    record: Callable[[pki.Identity, str, bytes], None],
    nonces: NonceRegistry | None = None,
) -> EnrollmentResult:
    """Check an enrollment request and issue the agent's certificate.

    `server_cert_pem` is the certificate this server presents on the port the
    request arrived on (the agent's proof is bound to it). `record(identity,
    hostname, cert_pem)` stores the server row; it runs before the answer is
    built, so an agent never holds a certificate the store does not know.
    """
    limiter.check(peer_host)
    if role not in pki.ENROLLABLE_ROLES:
        raise errors.InvalidInput(
            f"role {role!r} cannot be obtained by enrollment",
            hint=f"enroll as one of: {', '.join(pki.ENROLLABLE_ROLES)}",
            code="bad-role",
        )
    if len(client_nonce) != NONCE_BYTES:
        raise errors.InvalidInput(
            f"the client nonce must be {NONCE_BYTES} bytes, not {len(client_nonce)}",
            code="bad-nonce",
        )
    _check_hostname(hostname)
    try:
        x509.load_der_x509_csr(csr_der)
    except ValueError as exc:
        raise errors.InvalidInput(
            "the certificate request is not a DER PKCS#10 CSR", code="bad-csr"
        ) from exc

    key = passphrase_key(passphrase)
    expected = agent_proof(
        key, nonce=client_nonce, server_cert_der=pki.cert_der(server_cert_pem), csr_der=csr_der
    )
    if not hmac.compare_digest(expected, proof):
        limiter.record_failure(peer_host)
        log.warning("enrollment refused: wrong passphrase", peer=peer_host, hostname=hostname)
        raise errors.Unauthenticated(
            "the connection passphrase is wrong", hint=PASSPHRASE_HINT, code="wrong-passphrase"
        )

    if nonces is not None and not nonces.claim(bytes(client_nonce)):
        log.warning("enrollment refused: replayed request", peer=peer_host, hostname=hostname)
        raise errors.Unauthenticated(
            "this enrollment request was used already (a replay); nothing was issued",
            hint="an agent sends a fresh nonce each time: start the agent again to enroll",
            code="enrollment-replayed",
        )
    identity = pki.Identity(id=str(uuid.uuid4()), role=role)
    cert_pem = ca.issue_from_csr(csr_der, identity=identity)
    record(identity, hostname, cert_pem)
    log.info(
        "agent enrolled",
        agent=identity.id,
        role=role,
        hostname=hostname,
        peer=peer_host,
        serial=pki.cert_serial(cert_pem),
    )
    return EnrollmentResult(
        agent_id=identity.id,
        certificate_pem=cert_pem,
        ca_certificate_pem=ca.cert_pem,
        proof=server_proof(
            key,
            nonce=client_nonce,
            ca_cert_der=pki.cert_der(ca.cert_pem),
            issued_cert_der=pki.cert_der(cert_pem),
        ),
    )
