"""Every daemon's /metrics, scraped over HTTP from real daemons while a disk replicates.

The configuration server, a process server, a master target and a source agent
run as subprocesses with `metrics_listen = "127.0.0.1:0"`; each reports the
port it bound in its state file. The test enables replication, writes through
the source agent's NBD export with qemu-io, and checks that what the pages
say moves the way it must: bytes grow by what was written at every hop, the
RPO is a sane number, jobs and RPCs leave their durations. Every wait polls the
scraped values with a deadline; no sleeps, no fixed ports.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import load_credentials
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc
from siterecovery.common.pki import CONFIG_SERVER_NAME
from siterecovery.controller.registration import KIND as REGISTER_SERVER

from .conftest import wait_for
from .replication_site import SOURCE, MiB, ReplicatingSite

pytestmark = pytest.mark.slow

DAEMONS = ("config-server", "process-server", "master-target", SOURCE)
ON = {"metrics_listen": "127.0.0.1:0"}


class Page:
    """One scrape: samples as (name, labels, value)."""

    def __init__(self, port: int) -> None:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        self.samples = [
            (s.name, s.labels, s.value) for family in text_string_to_metric_families(body) for s in family.samples
        ]

    def get(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` whose labels include `labels`; None when there is none."""
        found = [v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]
        return sum(found) if found else None

    def labels(self, name: str) -> list[dict[str, str]]:
        return [lab for n, lab, _ in self.samples if n == name]


def scraper(rsite: ReplicatingSite):
    ports = {"config-server": rsite.cs.state["metrics_port"]}
    ports.update({name: rsite.agents[name].state["metrics_port"] for name in DAEMONS[1:]})
    assert all(isinstance(p, int) and p > 0 for p in ports.values()), ports
    assert len(set(ports.values())) == len(ports)
    return lambda name: Page(ports[name])


def grew(scrape, daemon: str, name: str, beyond: float, **labels: str):
    """Poll until the metric exceeds `beyond`; return its value."""
    def check():
        value = scrape(daemon).get(name, **labels)
        return value if value is not None and value > beyond else None

    return wait_for(check, timeout=60, what=f"{daemon} {name}{labels} above {beyond}")


def health_check_source(rsite: ReplicatingSite) -> None:
    """One RPC on the source agent's own port, with the administrator's certificate."""
    admin = rsite.cs_dir / "admin"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(admin / "ca.crt").read_bytes(), private_key=(admin / "client.key").read_bytes(),
        certificate_chain=(admin / "client.crt").read_bytes(),
    )
    state = rsite.agents[SOURCE].state
    with secure_channel(f"127.0.0.1:{state['port']}", credentials, target_name=state["tls_name"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_daemon_serves_metrics_that_follow_replication(rsite: ReplicatingSite):
    rsite.start(disk_size=16 * MiB, data_bytes=4 * MiB, cs_extra=ON, ps_extra=ON, mt_extra=ON, source_extra=ON)
    scrape = scraper(rsite)
    for daemon in DAEMONS:
        role = "source" if daemon == SOURCE else daemon
        assert scrape(daemon).get("siterecovery_build_info", role=role) == 1
        assert scrape(daemon).get("process_resident_memory_bytes") > 0

    # -- before replication: agents, heartbeats, registration jobs, RPCs ----------------------
    agents = {rsite.agents[name].state["agent_id"]: name for name in DAEMONS[1:]}

    def heartbeats_fresh():
        page = scrape("config-server")
        ages = {lab["agent"]: page.get("siterecovery_agent_heartbeat_age_seconds", agent=lab["agent"])
                for lab in page.labels("siterecovery_agent_heartbeat_age_seconds")}
        return set(ages) == set(agents) and all(0 <= age < 10 for age in ages.values())

    wait_for(heartbeats_fresh, what="a fresh heartbeat age for every agent")
    cs = scrape("config-server")
    for agent_id in agents:
        assert cs.get("siterecovery_agent_health", agent=agent_id, health="healthy") == 1
    # Every agent's first registration ran a register-server job.
    wait_for(lambda: (scrape("config-server").get("siterecovery_job_duration_seconds_count",
                                                  kind=REGISTER_SERVER, outcome="succeeded") or 0) >= 3,
             what="three register-server job durations")
    cs = scrape("config-server")
    total = cs.get("siterecovery_job_duration_seconds_sum", kind=REGISTER_SERVER, outcome="succeeded")
    assert 0 < total < 3 * 60
    assert cs.get("siterecovery_job_step_duration_seconds_count", kind=REGISTER_SERVER, phase="execute",
                  outcome="succeeded") >= 6
    # RPC latencies: heartbeats on the configuration server, the job's Probe on the data ports.
    assert cs.get("siterecovery_grpc_server_handling_seconds_count", grpc_service="siterecovery.v1.AgentControl",
                  grpc_method="Heartbeat", grpc_code="OK") > 0
    for daemon in ("process-server", "master-target"):
        page = scrape(daemon)
        assert page.get("siterecovery_grpc_server_handling_seconds_count", grpc_method="Probe", grpc_code="OK") >= 1
        assert time.time() - page.get("siterecovery_heartbeat_last_success_timestamp_seconds") < 60
    # A call the guard refuses is timed too, with its code: a source agent's certificate may not list servers.
    source = load_credentials(rsite.root / SOURCE)
    with secure_channel(f"127.0.0.1:{rsite.cs_port}", source.channel_credentials(),
                        target_name=CONFIG_SERVER_NAME) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            admin_pb2_grpc.AdminStub(channel).ListServers(admin_pb2.ListServersRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert scrape("config-server").get("siterecovery_grpc_server_handling_seconds_count", grpc_method="ListServers",
                                       grpc_code="PERMISSION_DENIED") == 1
    health_check_source(rsite)
    assert scrape(SOURCE).get("siterecovery_grpc_server_handling_seconds_count", grpc_service="grpc.health.v1.Health",
                              grpc_method="Check", grpc_type="unary", grpc_code="OK") == 1

    # -- replication ------------------------------------------------------------------------------
    pair = rsite.enable()
    pair_id = pair["pair_id"]
    rsite.wait_replicating()
    rsite.wait_caught_up()
    labels = {"pair": pair_id}
    cs = scrape("config-server")
    assert cs.get("siterecovery_replication_state", **labels, state="replicating") == 1
    assert cs.get("siterecovery_replication_rpo_known", **labels) == 1
    assert 0 <= cs.get("siterecovery_replication_rpo_seconds", **labels) < 60
    assert cs.get("siterecovery_replication_rpo_threshold_seconds", **labels) == 900
    (info,) = [lab for lab in cs.labels("siterecovery_replication_pair_info") if lab["pair"] == pair_id]
    assert info["disk"] == "disk0" and info["process_server"] in agents and info["master_target"] in agents
    assert cs.get("siterecovery_replication_sync_progress_ratio", **labels) == 1
    assert scrape("process-server").get("siterecovery_spool_limit_bytes") == 64 * 1024**3
    assert scrape("process-server").get("siterecovery_grpc_server_in_flight", grpc_method="Replicate") >= 1
    assert scrape("master-target").get("siterecovery_grpc_server_in_flight", grpc_method="Apply") >= 1
    assert scrape(SOURCE).get("siterecovery_pair_sync_total_bytes", **labels) == 16 * MiB

    # -- writes move the byte counters at every hop ---------------------------------------------------
    before = {
        SOURCE: scrape(SOURCE).get("siterecovery_pair_sent_bytes_total", **labels, role="source"),
        "process-server": scrape("process-server").get("siterecovery_pair_sent_bytes_total", **labels),
        "master-target": scrape("master-target").get("siterecovery_pair_applied_bytes_total", **labels),
        "config-server": scrape("config-server").get("siterecovery_replication_applied_bytes_total", **labels),
    }
    assert before["master-target"] >= 4 * MiB  # the initial sync moved the image's data
    rsite.qemu_io("write -P 0x5a 0 2M", "write -P 0xa5 8M 1M", "flush")
    grew(scrape, SOURCE, "siterecovery_pair_sent_bytes_total", before[SOURCE] + 3 * MiB - 1, **labels)
    grew(scrape, "master-target", "siterecovery_pair_applied_bytes_total", before["master-target"] + 3 * MiB - 1,
         **labels)
    # The process server sends compressed data: patterns shrink to almost nothing, but not to nothing.
    grew(scrape, "process-server", "siterecovery_pair_sent_bytes_total", before["process-server"], **labels)
    # The configuration server's view follows at the next heartbeat.
    grew(scrape, "config-server", "siterecovery_replication_applied_bytes_total",
         before["config-server"] + 3 * MiB - 1, **labels)
    # Overwriting synced blocks journals their old contents on the retention drive.
    grew(scrape, "master-target", "siterecovery_pair_journal_bytes", 0, **labels)
    grew(scrape, "config-server", "siterecovery_replication_journal_bytes", 0, **labels)
    rsite.wait_caught_up()
    cs = scrape("config-server")
    assert 0 <= cs.get("siterecovery_replication_rpo_seconds", **labels) < 60
    retention = scrape("master-target").labels("siterecovery_directory_free_bytes")
    assert {lab["kind"] for lab in retention} == {"datastore", "retention"}
