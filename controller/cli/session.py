"""What every srctl command shares: the profile chosen on the command line, calling the server,
and turning what went wrong into one line of what happened and one line of what to do."""

from __future__ import annotations

import re
import socket
import ssl
import tempfile
from pathlib import Path

import grpc

from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.common.pki import CONFIG_SERVER_NAME
from siterecovery.common.settings import parse_endpoint
from siterecovery.controller.cli.client import Profile, lab_of_profile


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


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def server_accepts_certificate(chosen: Profile, *, timeout: float = 3.0) -> bool | None:
    """Whether the server keeps a TLS connection made with this profile's certificate: None if unknown.

    A gRPC server that refuses a client certificate under TLS 1.3 closes the connection
    after the handshake without an alert, so the client sees only "Socket closed" — the
    same words as a server killed or restarting mid-call. One plain TLS connection tells
    them apart: a server that accepts the certificate answers the HTTP/2 preface with its
    SETTINGS; one that refuses it closes at once.
    """
    try:
        host, port = parse_endpoint(chosen.server, default_port=443)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=chosen.ca_pem.decode())
        with tempfile.TemporaryDirectory() as private:  # ssl loads a key pair from files only (0700, removed)
            cert, key = Path(private) / "client.crt", Path(private) / "client.key"
            cert.write_bytes(chosen.cert_pem)
            key.write_bytes(chosen.key_pem)
            context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=CONFIG_SERVER_NAME) as tls:
                tls.sendall(_H2_PREFACE)
                return bool(tls.recv(9))
    except ssl.SSLError as exc:
        return False if "ALERT" in (exc.reason or "") else None
    except (OSError, ValueError, errors.SiteRecoveryError):
        return None


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
        lab = lab_of_profile(chosen.path) if chosen else None
        hint = (
            f"this is the lab's profile and the lab is not running: `srctl lab up --dir {lab}` starts it again "
            "(`srctl lab status` shows what runs)"
            if lab
            else f"start the configuration server (sr-config-server) or fix `server` in the srctl profile{where}; "
            "`srctl doctor` checks the rest"
        )
        return errors.Unavailable(f"nothing answers at {server}: connection refused", hint=hint, code="unreachable")
    verify, alert = _VERIFY.search(details), _ALERT.search(details)
    if verify:
        reason = verify.group(1).strip() or "certificate verify failed"
        return errors.Unauthenticated(
            f"the certificate of the server at {server} does not check out against this profile's CA ({reason})",
            hint=f"the profile{where} must hold the ca.crt of the configuration server it names (a profile of "
            "another server?); `srctl doctor` checks the profile",
            code="tls-handshake-failed",
        )
    closed = "handshake" in lowered or _CLOSED.search(details)
    if alert or (closed and chosen and server_accepts_certificate(chosen) is False):
        reason = f" ({alert.group(1).replace('_', ' ').lower()})" if alert else ""
        return errors.Unauthenticated(
            f"the configuration server at {server} refused this profile's certificate in the TLS handshake{reason}",
            hint=f"the certificate in the profile{where} is expired, revoked or from another CA: `srctl doctor` "
            "says which; an admin issues a new one with `srctl user add`",
            code="tls-handshake-failed",
        )
    if closed:
        return errors.Unavailable(
            f"the configuration server at {server} closed the connection: {' '.join(details.split())}",
            hint="it was restarting or is overloaded (it accepts this profile's certificate); retry, and run "
            "`srctl doctor` if it persists",
            code="connection-lost",
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
