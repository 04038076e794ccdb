"""How the configuration server judges an agent's health.

Health is derived when read, never stored: from the age of the last heartbeat
(against the interval agents were told to use) and the problems the agent
reported with it. Two missed heartbeats make a warning, six a critical state.
"""

from __future__ import annotations

from datetime import datetime

WARNING_AFTER_MISSED = 2.5
CRITICAL_AFTER_MISSED = 6.0

HEALTHY, WARNING, CRITICAL = "healthy", "warning", "critical"
_RANK = {HEALTHY: 0, WARNING: 1, CRITICAL: 2}


def derive_health(
    *,
    last_heartbeat_at: datetime | None,
    problems: list[dict],
    interval: float,
    now: datetime,
) -> tuple[str, str]:
    """Return (health, reason in words)."""
    if last_heartbeat_at is None:
        return CRITICAL, "never sent a heartbeat"
    age = (now - last_heartbeat_at).total_seconds()
    state, reason = HEALTHY, ""
    if age > CRITICAL_AFTER_MISSED * interval:
        state, reason = CRITICAL, f"no heartbeat for {age:.0f} s"
    elif age > WARNING_AFTER_MISSED * interval:
        state, reason = WARNING, f"no heartbeat for {age:.0f} s"
    for problem in problems:
        severity = problem.get("severity", WARNING)
        if _RANK.get(severity, 1) > _RANK[state]:
            state = severity
        reason = "; ".join(filter(None, [reason, problem.get("message", problem.get("code", ""))]))
    return state, reason


def heartbeat_age(last_heartbeat_at: datetime | None, now: datetime) -> float:
    return (now - last_heartbeat_at).total_seconds() if last_heartbeat_at else float("inf")
