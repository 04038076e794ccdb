"""What every srctl command shares: the profile chosen on the command line, calling the server,
and turning what went wrong into one line of what happened and one line of what to do."""

from __future__ import annotations

import re
import socket
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
_REFUSED = re.compile(r"connection refused|connect: no route|network is unreachable", re.I)
_DNS = re.compile(r"dns resolution failed|name or service not known|could not resolve", re.I)
_VERIFY = re.compile(r"CERTIFICATE_VERIFY_FAILED:?\s*([^:]*)")
_ALERT = re.compile(r"((?:tlsv1|tlsv13|sslv3)[ _]alert[ _][a-z_ ]+)", re.I)
_CLOSED = re.compile(r"socket closed|connection reset|end of tcp stream", re.I)


def _tcp_open(server: str) -> bool:
    from siterecovery.common.settings import parse_endpoint

    try:
        host, port = parse_endpoint(server, default_port=443)
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except (OSError, errors.SiteRecoveryError):
        return False


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
    verify, alert = _VERIFY.search(details), _ALERT.search(details)
    if verify:
        reason = verify.group(1).strip() or "certificate verify failed"
        return errors.Unauthenticated(
            f"the certificate of the server at {server} does not check out against this profile's CA ({reason})",
            hint=f"the profile{where} must hold the ca.crt of the configuration server it names (a profile of "
            "another server?); `srctl doctor` checks the profile",
            code="tls-handshake-failed",
        )
    if alert or "handshake" in lowered or (_CLOSED.search(details) and chosen and _tcp_open(chosen.server)):
        reason = f" ({alert.group(1).replace('_', ' ').lower()})" if alert else ""
        return errors.Unauthenticated(
            f"the configuration server at {server} refused this profile's certificate in the TLS handshake{reason}",
            hint=f"the certificate in the profile{where} is expired, revoked or from another CA: `srctl doctor` "
            "says which; an admin issues a new one with `srctl user add`",
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
