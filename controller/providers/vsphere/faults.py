"""vSphere faults → this project's errors, and which of them are worth a retry.

pyvmomi raises faults as exceptions (`vim.fault.*`, `vmodl.fault.*`) and
transport failures as `OSError` / `http.client.HTTPException`. The provider
converts them at its edge so callers only ever see `SiteRecoveryError`s.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl

from pyVmomi import vim, vmodl

from siterecovery.common.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    SiteRecoveryError,
    Unauthenticated,
    Unavailable,
)

# Faults after which the same call may well succeed.
TRANSIENT_FAULTS: tuple[type[BaseException], ...] = (
    vmodl.fault.HostCommunication,
    vmodl.fault.SystemError,
    vim.fault.HostConnectFault,
    vim.fault.TaskInProgress,
)


def is_transient(exc: BaseException) -> bool:
    """True for a fault or transport error that a retry may cure (never a TLS trust failure)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, TRANSIENT_FAULTS):
        return True
    return isinstance(exc, OSError | http.client.HTTPException)


def fault_text(exc: BaseException) -> str:
    """A fault's own message, or its type name when it has none."""
    msg = getattr(exc, "msg", "") or ""
    if not msg and isinstance(exc, vmodl.MethodFault):
        msg = ", ".join(m.message for m in getattr(exc, "faultMessage", []) or [] if m.message)
    return msg or type(exc).__name__.rsplit(".", 1)[-1]


def presented_thumbprint(endpoint: str, timeout: float = 5.0) -> str:
    """The SHA-1 thumbprint (AA:BB:...) of the certificate `host:port` presents, or "".

    Read without trusting it, only to tell the user what to verify and pin, the
    way vSphere's own tools show a thumbprint to accept.
    """
    host, _, port = endpoint.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError):
        return ""
    digest = hashlib.sha1(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def translate(exc: BaseException, *, what: str, endpoint: str) -> SiteRecoveryError:
    """Map a pyvmomi or transport failure while doing `what` to our error categories."""
    if isinstance(exc, SiteRecoveryError):
        return exc
    detail = fault_text(exc)
    where = f"{what} on {endpoint}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        presented = presented_thumbprint(endpoint)
        hint = "give its CA file (--ca-file) or its certificate thumbprint (--thumbprint)"
        if presented:
            hint = (
                f"its certificate's SHA-1 thumbprint is {presented}; check it on the host (vSphere Client or "
                f"the ESXi console), then pass --thumbprint {presented}, or give its CA file with --ca-file"
            )
        return Unauthenticated(
            f"{endpoint} presented a certificate we do not trust: {getattr(exc, 'verify_message', None) or exc}",
            hint=hint,
            code="vsphere-untrusted-certificate",
        )
    if isinstance(exc, vim.fault.InvalidLogin):
        return Unauthenticated(
            f"{endpoint} refused the user name or password",
            hint="check the account, then run srctl vcenter update-credentials",
            code="vsphere-invalid-login",
        )
    if isinstance(exc, vim.fault.NoPermission):
        privilege = getattr(exc, "privilegeId", "") or "a privilege"
        return PermissionDenied(
            f"{where}: the account lacks {privilege}",
            hint="update the vCenter credentials with an account that has the needed privileges, then retry",
            code="vsphere-no-permission",
        )
    if isinstance(exc, vim.fault.NotAuthenticated):
        return Unauthenticated(
            f"{where}: the session is no longer valid", hint="retry", code="vsphere-session"
        )
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound | vim.fault.FileNotFound | vim.fault.NotFound):
        return NotFound(
            f"{where}: {detail}", hint="rediscover the endpoint and check the name", code="vsphere-not-found"
        )
    if isinstance(exc, vim.fault.DuplicateName | vim.fault.FileAlreadyExists | vim.fault.AlreadyExists):
        return Conflict(
            f"{where}: {detail}", hint="pick another name or remove the existing one", code="vsphere-conflict"
        )
    if isinstance(exc, vim.fault.InvalidPowerState | vim.fault.InvalidState):
        return PreconditionFailed(
            f"{where}: {detail}", hint="check the VM's power state", code="vsphere-state"
        )
    if isinstance(
        exc, vmodl.fault.InvalidArgument | vim.fault.InvalidDeviceSpec | vim.fault.InvalidDatastorePath
    ):
        return InvalidInput(
            f"{where}: {detail}", hint="check the names and paths given", code="vsphere-invalid"
        )
    if is_transient(exc):
        return Unavailable(
            f"{where} failed: {detail}",
            hint="check that the endpoint is reachable; retrying may help",
            code="vsphere-unreachable",
        )
    return PreconditionFailed(
        f"{where} failed: {detail}", hint="see the vSphere task or event log", code="vsphere-fault"
    )
