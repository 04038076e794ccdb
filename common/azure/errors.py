"""Azure SDK errors → our error hierarchy, and the one retry loop for Azure calls.

Every call into an Azure SDK goes through `call(what, fn, policy)`: it runs
`fn`, retries what retrying can fix (throttling, 5xx, a dropped connection)
under a small frozen `AzureRetryPolicy`, honours `Retry-After` up to a bound,
and turns whatever is left into a `SiteRecoveryError` whose message says what
happened and whose hint says what to do. The SDK clients are built with their
own retries off (`retry_total=0`), so this is the only place that waits, and
tests can hand it a sleep that records instead of sleeping.

Mapping (HTTP status and Azure error code → our category):

| Azure says                                                  | we raise           | retryable |
|-------------------------------------------------------------|--------------------|-----------|
| 429, or 503 `ServerBusy` (storage throttling)               | RateLimited        | yes       |
| other 5xx, connection or read failures                      | Unavailable        | yes       |
| 404, `ResourceNotFound`, `ResourceGroupNotFound`, `*NotFound` | NotFound          | no        |
| `QuotaExceeded`, `OperationNotAllowed`, `SkuNotAvailable`, `AllocationFailed`, … | PreconditionFailed | no |
| 401, `AuthenticationFailed`, `InvalidAuthenticationToken…`   | Unauthenticated    | no        |
| 403, `AuthorizationFailed`                                   | PermissionDenied   | no        |
| 409 and `*AlreadyExists`, `ConditionNotMet` (412)            | Conflict           | no        |
| other 4xx                                                    | InvalidInput       | no        |

A retryable error that outlives the policy keeps its category (RateLimited,
Unavailable), so the job engine may retry the whole step later.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import tenacity
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from siterecovery.common import errors
from siterecovery.common.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

QUOTA_CODES = frozenset(
    {
        "QuotaExceeded",
        "OperationNotAllowed",  # what Compute answers when a regional vCPU quota would be exceeded
        "SkuNotAvailable",
        "AllocationFailed",
        "ZonalAllocationFailed",
        "OverconstrainedAllocationRequest",
        "PublicIPCountLimitReached",
        "SubscriptionNotRegistered",
        "MissingSubscriptionRegistration",
    }
)
AUTHN_CODES = frozenset(
    {"AuthenticationFailed", "InvalidAuthenticationToken", "InvalidAuthenticationTokenTenant", "ExpiredAuthenticationToken"}
)


@dataclass(frozen=True)
class AzureRetryPolicy:
    """How patiently one Azure call is retried.

    `max_attempts` counts the first try. Without a `Retry-After` the wait
    doubles from `initial_backoff` up to `max_backoff`. A `Retry-After` longer
    than `max_retry_after` is not waited out here: the call fails at once with
    RateLimited (retryable), so a job step gives its lease back instead of
    sleeping on it for an hour.
    """

    max_attempts: int = 4
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise errors.InvalidInput(f"max_attempts must be at least 1, not {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise errors.InvalidInput(
                f"need 0 <= initial_backoff ({self.initial_backoff}) <= max_backoff ({self.max_backoff})"
            )
        if self.max_retry_after < 0:
            raise errors.InvalidInput(f"max_retry_after must not be negative: {self.max_retry_after}")


DEFAULT_RETRY = AzureRetryPolicy()


def error_code(exc: BaseException) -> str:
    """The Azure error code of an SDK error ('' when it has none)."""
    code = getattr(exc, "error_code", None)  # storage sets this
    if code:
        return str(getattr(code, "value", code))
    odata = getattr(exc, "error", None)  # ARM: {"error": {"code": ...}}
    if odata is not None and getattr(odata, "code", None):
        return str(odata.code)
    response = getattr(exc, "response", None)
    if response is not None:
        return response.headers.get("x-ms-error-code", "") or ""
    return ""


def retry_after(exc: BaseException, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """Seconds the service asked us to wait (`Retry-After`, seconds or HTTP date), or None."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now()).total_seconds())


def _detail(exc: BaseException) -> str:
    odata = getattr(exc, "error", None)
    if odata is not None and getattr(odata, "message", None):
        return str(odata.message)
    message = getattr(exc, "message", None) or str(exc)
    return str(message).splitlines()[0] if message else type(exc).__name__


def _is_throttled(exc: BaseException) -> bool:
    status = getattr(exc, "status_code", None)
    return status == 429 or (status == 503 and error_code(exc) == "ServerBusy")


def is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, a server error, or a broken connection."""
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, HttpResponseError) and status is not None and (status == 429 or status >= 500)


def translate(what: str, exc: BaseException, *, attempts: int = 1) -> errors.SiteRecoveryError:
    """Our error for an Azure SDK error raised while doing `what` ("create disk x")."""
    code = error_code(exc)
    status = getattr(exc, "status_code", None)
    detail = _detail(exc)
    tag = f"{status} {code}".strip() if status else code
    said = f"Azure answered {tag}: {detail}" if tag else f"{type(exc).__name__}: {detail}"
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if _is_throttled(exc):
        wait = retry_after(exc)
        when = f"after {wait:.0f} s" if wait is not None else "in a few minutes"
        return errors.RateLimited(
            f"Azure throttled {what}{tried} ({said})",
            hint=f"Azure asked us to slow down; the step is retried automatically, or retry {when}",
            code="azure-throttled",
        )
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)) or (status is not None and status >= 500):
        return errors.Unavailable(
            f"could not {what}{tried}: {said}",
            hint="Azure or the network to it had a transient failure; retry, and check the Azure status page if it persists",
            code="azure-unavailable",
        )
    if code in QUOTA_CODES or "quota" in detail.lower():
        return errors.PreconditionFailed(
            f"cannot {what}: {said}",
            hint="request a quota increase for this subscription and region, or choose another VM size or region, then retry",
            code="azure-quota",
        )
    if status == 404 or code.endswith("NotFound"):
        return errors.NotFound(
            f"cannot {what}: it does not exist in Azure ({said})",
            hint="check the subscription, resource group and name in the Azure site settings",
            code="azure-not-found",
        )
    if status == 401 or code in AUTHN_CODES or (isinstance(exc, ClientAuthenticationError) and status != 403):
        return errors.Unauthenticated(
            f"Azure refused our credentials while trying to {what} ({said})",
            hint="check the tenant id, client id and secret of the service principal (the secret may have expired); "
            "`srctl azure update-credentials SITE --secret-file FILE` replaces it",
            code="azure-unauthenticated",
        )
    if status == 403 or code == "AuthorizationFailed":
        return errors.PermissionDenied(
            f"the service principal may not {what} ({said})",
            hint="grant the service principal a role that allows this on the resource group (e.g. Contributor), then retry",
            code="azure-forbidden",
        )
    if status in (409, 412) or code.endswith("AlreadyExists") or code == "ConditionNotMet":
        return errors.Conflict(
            f"cannot {what}: {said}",
            hint="another operation holds or changed the resource; wait for it to finish, then retry",
            code="azure-conflict",
        )
    if status is not None and 400 <= status < 500:
        return errors.InvalidInput(
            f"Azure rejected the request to {what} ({said})",
            hint="check the Azure site settings and the requested size, names and addresses",
            code="azure-invalid-request",
        )
    return errors.Internal(f"unexpected Azure error while trying to {what}: {said}", code="azure-error")


def call(
    what: str,
    fn: Callable[[], T],
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn` with retries of transient Azure failures; raise our errors only.

    `what` names the action for messages ("power off VM web1"). `fn` must be
    safe to repeat (every Azure call we make is: PUTs of a whole resource,
    POST actions on a VM, DELETEs, page writes of fixed contents).
    """

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after(exc) if exc is not None else None
        if asked is not None:
            return asked
        return min(policy.max_backoff, policy.initial_backoff * 2 ** (state.attempt_number - 1))

    def should_retry(exc: BaseException) -> bool:
        if not is_transient(exc):
            return False
        asked = retry_after(exc)
        return asked is None or asked <= policy.max_retry_after

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.max_attempts),
        wait=wait,
        retry=tenacity.retry_if_exception(should_retry),
        sleep=sleep,
        before_sleep=lambda state: log.warning(
            "azure call failed; retrying",
            action=what,
            attempt=state.attempt_number,
            wait=round(state.next_action.sleep, 3) if state.next_action else None,
            azure_code=error_code(state.outcome.exception()) if state.outcome else "",
        ),
        reraise=True,
    )
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        return fn()

    try:
        return retrying(attempt)
    except errors.SiteRecoveryError:
        raise
    except AzureError as exc:
        raise translate(what, exc, attempts=attempts) from exc
