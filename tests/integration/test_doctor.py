"""`srctl doctor` against real daemons: all green, then one thing broken at a time.

A whole two-site setup (`FailbackSite`: configuration server, a process server
and a master target at each site, VM app01 protected to the cloud) answers
every check; then a snapshot on the original VM, a master target that does
not reach its datastore, a stopped process server and a missing original VM
each fail their check, with the fix, and the exit code says so. Certificates
near and past their expiry are made with the server's own CA. srctl runs as a
subprocess; no sleeps, no fixed ports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from siterecovery.common import pki
from siterecovery.controller import launcher
from siterecovery.controller.cli.client import Profile
from siterecovery.controller.cli.session import connection_error

from .conftest import Site
from .failback_site import VM, FailbackSite


def doctor(site: Site, *args: str, config: Path | None = None) -> tuple[int, dict]:
    result = site.srctl("doctor", *args, "--output", "json", config=config)
    assert result.returncode in (0, 5), result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, report


def by_name(report: dict, name: str, subject: str = "") -> list[dict]:
    return [c for c in report["checks"] if c["name"] == name and subject in c["subject"]]


def failed(report: dict) -> list[dict]:
    return [c for c in report["checks"] if c["status"] == "failed"]


def test_all_green_then_snapshots_a_wrong_master_target_a_stopped_process_server_and_a_missing_vm(
    protected: FailbackSite,
) -> None:
    code, report = doctor(protected, "--machine", VM, "--master-target", "mt-onprem")
    assert code == 0 and failed(report) == [], json.dumps(report, indent=1)
    assert {c["status"] for c in report["checks"]} <= {"ok", "skipped"}, json.dumps(report, indent=1)
    assert by_name(report, "reachable", "configuration server")[0]["status"] == "ok"
    assert by_name(report, "clock skew")[0]["status"] == "ok"
    for name in ("client certificate", "CA certificate"):
        assert by_name(report, name)[0]["status"] == "ok"
    # Every agent: heartbeat and certificate (recorded by the server at registration); each data port.
    for agent in ("ps-onprem", "ps-cloud", "mt-onprem", "mt-cloud", VM):
        assert by_name(report, "heartbeat", agent)[0]["status"] == "ok"
        (cert,) = by_name(report, "certificate", agent)
        assert cert["status"] == "ok" and "valid until" in cert["message"], cert
    for agent in ("ps-onprem", "ps-cloud", "mt-onprem", "mt-cloud"):
        (port,) = by_name(report, "replication port", agent)
        assert port["status"] == "ok" and "accepts connections" in port["message"]
    kinds = {c["name"] for c in report["checks"] if c["name"].endswith("free space")}
    assert {"spool free space", "datastore free space", "retention free space", "state free space"} <= kinds
    rules = [c for c in report["checks"] if c["name"].startswith("failback: ")]
    assert [c["name"] for c in rules] == [
        "failback: state", "failback: physical servers fail back to a new VM", "failback: original VM exists",
        "failback: original VM has no snapshots", "failback: original VM's datastore reachable",
    ]
    assert all(c["status"] == "ok" for c in rules)
    table = protected.srctl("doctor", "--machine", VM, "--master-target", "mt-onprem")
    assert table.returncode == 0 and "✓" in table.stdout and "no failures" in table.stdout
    # Shell completion (typer's) offers the server's names: TAB after `srctl machine failover a`.
    words = ["srctl", "--config", str(protected.profile), "machine", "failover", "a"]
    completed = subprocess.run([str(Path(sys.executable).parent / "srctl")], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "_SRCTL_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(words),
                                    "COMP_CWORD": str(len(words) - 1)})
    assert completed.stdout.split() == [VM], completed.stderr

    # Two failback rules broken at once: both are reported, each with its fix (a reprotect shows only the first).
    vm_json = protected.sites.onprem.vm_dir(VM) / "vm.json"
    data = json.loads(vm_json.read_text())
    vm_json.write_text(json.dumps({**data, "snapshots": ["before-patch", "after-patch"]}))
    code, report = doctor(protected, "--machine", VM, "--master-target", "mt-cloud")
    assert code == 5
    assert {(c["name"], c["code"]) for c in failed(report)} == {
        ("failback: original VM has no snapshots", "vm-has-snapshots"),
        ("failback: original VM's datastore reachable", "datastore-unreachable"),
    }
    (snapshots,) = by_name(report, "failback: original VM has no snapshots")
    assert "VM app01 has 2 snapshots" in snapshots["message"] and "delete them" in snapshots["hint"]
    table = protected.srctl("doctor", "--machine", VM, "--master-target", "mt-cloud")
    assert table.returncode == 5 and "✗" in table.stdout and "fix: delete them, then run reprotect again" in table.stdout
    vm_json.write_text(json.dumps(data))

    # A stopped process server: its port check fails, with what to do.
    ps_cloud = next(d for d in protected.daemons if d.state_dir.name == "ps-cloud")
    launcher.stop(ps_cloud)
    protected.daemons.remove(ps_cloud)
    code, report = doctor(protected)
    assert code == 5
    (port,) = by_name(report, "replication port", "ps-cloud")
    assert port["status"] == "failed" and "connection refused" in port["message"]
    assert "sr-process-server runs on ps-cloud" in port["hint"]
    assert by_name(report, "replication port", "ps-onprem")[0]["status"] == "ok"

    # The original VM is gone: that rule fails, the ones that need it are skipped with the reason.
    protected.sites.onprem.delete_vm(VM)
    code, report = doctor(protected, "--machine", VM, "--master-target", "mt-onprem")
    assert code == 5
    (missing,) = by_name(report, "failback: original VM exists")
    assert missing["status"] == "failed" and "--target new" in missing["hint"]
    for rule in ("failback: original VM has no snapshots", "failback: original VM's datastore reachable"):
        assert by_name(report, rule)[0]["status"] == "skipped"
    # With no master target chosen, the rule that needs one says what is missing.
    code, report = doctor(protected, "--machine", VM, "--target", "new")
    assert [c["status"] for c in report["checks"] if c["name"].startswith("failback: original")] == ["skipped"] * 3
    code, report = doctor(protected, "--machine", "no-such-machine")
    (unknown,) = by_name(report, "failback: protected machine")
    assert unknown["status"] == "failed" and "srctl machine list" in unknown["hint"]


def _profile_with(site: Site, name: str, key_pem: bytes, cert_pem: bytes, *, server: str | None = None,
                  ca_pem: bytes | None = None) -> Path:
    directory = site.root / name
    directory.mkdir()
    (directory / "client.key").write_bytes(key_pem)
    (directory / "client.crt").write_bytes(cert_pem)
    (directory / "ca.crt").write_bytes(ca_pem or (site.cs_dir / "admin" / "ca.crt").read_bytes())
    profile = directory / "srctl.toml"
    profile.write_text(tomli_w.dumps({"server": server or f"127.0.0.1:{site.cs_port}", "ca": "ca.crt",
                                      "cert": "client.crt", "key": "client.key"}))
    return profile


def _certificate(site: Site, *, days: float) -> tuple[bytes, bytes]:
    """An admin certificate from the server's own CA valid for `days` more days (negative: expired)."""
    ca = pki.CertificateAuthority.load_or_create(site.cs_dir / "pki")
    key = pki.generate_key()
    now = dt.datetime.now(dt.UTC)
    identity = pki.Identity(id=f"doctor-{abs(days):g}", role=pki.ADMIN)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, identity.id)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca._key, hashes.SHA256())
    )
    return pki.private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_certificates_near_and_past_expiry_an_unreachable_server_and_a_foreign_ca(site: Site) -> None:
    site.start_config_server()
    code, report = doctor(site)
    assert code == 0, json.dumps(report, indent=1)

    soon = _profile_with(site, "soon", *_certificate(site, days=10))
    code, report = doctor(site, config=soon)
    (mine,) = by_name(report, "client certificate")
    assert code == 0 and mine["status"] == "warning" and "expires in" in mine["message"], mine
    assert "srctl user add" in mine["hint"]

    # A closed connection is a refusal only when the server refuses this certificate (it closes without
    # an alert under TLS 1.3); otherwise it was restarting or overloaded: retryable (exit 6).
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert connection_error(closed, Profile.load(soon)).code == "connection-lost"

    expired = _profile_with(site, "expired", *_certificate(site, days=-1))
    assert connection_error(closed, Profile.load(expired)).code == "tls-handshake-failed"
    code, report = doctor(site, config=expired)
    assert code == 5
    (mine,) = by_name(report, "client certificate")
    assert mine["status"] == "failed" and "expired on" in mine["message"]
    (server,) = by_name(report, "reachable", "configuration server")
    assert server["status"] == "failed" and server["code"] == "tls-handshake-failed", server
    assert by_name(report, "clock skew")[0]["status"] == "skipped"

    admin = site.cs_dir / "admin"
    nobody = _profile_with(site, "nobody", (admin / "client.key").read_bytes(), (admin / "client.crt").read_bytes(),
                           server=f"127.0.0.1:{_closed_port()}")
    code, report = doctor(site, config=nobody)
    (server,) = by_name(report, "reachable", "configuration server")
    assert code == 5 and "connection refused" in server["message"] and "start the configuration server" in server["hint"]
    table = site.srctl("doctor", config=nobody)
    assert table.returncode == 5 and "✗" in table.stdout and "fix: start the configuration server" in table.stdout
