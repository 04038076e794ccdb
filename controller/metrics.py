"""The configuration server's /metrics: its view of every agent and pair, and its jobs.

`StoreCollector` computes, when scraped, from the store — the same functions
`srctl servers list` and `srctl replication status` use (`controller/health.py`,
`replication.view`), so the page and the CLI agree, and nothing is updated on
every heartbeat. A scrape is a fixed handful of reads (servers, pairs,
machines, every pair report, active jobs) whatever the number of pairs; its
cost is `siterecovery_metrics_collect_seconds{collector="store"}`. With
several configuration servers on one PostgreSQL store, each shows the same
store-wide view: aggregate with max, not sum.

Agents (revoked ones left out), labels agent, role, hostname:
  siterecovery_agent_heartbeat_age_seconds         since the agent's last heartbeat
  siterecovery_agent_health{health}                1 for healthy | warning | critical
  siterecovery_agent_heartbeat_interval_seconds    what agents are told (no labels)
Pairs, labels pair, machine, disk (the machine's host name and the disk's name):
  siterecovery_replication_pair_info{group, process_server, master_target, mode, target_kind}  1
  siterecovery_replication_state{state}            1 for the combined state
  siterecovery_replication_rpo_seconds             age of the oldest write not applied at the target;
                                                   absent while unknown (an agent is silent)
  siterecovery_replication_rpo_known               1 when the RPO is known
  siterecovery_replication_rpo_threshold_seconds   the pair's RPO alert (its protection group's policy)
  siterecovery_replication_applied_bytes_total     payload the target applied over the pair's life
  siterecovery_replication_throughput_bytes_per_second   the source's recent send rate
  siterecovery_replication_source_backlog_bytes, _spool_backlog_bytes, _journal_bytes
  siterecovery_replication_recovery_points, _latest_point_timestamp_seconds
  siterecovery_replication_sync_progress_ratio     0..1 (1 once synced)
  siterecovery_replication_open_views              point views open on the master target
  siterecovery_replication_oldest_open_view_timestamp_seconds   when the oldest was opened;
                                                   absent with none (each pins the undo journal)
Jobs:
  siterecovery_jobs{kind, status}                  jobs pending, running or compensating
  siterecovery_job_duration_seconds{kind, outcome}            histogram, creation to end (JobMetrics)
  siterecovery_job_step_duration_seconds{kind, phase, outcome} histogram, one run of a step

Values come from the agents' last heartbeats: they move every heartbeat
interval, not at each scrape.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.health import CRITICAL, HEALTHY, WARNING, derive_health
from siterecovery.controller.jobs import states
from siterecovery.controller.store.base import Store

STATES = {
    rpb.PAIR_STATE_INITIAL_SYNC: "initial-sync",
    rpb.PAIR_STATE_REPLICATING: "replicating",
    rpb.PAIR_STATE_PAUSED: "paused",
    rpb.PAIR_STATE_ERROR: "error",
}
# Jobs last from a second (registering a server) to hours (a first sync of a large disk).
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ACTIVE_JOBS_LIMIT = 10_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StoreCollector:
    def __init__(self, store: Store, *, heartbeat_interval: float, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._interval = heartbeat_interval
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        return [*self._agents(now), *self._pairs(now), self._jobs()]

    # -- agents ------------------------------------------------------------------------------
    def _agents(self, now: datetime) -> list[Metric]:
        labels = ["agent", "role", "hostname"]
        age = GaugeMetricFamily("siterecovery_agent_heartbeat_age_seconds",
                                "Seconds since the agent's last heartbeat reached the configuration server.",
                                labels=labels)
        health = GaugeMetricFamily("siterecovery_agent_health",
                                   "1 for the agent's health as srctl servers list shows it.",
                                   labels=[*labels, "health"])
        for server in self._store.list_servers():
            if server.revoked_at is not None:
                continue
            key = [server.id, server.role, server.hostname]
            if server.last_heartbeat_at is not None:
                age.add_metric(key, max(0.0, (now - server.last_heartbeat_at).total_seconds()))
            derived, _reason = derive_health(
                last_heartbeat_at=server.last_heartbeat_at, problems=server.problems, interval=self._interval, now=now
            )
            for name in (HEALTHY, WARNING, CRITICAL):
                health.add_metric([*key, name], 1.0 if derived == name else 0.0)
        interval = GaugeMetricFamily("siterecovery_agent_heartbeat_interval_seconds",
                                     "The heartbeat interval agents are told to keep.", value=self._interval)
        return [age, health, interval]

    # -- pairs ---------------------------------------------------------------------------------
    def _pairs(self, now: datetime) -> list[Metric]:
        labels = ["pair", "machine", "disk"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"siterecovery_replication_{name}", doc, labels=[*labels, *extra])

        info = gauge("pair_info", "The pair's route and settings (value 1).",
                     ("group", "process_server", "master_target", "mode", "target_kind"))
        state = gauge("state", "1 for the pair's combined state.", ("state",))
        rpo = gauge("rpo_seconds", "Age of the oldest write not yet applied at the target (absent while unknown).")
        rpo_known = gauge("rpo_known", "1 when the RPO is known; 0 while an agent of the pair is silent.")
        threshold = gauge("rpo_threshold_seconds", "The pair's RPO alert threshold (protection group policy).")
        applied = CounterMetricFamily("siterecovery_replication_applied_bytes",
                                      "Payload bytes the target applied over the pair's life.", labels=labels)
        throughput = gauge("throughput_bytes_per_second", "The source agent's recent send rate.")
        source_backlog = gauge("source_backlog_bytes", "Bytes journaled at the source, not yet at the process server.")
        spool_backlog = gauge("spool_backlog_bytes", "Bytes spooled at the process server, not yet at the target.")
        journal = gauge("journal_bytes", "Undo journal bytes on the master target's retention drive.")
        points = gauge("recovery_points", "Recovery points held at the target.")
        latest = gauge("latest_point_timestamp_seconds", "Capture time of the newest recovery point.")
        progress = gauge("sync_progress_ratio", "Initial sync progress, 0 to 1.")
        open_views = gauge("open_views", "Point views open on the master target (each pins the undo journal).")
        oldest_view = gauge("oldest_open_view_timestamp_seconds", "When the oldest open point view was opened.")

        pairs = {p.id: p for p in self._store.list_pairs()}
        views = replication.views(self._store, list(pairs.values()), heartbeat_interval=self._interval, now=now)
        for view in views:
            pair = pairs[view.pair_id]
            key = [view.pair_id, view.machine_hostname, view.disk_name]
            info.add_metric([*key, pair.group_id, pair.process_server_id, pair.master_target_id, pair.mode,
                             pair.target_kind], 1.0)
            for value, name in STATES.items():
                state.add_metric([*key, name], 1.0 if view.state == value else 0.0)
            rpo_known.add_metric(key, 1.0 if view.rpo_known else 0.0)
            if view.rpo_known:
                rpo.add_metric(key, view.rpo_seconds)
            threshold.add_metric(key, view.policy.rpo_threshold_seconds)
            applied.add_metric(key, view.applied_bytes_total)
            throughput.add_metric(key, view.throughput_bytes_per_second)
            source_backlog.add_metric(key, view.source_backlog_bytes)
            spool_backlog.add_metric(key, view.spool_backlog_bytes)
            journal.add_metric(key, view.journal_bytes)
            points.add_metric(key, view.recovery_points)
            if view.HasField("latest_point_at"):
                latest.add_metric(key, view.latest_point_at.seconds + view.latest_point_at.nanos / 1e9)
            progress.add_metric(key, view.sync_progress)
            open_views.add_metric(key, len(view.open_views))
            if view.open_views:
                first = min(v.opened_at.seconds + v.opened_at.nanos / 1e9 for v in view.open_views)
                oldest_view.add_metric(key, first)
        return [info, state, rpo, rpo_known, threshold, applied, throughput, source_backlog, spool_backlog,
                journal, points, latest, progress, open_views, oldest_view]

    # -- jobs ----------------------------------------------------------------------------------
    def _jobs(self) -> Metric:
        family = GaugeMetricFamily("siterecovery_jobs", "Jobs pending, running or compensating.",
                                   labels=["kind", "status"])
        active = self._store.list_jobs(statuses=states.ACTIVE_JOB_STATUSES, limit=ACTIVE_JOBS_LIMIT)
        for (kind, status), count in sorted(Tally((j.kind, j.status) for j in active).items()):
            family.add_metric([kind, status], count)
        return family


class JobMetrics:
    """The job engine's observer (controller/jobs/engine.py, JobObserver): durations as histograms.

    Step outcomes: succeeded, failed, waiting (the step raised Waiting and is
    looked at again later), lease-lost, stopped (the server stopped mid-retry).
    A job's duration runs from its creation to its end and is recorded by the
    runner that ends it (outcome: succeeded, compensated or failed).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Histogram(
            "siterecovery_job_duration_seconds", "Jobs from creation to their end, by kind and outcome.",
            ["kind", "outcome"], buckets=JOB_BUCKETS, registry=registry,
        )
        self.steps = Histogram(
            "siterecovery_job_step_duration_seconds",
            "One run of a job step (retries in place included), by kind, phase and outcome.",
            ["kind", "phase", "outcome"], buckets=STEP_BUCKETS, registry=registry,
        )

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
        self.jobs.labels(kind, outcome).observe(max(0.0, seconds))

    def step_finished(self, kind: str, phase: str, outcome: str, seconds: float) -> None:
        self.steps.labels(kind, phase, outcome).observe(max(0.0, seconds))
