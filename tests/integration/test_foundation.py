"""Enrollment, registration, heartbeats and health with real daemons over mTLS."""

from __future__ import annotations

import hashlib
import stat
from datetime import UTC, datetime

import pytest

from siterecovery.controller import launcher

from .conftest import HEARTBEAT, Site, wait_for


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def start_whole_site(site: Site) -> dict[str, launcher.Launched]:
    site.start_config_server()
    return {name: site.start_agent(name) for name in ("process-server", "master-target", "source-agent")}


def test_enroll_register_heartbeat_and_health_are_visible(site: Site):
    agents = start_whole_site(site)
    servers = wait_for(
        lambda: (s := site.servers()) and len(s) == 3 and all(x["health"] == "healthy" for x in s) and s,
        what="three healthy servers",
    )
    by_role = {s["role"]: s for s in servers}
    assert set(by_role) == {"source", "process-server", "master-target"}
    for role, daemon in (("process-server", "process-server"), ("master-target", "master-target"), ("source", "source-agent")):
        assert by_role[role]["id"] == agents[daemon].state["agent_id"]
    assert by_role["process-server"]["inventory"]["data_endpoint"] == f"127.0.0.1:{agents['process-server'].state['port']}"
    kinds = {d["kind"] for d in by_role["master-target"]["inventory"]["directories"]}
    assert kinds == {"DIRECTORY_KIND_DATASTORE", "DIRECTORY_KIND_RETENTION"}
    assert all(int(d["free_bytes"]) > 0 for d in by_role["master-target"]["inventory"]["directories"])
    assert by_role["process-server"]["inventory"]["directories"][0]["kind"] == "DIRECTORY_KIND_SPOOL"
    # The source agent's state directory, where its journals live, with its free space.
    (state,) = by_role["source"]["inventory"]["directories"]
    assert state["kind"] == "DIRECTORY_KIND_STATE" and state["path"] == str(agents["source-agent"].state_dir)
    assert int(state["free_bytes"]) > 0 and int(state["total_bytes"]) >= int(state["free_bytes"])

    # Heartbeats keep arriving: the last one moves forward.
    first = parse_time(by_role["source"]["last_heartbeat_at"])
    wait_for(
        lambda: any(parse_time(s["last_heartbeat_at"]) > first for s in site.servers() if s["role"] == "source"),
        what="a later heartbeat",
    )

    machines = site.srctl_json("machines", "list")
    assert len(machines) == 1
    disk = machines[0]["disks"][0]
    assert disk["name"] == "disk0" and int(disk["size_bytes"]) == 8 * 1024 * 1024
    assert disk["identity"].startswith("file-")

    # Keys never leave the agent and are private to it.
    for name in ("process-server", "master-target", "source-agent"):
        for secret in ("agent.key", "agent.crt", "identity.json"):
            assert stat.S_IMODE((site.root / name / "identity" / secret).stat().st_mode) == 0o600

    # The configuration server lists itself first, with its state directory's space.
    me = site.srctl_json("servers", "list")[0]
    assert me["role"] == "config-server" and me["health"] == "healthy"
    assert me["inventory"]["data_endpoint"] == f"127.0.0.1:{site.cs_port}"
    assert me["inventory"]["directories"][0]["kind"] == "DIRECTORY_KIND_STATE"

    # The table for people shows the same thing.
    table = site.srctl("servers", "list")
    assert table.returncode == 0 and "healthy" in table.stdout and "process-server" in table.stdout
    assert "1 disk(s), state " in table.stdout  # the source agent's row


def test_a_disk_keeps_its_identity_across_agent_restarts(site: Site):
    site.start_config_server()
    agent = site.start_agent("source-agent")
    identity = wait_for(lambda: site.srctl_json("machines", "list"), what="machine")[0]["disks"][0]["identity"]
    assert launcher.stop(agent)
    site.daemons.remove(agent)
    site.start_agent("source-agent")
    assert site.srctl_json("machines", "list")[0]["disks"][0]["identity"] == identity


def test_wrong_passphrase_is_refused_and_nothing_is_written(site: Site):
    site.start_config_server()
    wrong = site.root / "wrong-passphrase"
    wrong.write_text("not-the-passphrase\n")
    result = site.run_agent("process-server", "ps", passphrase_file=wrong)
    assert result.returncode == 8, result.stderr
    assert "passphrase is wrong" in result.stderr
    assert "srctl passphrase show" in result.stderr
    assert not (site.root / "ps" / "identity").exists()
    assert site.servers() == []
    assert "not-the-passphrase" not in (site.root / "logs" / "config-server.log").read_text()


def test_missing_passphrase_file_is_a_clear_error(site: Site):
    site.start_config_server()
    result = site.run_agent("master-target", "mt", passphrase_file=site.root / "absent")
    assert result.returncode == 2
    assert "absent" in result.stderr
    assert not (site.root / "mt" / "identity").exists()


def test_health_turns_warning_then_critical_when_an_agent_dies(site: Site):
    agents = start_whole_site(site)
    wait_for(lambda: all(s["health"] == "healthy" for s in site.servers()), what="healthy")
    launcher.kill9(agents["master-target"])

    def health_of_master_target():
        return next(s["health"] for s in site.servers() if s["role"] == "master-target")

    wait_for(lambda: health_of_master_target() == "warning", timeout=10 * HEARTBEAT + 10, what="warning")
    wait_for(lambda: health_of_master_target() == "critical", timeout=20 * HEARTBEAT + 10, what="critical")
    reason = next(s["health_reason"] for s in site.servers() if s["role"] == "master-target")
    assert reason.startswith("no heartbeat for")


def test_agents_reconnect_after_a_config_server_restart_without_enrolling_again(site: Site):
    start_whole_site(site)
    servers = wait_for(lambda: len(found := site.servers()) == 3 and found, what="servers")
    before = {s["id"] for s in servers}
    certs = {
        name: hashlib.sha256((site.root / name / "identity" / "agent.crt").read_bytes()).hexdigest()
        for name in ("process-server", "master-target", "source-agent")
    }
    assert site.cs is not None and launcher.stop(site.cs)
    site.daemons.remove(site.cs)
    restarted_at = datetime.now(UTC)
    site.start_config_server(port=site.cs_port)

    def all_heartbeat_again():
        servers = site.servers()
        # A server that had not heartbeated before the restart has no last_heartbeat_at yet.
        heard = all(s.get("last_heartbeat_at") and parse_time(s["last_heartbeat_at"]) > restarted_at for s in servers)
        return servers if heard else None

    servers = wait_for(all_heartbeat_again, timeout=30, what="heartbeats after the restart")
    assert {s["id"] for s in servers} == before
    assert all(s["health"] == "healthy" for s in servers)
    for name, digest in certs.items():
        assert hashlib.sha256((site.root / name / "identity" / "agent.crt").read_bytes()).hexdigest() == digest


def test_agent_started_while_the_server_is_down_recovers_by_itself(site: Site):
    site.start_config_server()
    passphrase_file = site.passphrase_file()
    port = site.cs_port
    assert site.cs is not None and launcher.stop(site.cs)
    site.daemons.remove(site.cs)
    import subprocess
    import sys

    config, state_dir = site.agent_config("source-agent", "late", passphrase_file=passphrase_file)
    log = open(site.root / "logs" / "late.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", launcher.MODULES["source-agent"], "--config", str(config)], stdout=log, stderr=log)
    try:
        wait_for(lambda: "enrollment failed; retrying" in (site.root / "logs" / "late.log").read_text(), what="a retry")
        site.start_config_server(port=port)
        wait_for(lambda: [s for s in site.servers() if s["health"] == "healthy"], timeout=30, what="late agent healthy")
        assert (state_dir / "identity" / "agent.crt").exists()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        log.close()


@pytest.mark.parametrize("daemon", ["config-server", "process-server"])
def test_sigterm_stops_gracefully(site: Site, daemon: str):
    site.start_config_server()
    target = site.cs if daemon == "config-server" else site.start_agent(daemon)
    assert target is not None
    proc = target.process()
    assert proc is not None
    assert launcher.stop(target, grace=10)
    assert "stopped" in target.log_path.read_text()


def test_each_new_server_gets_a_registration_job_that_probes_its_data_port(site: Site):
    start_whole_site(site)

    def finished_jobs():
        jobs = site.srctl_json("jobs", "list")
        return jobs if len(jobs) == 3 and all(j["status"] == "succeeded" for j in jobs) else None

    jobs = wait_for(finished_jobs, timeout=30, what="three finished registration jobs")
    assert {j["kind"] for j in jobs} == {"register-server"}
    data_jobs = [j for j in jobs if not j["target"].startswith("source")]
    assert len(data_jobs) == 2
    for job in data_jobs:
        detail = site.srctl_json("jobs", "show", job["id"])
        probe = next(s for s in detail["steps"] if s["name"] == "probe-data-endpoint")
        assert probe["status"] == "succeeded" and "answers over mutual TLS" in probe["message"]
    watched = site.srctl("jobs", "watch", jobs[0]["id"], "--output", "json")
    assert watched.returncode == 0, watched.stderr
    assert '"status": "succeeded"' in watched.stdout.splitlines()[-1]
    # Restarting an agent registers it again but starts no second job.
    assert len(site.srctl_json("jobs", "list")) == 3


def test_an_unreachable_advertised_endpoint_fails_its_registration_job_with_the_fix(site: Site):
    site.start_config_server()
    site.start_agent("process-server", "ps", advertise="127.0.0.2")

    def failed_job():
        jobs = site.srctl_json("jobs", "list")
        return jobs[0] if jobs and jobs[0]["status"] in ("compensated", "failed") else None

    job = wait_for(failed_job, timeout=60, what="the registration job to fail")
    assert job["error_code"] == "data-endpoint-unreachable"
    assert "127.0.0.2" in job["error_message"]
    watched = site.srctl("jobs", "watch", job["id"])
    assert watched.returncode == 5
    missing = site.srctl("jobs", "show", "0000-not-a-job")
    assert missing.returncode == 3 and "srctl jobs list" in missing.stderr


def test_passphrase_rotation_refuses_the_old_one_and_keeps_enrolled_agents(site: Site):
    site.start_config_server()
    old = site.passphrase()
    old_file = site.passphrase_file(old)
    site.start_agent("source-agent", "first", passphrase_file=old_file)
    rotated = site.srctl_json("passphrase", "rotate")["passphrase"]
    assert rotated != old and site.passphrase() == rotated

    stale = site.root / "stale"
    stale.write_text(old)
    refused = site.run_agent("master-target", "second", passphrase_file=stale)
    assert refused.returncode == 8 and "passphrase is wrong" in refused.stderr
    fresh = site.root / "fresh"
    fresh.write_text(rotated)
    site.start_agent("master-target", "third", passphrase_file=fresh)

    def both_healthy():
        servers = site.servers()
        return len(servers) == 2 and all(s["health"] == "healthy" for s in servers)

    wait_for(both_healthy, what="both agents healthy")
    for log in (site.root / "logs").iterdir():
        text = log.read_text()
        assert old not in text and rotated not in text, f"{log.name} logs a passphrase"
