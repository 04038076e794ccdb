"""The checks of `srctl doctor`: each one a verdict (ok, warning, failed, skipped) with one line
of what was found and, when not ok, one line of what to do.

Plain functions with their thresholds, shared by the configuration server
(`server_checks`, from what only it knows: the agents' inventories,
heartbeats and certificates) and srctl (the checks made from where it runs:
its own certificates, the clock skew, reaching the ports).

Thresholds, and why:
- certificates: a warning under 30 days before expiry (time to re-issue
  before anything stops), failed once expired (every TLS handshake is refused);
- clock skew: a warning over 5 s, failed over 60 s (certificates are checked
  against the clock, and recovery points carry their source's time);
- free space of spool, retention, datastore and state directories: a warning
  under 15 %, failed under 5 % (agents themselves warn at 10 % and turn
  critical at 3 %: the doctor speaks a little earlier);
- heartbeats: the health rules' (a warning after 2.5 missed intervals,
  failed after 6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Literal

from siterecovery.common import inventory
from siterecovery.controller import health
from siterecovery.controller.store.base import ServerRecord

Status = Literal["ok", "warning", "failed", "skipped"]

CERT_WARN = timedelta(days=30)
SKEW_WARN_SECONDS = 5.0
SKEW_FAIL_SECONDS = 60.0
DISK_WARN_FRACTION = inventory.SPACE_WARNING_FRACTION
DISK_FAIL_FRACTION = inventory.SPACE_CRITICAL_FRACTION

WHY_SKEW = (
    "certificates are checked against each clock (one ahead sees them not yet valid, or expired early), and "
    "recovery points carry their source's time, so a skewed clock shows and picks points at the wrong time"
)
DIRECTORY_HINTS = {
    "spool": "free space on the process server's spool disk or give it a bigger one: a full spool holds every "
    "source back",
    "retention": "free space on the retention drive or shorten the retention window: a full one pauses its pairs "
    "(retention-full)",
    "datastore": "free space on the datastore or move target disks elsewhere: replication and failback write there",
    "state": "free space in the configuration server's state directory: its store and backups live there",
}
# A source agent's state directory holds its pairs' journals: the writes it could not send yet.
SOURCE_STATE_HINT = (
    "free space in the source agent's state directory or move it to a larger volume: its journals live there, "
    "and when it is full the protected machine's writes fail"
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    hint: str = ""
    code: str = ""
    subject: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def certificate(name: str, subject: str, not_after: datetime | None, now: datetime, *, renew: str) -> Check:
    """`renew`: how this certificate is renewed, said when it expires soon or has expired."""
    if not_after is None:
        return Check(name, "skipped", "its expiry is not recorded yet (it is recorded when the agent next starts)",
                     subject=subject)
    left = not_after - now
    if left <= timedelta(0):
        return Check(name, "failed", f"expired on {_date(not_after)}: every TLS handshake with it is refused",
                     hint=renew, code="certificate-expired", subject=subject)
    days = left.total_seconds() / 86400
    if left < CERT_WARN:
        return Check(name, "warning", f"expires in {days:.1f} days ({_date(not_after)})", hint=renew,
                     code="certificate-expiring", subject=subject)
    return Check(name, "ok", f"valid until {_date(not_after)} ({days:.0f} days)", subject=subject)


def clock_skew(skew_seconds: float, uncertainty_seconds: float, subject: str) -> Check:
    """`skew_seconds`: the server's clock minus this host's (positive: this host is behind)."""
    way = "behind" if skew_seconds > 0 else "ahead of"
    message = f"this host's clock is {abs(skew_seconds):.1f} s {way} the configuration server's (±{uncertainty_seconds:.2f} s)"
    hint = f"synchronise both clocks with NTP (timedatectl, chronyc tracking): {WHY_SKEW}"
    if abs(skew_seconds) > SKEW_FAIL_SECONDS:
        return Check("clock skew", "failed", message, hint=hint, code="clock-skew", subject=subject)
    if abs(skew_seconds) > SKEW_WARN_SECONDS:
        return Check("clock skew", "warning", message, hint=hint, code="clock-skew", subject=subject)
    return Check("clock skew", "ok", message, subject=subject)


def disk_space(subject: str, kind: str, path: str, free: int, total: int, *, hint: str = "") -> Check:
    name = f"{kind} free space"
    if total <= 0:
        return Check(name, "skipped", f"{path}: its size is not reported", subject=subject)
    fraction = free / total
    message = f"{path}: {fraction:.0%} free ({_gib(free)} of {_gib(total)})"
    hint = hint or DIRECTORY_HINTS.get(kind, "free space there")
    if fraction < DISK_FAIL_FRACTION:
        return Check(name, "failed", message, hint=hint, code="disk-full", subject=subject)
    if fraction < DISK_WARN_FRACTION:
        return Check(name, "warning", message, hint=hint, code="disk-low", subject=subject)
    return Check(name, "ok", message, subject=subject)


def _gib(count: int) -> str:
    return f"{count / 1024**3:.1f} GiB"


def unit_name(role: str) -> str:
    """The daemon's systemd unit (deploy/systemd/) for a role label: source → sr-source-agent."""
    return "sr-source-agent" if role == "source" else f"sr-{role}"


def heartbeat(subject: str, role: str, last: datetime | None, interval: float, now: datetime) -> Check:
    age = health.heartbeat_age(last, now)
    unit = unit_name(role)
    hint = (f"check that {unit} runs on {subject.split()[-1]} (systemctl status {unit}) and reaches the "
            "configuration server; its log says why it stopped")
    if age == float("inf"):
        return Check("heartbeat", "failed", "it never sent a heartbeat", hint=hint, code="heartbeat-stale",
                     subject=subject)
    message = f"last heartbeat {age:.1f} s ago (every {interval:g} s)"
    if age > health.CRITICAL_AFTER_MISSED * interval:
        return Check("heartbeat", "failed", message, hint=hint, code="heartbeat-stale", subject=subject)
    if age > health.WARNING_AFTER_MISSED * interval:
        return Check("heartbeat", "warning", message, hint=hint, code="heartbeat-late", subject=subject)
    return Check("heartbeat", "ok", message, subject=subject)


AGENT_RENEW = (
    "certificates are not renewed in place yet: before it expires, enroll the agent again (stop it, move its "
    "<state_dir>/identity away, start it with the passphrase file), then `srctl servers remove` the old id"
)
SERVER_RENEW = ("delete pki/server.crt and pki/server.key in its state directory and restart it: it issues a new "
                "one from its CA (agents and operators keep working)")


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def server_checks(
    servers: list[ServerRecord], *, interval: float, now: datetime, state_dir_facts: dict | None = None,
    server_cert_expires: datetime | None = None, expected_silent: dict[str, str] | None = None,
) -> list[Check]:
    """What the configuration server knows of itself and its agents: certificates, heartbeats, free space.

    `expected_silent`: server id → why its silence is right (the agent of a VM a failover or a
    failback powered off); such an agent's stale heartbeat is not a failure."""
    checks: list[Check] = []
    if server_cert_expires is not None:
        checks.append(certificate("certificate", "configuration server", server_cert_expires, now,
                                  renew=SERVER_RENEW))
    if state_dir_facts:
        checks.append(disk_space("configuration server", "state", state_dir_facts.get("path", ""),
                                 int(state_dir_facts.get("free_bytes", 0)), int(state_dir_facts.get("total_bytes", 0))))
    for server in sorted(servers, key=lambda s: (s.role, s.hostname)):
        if server.revoked_at is not None:
            continue
        subject = f"{server.role} {server.hostname}"
        beat = heartbeat(subject, server.role, server.last_heartbeat_at, interval, now)
        if beat.status != "ok" and server.id in (expected_silent or {}):
            beat = Check("heartbeat", "ok", f"silent, as expected: {expected_silent[server.id]}", subject=subject)
        checks.append(beat)
        expires = _parse_time(str(server.inventory.get("certificate_expires_at", "")))
        checks.append(certificate("certificate", subject, expires, now, renew=AGENT_RENEW))
        for directory in server.inventory.get("directories", []):
            kind = str(directory.get("kind", "")).removeprefix("DIRECTORY_KIND_").lower()
            if kind in ("spool", "retention", "datastore", "state"):
                checks.append(disk_space(subject, kind, str(directory.get("path", "")),
                                         int(directory.get("free_bytes", 0)), int(directory.get("total_bytes", 0)),
                                         hint=SOURCE_STATE_HINT if kind == "state" else ""))
    return checks
