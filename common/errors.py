"""One error hierarchy for every process and for srctl.

Each category carries the gRPC status it travels as, the exit code srctl ends
with, and whether retrying may help. A message says what happened; `hint` says
what to do next. Errors cross the wire as a status plus two trailing metadata
entries (`sr-error-code`, `sr-error-hint`) and are rebuilt on the other side by
`from_rpc_error`, so a client sees the same class the server raised.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

CODE_KEY = "sr-error-code"
HINT_KEY = "sr-error-hint"


class SiteRecoveryError(Exception):
    """Base of every error this project raises on purpose."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    exit_code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False
    category: ClassVar[str] = "error"

    def __init__(self, message: str, *, hint: str = "", code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # A stable, machine-readable name for this particular failure.
        self.code = code or self.category

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CODE_KEY, self.code), (HINT_KEY, self.hint))


class InvalidInput(SiteRecoveryError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2
    category = "invalid-input"


class NotFound(SiteRecoveryError):
    status = grpc.StatusCode.NOT_FOUND
    exit_code = 3
    category = "not-found"


class Conflict(SiteRecoveryError):
    status = grpc.StatusCode.ABORTED
    exit_code = 4
    category = "conflict"


class PreconditionFailed(SiteRecoveryError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 5
    category = "precondition-failed"


class Unavailable(SiteRecoveryError):
    status = grpc.StatusCode.UNAVAILABLE
    exit_code = 6
    retryable = True
    category = "unavailable"


class Integrity(SiteRecoveryError):
    """Data did not check out (checksum, signature, proof)."""

    status = grpc.StatusCode.DATA_LOSS
    exit_code = 7
    category = "integrity"


class Unauthenticated(SiteRecoveryError):
    status = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 8
    category = "unauthenticated"


class PermissionDenied(SiteRecoveryError):
    status = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 9
    category = "permission-denied"


class RateLimited(SiteRecoveryError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 10
    retryable = True
    category = "rate-limited"


class Internal(SiteRecoveryError):
    status = grpc.StatusCode.INTERNAL
    exit_code = 11
    category = "internal"


CATEGORIES: tuple[type[SiteRecoveryError], ...] = (
    InvalidInput,
    NotFound,
    Conflict,
    PreconditionFailed,
    Unavailable,
    Integrity,
    Unauthenticated,
    PermissionDenied,
    RateLimited,
    Internal,
)
_BY_STATUS = {cls.status: cls for cls in CATEGORIES}
# gRPC raises these itself (deadlines, transport); map them onto our categories.
_BY_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable
_BY_STATUS[grpc.StatusCode.ALREADY_EXISTS] = Conflict
_BY_STATUS[grpc.StatusCode.OUT_OF_RANGE] = InvalidInput
_BY_STATUS[grpc.StatusCode.CANCELLED] = Unavailable

EXIT_CODES: dict[str, int] = {"ok": 0, **{cls.category: cls.exit_code for cls in CATEGORIES}}


def abort(context: grpc.ServicerContext, error: SiteRecoveryError) -> None:
    """End an RPC with `error`, keeping its code and hint for the client."""
    context.set_trailing_metadata(error.trailing_metadata())
    context.abort(error.status, error.message)


def from_rpc_error(error: grpc.RpcError, *, target: str = "") -> SiteRecoveryError:
    """Rebuild the typed error a server raised; transport failures become Unavailable."""
    status = error.code()
    details = error.details() or status.name
    metadata = dict(error.trailing_metadata() or ())
    cls = _BY_STATUS.get(status, Internal)
    code = metadata.get(CODE_KEY, "")
    hint = metadata.get(HINT_KEY, "")
    if not code and status == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        return Unavailable(
            f"cannot reach the server{where}: {details}",
            hint="check that it runs and that the address and port are right",
            code="unreachable",
        )
    return cls(details, hint=hint, code=code)
