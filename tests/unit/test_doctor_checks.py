"""The thresholds of `srctl doctor`'s checks, the server's checks of its agents, and how srctl words a
failed connection (one line of what happened with its code, one of what to do; one document with
--output json or yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from siterecovery.common import errors
from siterecovery.controller import diagnostics
from siterecovery.controller.cli import main as cli_main
from siterecovery.controller.cli.client import Profile, lab_profile
from siterecovery.controller.cli.output import Format
from siterecovery.controller.cli.session import connection_error
from siterecovery.controller.store.base import ServerRecord

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("left", "status"), [
    (timedelta(days=400), "ok"),
    (timedelta(days=30, seconds=1), "ok"),
    (timedelta(days=29, hours=23), "warning"),
    (timedelta(hours=1), "warning"),
    (timedelta(0), "failed"),
    (timedelta(days=-3), "failed"),
])
def test_certificate_expiry_warns_under_30_days_and_fails_once_expired(left: timedelta, status: str) -> None:
    check = diagnostics.certificate("client certificate", "me", NOW + left, NOW, renew="renew it")
    assert check.status == status
    assert (check.hint == "renew it") == (status != "ok")
    assert check.hint or status == "ok"


def test_a_certificate_whose_expiry_is_not_recorded_is_skipped() -> None:
    assert diagnostics.certificate("certificate", "agent", None, NOW, renew="x").status == "skipped"


@pytest.mark.parametrize(("skew", "status"), [
    (0.0, "ok"), (4.9, "ok"), (-5.0, "ok"), (5.1, "warning"), (-30.0, "warning"), (60.0, "warning"),
    (60.5, "failed"), (-3600.0, "failed"),
])
def test_clock_skew_warns_over_5_s_and_fails_over_60_s(skew: float, status: str) -> None:
    check = diagnostics.clock_skew(skew, 0.01, "configuration server")
    assert check.status == status
    assert ("behind" if skew > 0 else "ahead of") in check.message
    if status != "ok":
        assert "NTP" in check.hint and "recovery points" in check.hint and "certificates" in check.hint


@pytest.mark.parametrize(("free", "status"), [(50, "ok"), (15, "ok"), (14.9, "warning"), (5, "warning"),
                                              (4.9, "failed"), (0, "failed")])
@pytest.mark.parametrize("kind", ["spool", "retention", "datastore"])
def test_free_space_warns_under_15_percent_and_fails_under_5(kind: str, free: float, status: str) -> None:
    total = 1000 * 1024**3
    check = diagnostics.disk_space("process-server ps1", kind, "/data", int(total * free / 100), total)
    assert check.status == status and check.name == f"{kind} free space"
    assert (check.hint == diagnostics.DIRECTORY_HINTS[kind]) == (status != "ok")


def test_an_unknown_size_is_skipped() -> None:
    assert diagnostics.disk_space("x", "spool", "/s", 0, 0).status == "skipped"


@pytest.mark.parametrize(("age", "status"), [(5, "ok"), (25, "ok"), (26, "warning"), (60, "warning"), (61, "failed"),
                                             (None, "failed")])
def test_heartbeats_follow_the_health_rules(age: float | None, status: str) -> None:
    last = NOW - timedelta(seconds=age) if age is not None else None
    check = diagnostics.heartbeat("process-server ps1", "process-server", last, 10.0, NOW)
    assert check.status == status
    if status != "ok":
        assert "sr-process-server runs on ps1" in check.hint


def _server(name: str, role: str, **inventory) -> ServerRecord:
    return ServerRecord(id=f"id-{name}", role=role, hostname=name, cert_serial="1", cert_fingerprint="f",
                        enrolled_at=NOW, last_heartbeat_at=NOW - timedelta(seconds=1), inventory=inventory)


def test_server_checks_cover_every_agent_its_certificate_and_its_directories() -> None:
    gib = 1024**3
    servers = [
        _server("ps1", "process-server", certificate_expires_at="2025-06-11T12:00:00Z", directories=[
            {"kind": "DIRECTORY_KIND_SPOOL", "path": "/spool", "free_bytes": str(2 * gib), "total_bytes": str(100 * gib)},
        ]),
        _server("mt1", "master-target", certificate_expires_at="2027-01-01T00:00:00Z", directories=[
            {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds", "free_bytes": str(50 * gib), "total_bytes": str(100 * gib)},
            {"kind": "DIRECTORY_KIND_RETENTION", "path": "/ret", "free_bytes": str(10 * gib), "total_bytes": str(100 * gib)},
        ]),
        _server("old", "source"),
        _server("app01", "source", directories=[  # journals live in a source agent's state directory
            {"kind": "DIRECTORY_KIND_STATE", "path": "/var/lib/sr", "free_bytes": str(4 * gib), "total_bytes": str(100 * gib)},
        ]),
    ]
    revoked = _server("gone", "source")
    revoked = ServerRecord(**{**revoked.__dict__, "revoked_at": NOW})
    checks = diagnostics.server_checks([*servers, revoked], interval=10.0, now=NOW,
                                       state_dir_facts={"path": "/state", "free_bytes": "80", "total_bytes": "100"},
                                       server_cert_expires=NOW + timedelta(days=800))
    by = {(c.subject, c.name): c.status for c in checks}
    assert by[("configuration server", "certificate")] == "ok"
    assert by[("configuration server", "state free space")] == "ok"
    assert by[("process-server ps1", "certificate")] == "warning"  # 10 days left
    assert by[("process-server ps1", "spool free space")] == "failed"  # 2 %
    assert by[("master-target mt1", "datastore free space")] == "ok"
    assert by[("master-target mt1", "retention free space")] == "warning"  # 10 %
    assert by[("source old", "certificate")] == "skipped"  # registered before expiries were recorded
    assert by[("source app01", "state free space")] == "failed"  # 4 %
    (journals,) = [c for c in checks if c.subject == "source app01" and c.name == "state free space"]
    assert "source agent's state directory" in journals.hint and journals.code == "disk-full"
    assert all(status == "ok" for (_, name), status in by.items() if name == "heartbeat")
    assert not any("gone" in subject for subject, _ in by), "a removed agent is not checked"


@pytest.fixture
def profile(tmp_path: Path) -> Profile:
    return Profile(path=tmp_path / "srctl.toml", server="127.0.0.1:1", ca_pem=b"", cert_pem=b"", key_pem=b"")


@pytest.mark.parametrize(("details", "cls", "code", "words"), [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: "
     "connect: Connection refused (111)", errors.Unavailable, "unreachable", "start the configuration server"),
    ("DNS resolution failed for nohost:443: C-ares status is not ARES_SUCCESS", errors.Unavailable, "unresolvable",
     "DNS"),
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:443: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
     "unable to get local issuer certificate: OK", errors.Unauthenticated, "tls-handshake-failed", "ca.crt"),
    ("failed to connect: Handshake failed: tlsv1 alert unknown ca", errors.Unauthenticated, "tls-handshake-failed",
     "srctl user add"),
    # Closed without an alert and nothing answers to tell a refusal from a restart: retryable, not a refusal.
    ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
     errors.Unavailable, "connection-lost", "retry"),
])
def test_a_failed_connection_says_why_and_what_to_do(profile, details, cls, code, words) -> None:
    error = connection_error(details, profile)
    assert type(error) is cls and error.code == code
    assert words in error.hint and "\n" not in error.message and "\n" not in error.hint


def test_a_refused_connection_with_the_labs_profile_says_to_start_the_lab(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    profile = Profile(path=lab_profile(lab), server="127.0.0.1:1", ca_pem=b"", cert_pem=b"", key_pem=b"")
    error = connection_error("connect: Connection refused (111)", profile)
    assert error.code == "unreachable" and f"srctl lab up --dir {lab}" in error.hint
    assert "sr-config-server" not in error.hint


def test_errors_are_two_lines_with_their_code_and_a_default_hint(capsys) -> None:
    cli_main.report(errors.NotFound("no job\n  called x"), Format.table)
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: no job called x [not-found]",
                   "hint: " + " ".join(cli_main.DEFAULT_HINTS[errors.NotFound].split())]
    for cls in errors.CATEGORIES:
        assert cli_main.DEFAULT_HINTS[cls], f"{cls.__name__} has no default hint"


def test_an_agent_silent_by_design_is_not_a_failure_and_others_still_are() -> None:
    off = ServerRecord(**{**_server("app01", "source").__dict__, "last_heartbeat_at": NOW - timedelta(hours=2)})
    lost = ServerRecord(**{**_server("db01", "source").__dict__, "last_heartbeat_at": NOW - timedelta(hours=2)})
    checks = diagnostics.server_checks([off, lost], interval=10.0, now=NOW,
                                       expected_silent={off.id: "app01 runs in the cloud (failed-over)"})
    beats = {c.subject: c for c in checks if c.name == "heartbeat"}
    assert beats["source app01"].status == "ok" and "runs in the cloud" in beats["source app01"].message
    assert beats["source db01"].status == "failed" and beats["source db01"].code == "heartbeat-stale"


def test_the_error_line_names_the_specific_code_and_prints_brackets_in_the_message_as_they_are(capsys) -> None:
    cli_main.report(errors.PreconditionFailed("VM app01 has [2] snapshots", hint="delete them [all]",
                                              code="vm-has-snapshots"), Format.table)
    assert capsys.readouterr().err.splitlines() == [
        "error: VM app01 has [2] snapshots [vm-has-snapshots]", "hint: delete them [all]"]


@pytest.mark.parametrize("fmt", [Format.json, Format.yaml])
def test_with_output_json_or_yaml_the_error_is_one_document_on_stderr(capsys, fmt: Format) -> None:
    cli_main.report(errors.Unavailable("nothing\n answers", code="unreachable"), fmt)
    captured = capsys.readouterr()
    assert captured.out == ""
    if fmt is Format.json:
        assert len(captured.err.splitlines()) == 1
    document = json.loads(captured.err) if fmt is Format.json else yaml.safe_load(captured.err)
    assert document == {"error": {
        "code": "unreachable", "category": "unavailable", "message": "nothing answers",
        "hint": " ".join(cli_main.DEFAULT_HINTS[errors.Unavailable].split()), "exit_code": 6, "retryable": True,
    }}


@pytest.mark.parametrize(("args", "form"), [
    (["servers", "list"], "lines"),
    (["servers", "list", "--output", "json"], "json"),
    (["servers", "list", "-o", "yaml"], "yaml"),
])
def test_the_console_script_reports_in_the_form_the_command_asked_for(tmp_path: Path, args: list[str], form: str):
    """Through srctl's own error handling: no profile anywhere is `profile-missing` (exit 3)."""
    env = {**os.environ, "HOME": str(tmp_path), "COLUMNS": "200"}
    for name in ("SRCTL_CONFIG", "SRCTL_LAB_DIR", "XDG_STATE_HOME"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "siterecovery.controller.cli.main", *args],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 3 and result.stdout == "", result.stderr
    if form == "lines":
        what, hint = result.stderr.splitlines()
        assert what.startswith("error: no srctl profile found") and what.endswith(" [profile-missing]")
        assert hint.startswith("hint: ")
    else:
        document = json.loads(result.stderr) if form == "json" else yaml.safe_load(result.stderr)
        assert (document["error"]["code"], document["error"]["exit_code"]) == ("profile-missing", 3)
