"""A logged-in vSphere API session with trust, re-login and retries.

`Session.call(what, fn)` is the only way the rest of the provider talks to
vSphere: it runs `fn(content)` and

- retries transient faults (transport errors, HostCommunication, …) with
  tenacity by a `RetryPolicy`;
- on `NotAuthenticated` (the session expired or was terminated) logs in again
  once and repeats the call;
- converts every other fault into this project's error categories.

Certificate trust is explicit (`Trust`): a CA file (checked with host name),
a pinned SHA-1/SHA-256 thumbprint, or — for tests only — `insecure`. The
password lives in the `Endpoint` (never in its repr) and is never logged.

The API version is negotiated without pyvmomi's SmartConnect (which skips a
pinned thumbprint while it negotiates): a first stub speaks vSphere 6.0, reads
`about.apiVersion`, and the session then speaks the newest version pyvmomi
knows that the server does too.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity
from pyVmomi import SoapStubAdapter, VmomiSupport, vim

from siterecovery.common.errors import InvalidInput
from siterecovery.common.logging import get_logger
from siterecovery.controller.jobs.engine import RetryPolicy
from siterecovery.controller.providers.vsphere.faults import is_transient, translate

log = get_logger(__name__)

T = TypeVar("T")

BASELINE_VERSION = "vim.version.version10"  # vSphere 6.0: every supported server speaks it
DEFAULT_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.5, max_backoff=8.0)


@dataclass(frozen=True)
class Trust:
    """How the server's certificate is checked: exactly one way, or the system's CAs."""

    ca_file: str = ""
    ca_pem: str = ""  # the CA certificate(s) themselves, as stored by the controller
    thumbprint: str = ""
    insecure: bool = False

    def __post_init__(self) -> None:
        chosen = [bool(self.ca_file), bool(self.ca_pem), bool(self.thumbprint), self.insecure]
        if sum(chosen) > 1:
            raise InvalidInput(
                "give one way to trust the server: a CA file, a thumbprint, or insecure",
                hint="drop the others",
            )
        if self.thumbprint:
            digits = self.thumbprint.replace(":", "")
            if len(digits) not in (40, 64) or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise InvalidInput(
                    f"{self.thumbprint!r} is not a SHA-1 or SHA-256 certificate thumbprint",
                    hint="write it as hex digits, with or without colons",
                )

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure or self.thumbprint:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if self.thumbprint:
                ctx.sslsocket_class = _pinned_socket_class(self.thumbprint)
            return ctx
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        if self.ca_pem:
            try:
                return ssl.create_default_context(cadata=self.ca_pem)
            except ssl.SSLError as exc:
                raise InvalidInput(
                    f"the CA certificate given for the server cannot be loaded: {exc}",
                    hint="give a PEM file with the CA certificate",
                ) from exc
        return ssl.create_default_context()

    def describe(self) -> str:
        if self.insecure:
            return "insecure"
        if self.thumbprint:
            return "thumbprint"
        return "ca" if self.ca_file or self.ca_pem else "system"


def _pinned_socket_class(thumbprint: str) -> type[ssl.SSLSocket]:
    """An SSLSocket that refuses, right after the handshake, a peer whose certificate digest differs.

    We check the pin on every connection ourselves: pyvmomi's own thumbprint
    check runs only after a failed verification, and then turns verification
    off on the shared context for every later connection.
    """
    expected = thumbprint.replace(":", "").lower()
    algorithm = "sha1" if len(expected) == 40 else "sha256"

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            der = self.getpeercert(binary_form=True) or b""
            if hashlib.new(algorithm, der).hexdigest() != expected:
                raise ssl.SSLCertVerificationError(
                    f"the certificate's {algorithm.upper()} thumbprint is not the pinned one"
                )

    return PinnedSocket


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to log in. `host` is a vCenter or a standalone ESXi host."""

    host: str
    username: str
    password: str = field(repr=False)
    port: int = 443
    trust: Trust = field(default_factory=Trust)
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.host or any(c in self.host for c in "/ @"):
            raise InvalidInput(
                f"{self.host!r} is not a host name or address", hint="give e.g. vcenter.example.com"
            )
        if not 0 < self.port < 65536:
            raise InvalidInput(f"port {self.port} is out of range", hint="vCenter and ESXi listen on 443")
        if not self.username:
            raise InvalidInput("the user name is empty", hint="give --user")
        if not self.password:
            raise InvalidInput("the password is empty", hint="give a file that holds the password")

    @property
    def address(self) -> str:
        return self.host if self.port == 443 else f"{self.host}:{self.port}"


def _negotiated_version(api_version: str) -> str:
    """The newest vim25 version pyvmomi knows that is not newer than the server's."""

    def as_tuple(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split(".") if p.isdigit())

    server = as_tuple(api_version)
    for version in VmomiSupport.GetServiceVersions("vim25"):
        known = VmomiSupport.versionIdMap.get(version, "")
        if known and known[0].isdigit() and as_tuple(known) <= server:
            return version
    return BASELINE_VERSION


class Session:
    """One logged-in session; thread-safe for calls, re-logs in when it has expired."""

    def __init__(self, endpoint: Endpoint, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.endpoint = endpoint
        self.retry = retry
        self._lock = threading.Lock()
        self._si: Any = None
        self._content: Any = None
        self.user = ""
        self.logins = 0

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> Session:
        self.call("log in", lambda _content: None)
        return self

    def close(self) -> None:
        with self._lock:
            if self._content is not None:
                try:
                    self._content.sessionManager.Logout()
                except Exception:
                    pass
            self._si = self._content = None

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def content(self) -> Any:
        if self._content is None:
            self.open()
        return self._content

    @property
    def stub(self) -> Any:
        """The current connection, for binding managed object references."""
        return self.content.rootFolder._stub

    @property
    def is_vcenter(self) -> bool:
        return self.content.about.apiType == "VirtualCenter"

    # --- calls ----------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(content)`; retry transient faults, log in again once on NotAuthenticated."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry.max_attempts),
            wait=tenacity.wait_exponential(multiplier=self.retry.initial_backoff, max=self.retry.max_backoff),
            retry=tenacity.retry_if_exception(is_transient),
            reraise=True,
        )
        try:
            return retrying(self._call_once, what, fn)
        except Exception as exc:
            raise translate(exc, what=what, endpoint=self.endpoint.address) from exc

    def _call_once(self, what: str, fn: Callable[[Any], T]) -> T:
        content = self._ensure_login()
        try:
            return fn(content)
        except vim.fault.NotAuthenticated:
            log.info("vsphere.relogin", endpoint=self.endpoint.address, during=what)
            content = self._ensure_login(force=True)
            return fn(content)

    def keepalive(self) -> None:
        """Touch the session so that the server does not expire it (re-logs in if it did)."""
        self.call("keep the session alive", lambda content: content.sessionManager.currentSession)

    # --- login ----------------------------------------------------------------------

    def _stub(self, version: str) -> Any:
        ep = self.endpoint
        return SoapStubAdapter(
            host=ep.host,
            port=ep.port,
            version=version,
            sslContext=ep.trust.ssl_context(),
            httpConnectionTimeout=ep.timeout,
        )

    def _ensure_login(self, *, force: bool = False) -> Any:
        with self._lock:
            if self._content is not None and not force:
                return self._content
            ep = self.endpoint
            first = vim.ServiceInstance("ServiceInstance", self._stub(BASELINE_VERSION))
            about = first.RetrieveContent().about
            si = vim.ServiceInstance("ServiceInstance", self._stub(_negotiated_version(about.apiVersion)))
            content = si.RetrieveContent()
            user_session = content.sessionManager.Login(ep.username, ep.password)
            self._si, self._content = si, content
            self.user = user_session.userName
            self.logins += 1
            log.info(
                "vsphere.login",
                endpoint=ep.address,
                api=about.apiType,
                version=about.apiVersion,
                trust=ep.trust.describe(),
            )
            return content
