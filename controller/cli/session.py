"""What every srctl command shares: the profile chosen on the command line, calling the server,
and turning what went wrong into one line of what happened and one line of what to do."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.controller.cli.client import Profile


class State:
    config: Path | None = None


def profile() -> Profile:
    return Profile.find(State.config)


def call(method: str, request, *, timeout: float = RPC_TIMEOUT, service: str = "admin"):
    """Call `method` of the Admin service (or of `service`: "protection") and rebuild its error."""
    chosen = profile()
    try:
        return getattr(getattr(chosen, service)(), method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise explain(exc, chosen) from exc


def protect_call(method: str, request, *, timeout: float = RPC_TIMEOUT):
    return call(method, request, timeout=timeout, service="protection")


# What a failed connection's details say, and what it means for the operator.
_TLS_MARKERS = ("ssl", "tls", "handshake", "certificate", "alert")
_REFUSED = re.compile(r"connection refused|connect: no route|network is unreachable", re.I)
_DNS = re.compile(r"dns resolution failed|name or service not known|could not resolve", re.I)
_TLS_REASON = re.compile(r"\b([A-Z][A-Z0-9_]{6,})\b|(tlsv1[^:;,]*alert[^:;,]*)|(sslv3[^:;,]*alert[^:;,]*)")


def explain(exc: grpc.RpcError, chosen: Profile | None) -> errors.SiteRecoveryError:
    """The typed error a server raised, or, for a connection that failed, why and what to do."""
    error = errors.from_rpc_error(exc, target=chosen.server if chosen else "")
    status = exc.code()
    if status not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or error.code not in (
        "unreachable", "unavailable"
    ):
        return error
    return connection_error(exc.details() or status.name, chosen, deadline=status == grpc.StatusCode.DEADLINE_EXCEEDED)


def connection_error(details: str, chosen: Profile | None, *, deadline: bool = False) -> errors.SiteRecoveryError:
    server = chosen.server if chosen else "the configuration server"
    where = f" (from {chosen.path})" if chosen else ""
    lowered = details.lower()
    if _DNS.search(details):
        return errors.Unavailable(
            f"cannot resolve the configuration server's address {server}",
            hint=f"check `server` in the srctl profile{where} and this host's DNS",
            code="unresolvable",
        )
    if _REFUSED.search(details):
        return errors.Unavailable(
            f"nothing answers at {server}: connection refused",
            hint=f"start the configuration server (sr-config-server) or fix `server` in the srctl profile{where}; "
            "`srctl doctor` checks the rest",
            code="unreachable",
        )
    if any(marker in lowered for marker in _TLS_MARKERS):
        found = _TLS_REASON.search(details.split("last error:")[-1])
        reason = next((g for g in found.groups() if g), "") if found else ""
        return errors.Unauthenticated(
            f"the TLS handshake with {server} failed" + (f" ({reason.strip()})" if reason else ""),
            hint=f"the server and this profile{where} do not trust each other: check its ca, cert and key "
            "(same configuration server? certificate expired or removed?); `srctl doctor` checks them",
            code="tls-handshake-failed",
        )
    if deadline:
        return errors.Unavailable(
            f"the configuration server at {server} did not answer in time",
            hint="it may be overloaded or the network slow; retry, and run `srctl doctor` to see the latency",
            code="deadline-exceeded",
        )
    return errors.Unavailable(
        f"cannot reach the configuration server at {server}: {' '.join(details.split())}",
        hint=f"check that it runs and that `server` in the srctl profile{where} is right; `srctl doctor` checks the rest",
        code="unreachable",
    )
