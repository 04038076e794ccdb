from datetime import UTC, datetime, timedelta

from siterecovery.controller.health import derive_health

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def health(age_seconds, problems=(), interval=10.0):
    last = None if age_seconds is None else NOW - timedelta(seconds=age_seconds)
    return derive_health(last_heartbeat_at=last, problems=list(problems), interval=interval, now=NOW)


def test_fresh_heartbeat_is_healthy():
    assert health(5) == ("healthy", "")


def test_missed_heartbeats_warn_then_go_critical():
    assert health(26)[0] == "warning"
    assert health(61)[0] == "critical"
    assert "no heartbeat for 61 s" in health(61)[1]


def test_never_heartbeat_is_critical():
    assert health(None)[0] == "critical"


def test_reported_problem_raises_health_and_says_why():
    state, reason = health(1, [{"code": "spool", "severity": "warning", "message": "spool 85% full"}])
    assert (state, reason) == ("warning", "spool 85% full")
    assert health(1, [{"code": "x", "severity": "critical", "message": "disk gone"}])[0] == "critical"


def test_problem_never_lowers_health():
    assert health(61, [{"code": "x", "severity": "warning", "message": "m"}])[0] == "critical"
