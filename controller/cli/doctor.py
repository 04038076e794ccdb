"""`srctl doctor`: a checklist of what a site needs to work, each failure with its fix.

Checked from where srctl runs: the profile's own certificate and CA; the
configuration server (TCP, then the TLS handshake and an RPC, and the
latency); the clock skew between this host and the server; each process
server's and master target's replication port, as the registry records it
(a TCP connect with a short deadline). Checked by the server, which has the
inventory (`Admin.Diagnose`): the agents' certificates, heartbeats and free
space, and with `--machine` every failback rule of that machine, the very
rules a reprotect runs. The thresholds are in controller/diagnostics.py.

Exit code: 0 when nothing failed (warnings allowed), 5 when a check failed.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated

import grpc
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc, common_pb2
from siterecovery.common.settings import parse_endpoint
from siterecovery.controller import diagnostics
from siterecovery.controller.cli import completion, output
from siterecovery.controller.cli.client import Profile
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import State, connection_error, explain
from siterecovery.controller.diagnostics import Check

CONNECT_TIMEOUT = 3.0
RPC_TIMEOUT = 10.0
SLOW_RPC_SECONDS = 1.0
STATUS = {
    admin_pb2.CHECK_STATUS_OK: "ok",
    admin_pb2.CHECK_STATUS_WARNING: "warning",
    admin_pb2.CHECK_STATUS_FAILED: "failed",
    admin_pb2.CHECK_STATUS_SKIPPED: "skipped",
}
MARK = {"ok": "[green]✓[/green]", "warning": "[yellow]![/yellow]", "failed": "[red]✗[/red]", "skipped": "[dim]-[/dim]"}
OPERATOR_RENEW = ("ask an admin for a new certificate (`srctl user add NAME`); the local administrator's is issued "
                  "again when admin/client.crt and client.key are deleted and the configuration server restarts")
CA_RENEW = ("the CA is not renewed in place: plan a new configuration server (every agent and operator enrolls "
            "again) before it expires")


def doctor(
    machine: Annotated[str, typer.Option("--machine", "-m", help="also check this protected machine's failback "
                                         "prerequisites", autocompletion=completion.protected_machines)] = "",
    master_target: Annotated[str, typer.Option(help="with --machine: the master target to fail back through; "
                                               "default: the one its reprotect recorded")] = "",
    target: Annotated[str, typer.Option(help="with --machine: original, alternate or new")] = "",
    vcenter: Annotated[str, typer.Option(help="with --machine: also run the vSphere rules on this endpoint's "
                                         "last discovery", autocompletion=completion.vcenters)] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Check reachability (ports 443 and 9443), certificates, clock skew, disk space and heartbeats,
    and with --machine the failback prerequisites: a checklist, each failure with its fix."""
    checks = run_checks(admin_pb2.DiagnoseRequest(machine=machine, master_target=master_target, target=target,
                                                  vcenter=vcenter))
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warning", "failed", "skipped")}
    output.emit(output_format, {"ok": counts["failed"] == 0, "summary": counts, "checks": [c.as_dict() for c in checks]},
                lambda: _print(checks, counts))
    if counts["failed"]:
        raise typer.Exit(errors.PreconditionFailed.exit_code)


def run_checks(request: admin_pb2.DiagnoseRequest) -> list[Check]:
    try:
        chosen = Profile.find(State.config)
    except errors.SiteRecoveryError as exc:
        return [Check("srctl profile", "failed", exc.message, hint=exc.hint, code=exc.code)]
    now = datetime.now(UTC)
    checks = local_certificates(chosen, now)
    reached = reach_config_server(chosen)
    checks.append(reached)
    if reached.status == "failed":
        skip = "not checked: the configuration server cannot be reached"
        names = ["clock skew", "replication ports", "agents"] + (["failback prerequisites"] if request.machine else [])
        return checks + [Check(n, "skipped", skip) for n in names]
    checks += server_side(chosen, request)
    checks += replication_ports(chosen)
    return checks


def local_certificates(chosen: Profile, now: datetime) -> list[Check]:
    """The operator's certificate (its key, its CA) and the CA, from the profile."""
    subject = f"profile {chosen.path}"
    try:
        cert = x509.load_pem_x509_certificate(chosen.cert_pem)
        ca = x509.load_pem_x509_certificate(chosen.ca_pem)
        key = serialization.load_pem_private_key(chosen.key_pem, password=None)
    except ValueError as exc:
        return [Check("client certificate", "failed", f"the profile's certificate, key or CA is not PEM: {exc}",
                      hint="point the profile at the files `srctl user add` wrote", code="profile-invalid",
                      subject=subject)]
    checks = []
    mine = diagnostics.certificate("client certificate", subject, cert.not_valid_after_utc, now, renew=OPERATOR_RENEW)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        mine = Check("client certificate", "failed", "the key does not belong to the certificate",
                     hint="the profile's cert and key must be the pair `srctl user add` wrote", code="key-mismatch",
                     subject=subject)
    else:
        try:
            pki.verify_issued_by(chosen.cert_pem, chosen.ca_pem)
        except errors.SiteRecoveryError:
            mine = Check("client certificate", "failed", "the certificate was not issued by the profile's CA",
                         hint="use the ca.crt of the configuration server that issued it", code="ca-mismatch",
                         subject=subject)
    checks.append(mine)
    checks.append(diagnostics.certificate("CA certificate", subject, ca.not_valid_after_utc, now, renew=CA_RENEW))
    return checks


def reach_config_server(chosen: Profile) -> Check:
    """TCP, then the TLS handshake with an RPC (the health check every operator may call), then the latency."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    name, subject = "reachable", f"configuration server {chosen.server}"
    refused = _connect(chosen.server)
    if refused:
        error = connection_error(refused, chosen)
        return Check(name, "failed", error.message, hint=error.hint, code=error.code, subject=subject)
    channel = chosen.channel()
    try:
        health = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)  # the handshake, then the call
        first = time.monotonic() - started
        started = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        latency = time.monotonic() - started
    except grpc.RpcError as exc:
        error = explain(exc, chosen)
        return Check(name, "failed", error.message, hint=error.hint, code=error.code, subject=subject)
    finally:
        channel.close()
    message = f"TLS handshake and an RPC in {first * 1000:.0f} ms; an RPC round trip {latency * 1000:.0f} ms"
    if latency > SLOW_RPC_SECONDS:
        return Check(name, "warning", message, hint="a slow network or an overloaded server: every srctl command "
                     "and agent heartbeat waits for it", code="slow", subject=subject)
    return Check(name, "ok", message, subject=subject)


def server_side(chosen: Profile, request: admin_pb2.DiagnoseRequest) -> list[Check]:
    """Admin.Diagnose: the clock skew from its answer, then the server's own checks."""
    channel = chosen.channel()
    try:
        before = time.time()
        response = admin_pb2_grpc.AdminStub(channel).Diagnose(request, timeout=RPC_TIMEOUT)
        after = time.time()
    except grpc.RpcError as exc:
        error = explain(exc, chosen)
        return [Check("server checks", "failed", error.message, hint=error.hint, code=error.code,
                      subject=f"configuration server {chosen.server}")]
    finally:
        channel.close()
    server_time = response.server_time.ToDatetime(tzinfo=UTC).timestamp()
    skew = diagnostics.clock_skew(server_time - (before + after) / 2, (after - before) / 2,
                                  f"configuration server {chosen.server}")
    return [skew] + [
        Check(c.name, STATUS.get(c.status, "failed"), c.message, hint=c.hint, code=c.code, subject=c.subject)  # type: ignore[arg-type]
        for c in response.checks
    ]


def replication_ports(chosen: Profile) -> list[Check]:
    """Each process server's and master target's data port, as registered, from this host."""
    channel = chosen.channel()
    try:
        servers = admin_pb2_grpc.AdminStub(channel).ListServers(admin_pb2.ListServersRequest(), timeout=RPC_TIMEOUT).servers
    except grpc.RpcError as exc:
        error = explain(exc, chosen)
        return [Check("replication ports", "failed", error.message, hint=error.hint, code=error.code)]
    finally:
        channel.close()
    agents = [s for s in servers if s.role in (common_pb2.ROLE_PROCESS_SERVER, common_pb2.ROLE_MASTER_TARGET)]
    if not agents:
        return [Check("replication port", "skipped", "no process server or master target is enrolled")]
    with ThreadPoolExecutor(max_workers=min(16, len(agents))) as pool:
        return list(pool.map(_port_check, agents))


def _port_check(server: common_pb2.ServerInfo) -> Check:
    role = output.enum_label(common_pb2.Role.Name(server.role), "ROLE_")
    subject = f"{role} {server.hostname}"
    endpoint = server.inventory.data_endpoint
    if not endpoint:
        return Check("replication port", "failed", "it registered no data endpoint", subject=subject,
                     hint=f"set `advertise` in sr-{role}'s configuration and restart it", code="no-endpoint")
    started = time.monotonic()
    refused = _connect(endpoint, default_port=9443)
    if refused:
        return Check("replication port", "failed", f"{endpoint}: {refused}", subject=subject, code="port-unreachable",
                     hint=f"check that sr-{role} runs on {server.hostname} and that {endpoint} is open from this host "
                     "(firewall); a wrong address is fixed with `advertise` in its configuration")
    return Check("replication port", "ok", f"{endpoint} accepts connections ({(time.monotonic() - started) * 1000:.0f} ms)",
                 subject=subject)


def _connect(endpoint: str, *, default_port: int = 443) -> str:
    """"" when a TCP connection opens within CONNECT_TIMEOUT, else why not."""
    try:
        host, port = parse_endpoint(endpoint, default_port=default_port)
    except errors.SiteRecoveryError as exc:
        return exc.message
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return ""
    except socket.gaierror as exc:
        return f"DNS resolution failed for {host}: {exc.strerror}"
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT:.0f} s (filtered by a firewall, or the host is down)"
    except OSError as exc:
        return "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc.strerror or exc)


def _print(checks: list[Check], counts: dict[str, int]) -> None:
    for c in checks:
        where = f"{c.subject}: " if c.subject else ""
        output.console.print(f"{MARK[c.status]} [bold]{c.name}[/bold]  {where}{c.message}", highlight=False,
                             soft_wrap=True)
        if c.hint and c.status in ("failed", "warning"):
            output.console.print(f"    fix: {c.hint}", highlight=False, soft_wrap=True, markup=False)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "[red]problems found[/red]" if counts["failed"] else "[green]no failures[/green]"
    output.console.print(f"{verdict}: {summary}", highlight=False)
