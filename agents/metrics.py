"""What an agent's /metrics shows, read when scraped (common/metrics.py serves it).

Every agent reports a `PairStatus` per pair with each heartbeat; `PairCollector`
turns the same statuses into metrics, so the page and the configuration
server's view cannot disagree about what a field means (replication.proto
documents each one). Labels: `pair` and `role` (source, process-server,
master-target), so one dashboard query covers every hop.

Per pair (every role):
  siterecovery_pair_state{state}                  1 for the state the agent reports
  siterecovery_pair_last_seq, _acked_seq          seqs produced/spooled/applied, acknowledged
  siterecovery_pair_backlog_bytes, _frames        waiting at this hop (source journal, spool)
  siterecovery_pair_oldest_pending_age_seconds    age of the oldest write waiting here (0: none)
Source and process server:
  siterecovery_pair_sent_bytes_total              payload sent to the next hop since the agent started
  siterecovery_pair_throughput_bytes_per_second   the agent's own recent rate
Source: siterecovery_pair_sync_done_bytes, _sync_total_bytes (initial or delta sync).
Master target (and a process server ending an Azure pair):
  siterecovery_pair_applied_bytes_total           payload applied over the pair's life
  siterecovery_pair_journal_bytes                 undo journal on the retention drive
  siterecovery_pair_recovery_points, _latest_point_timestamp_seconds,
  siterecovery_pair_applied_capture_timestamp_seconds

Per agent: `siterecovery_heartbeat_last_success_timestamp_seconds`,
`siterecovery_heartbeat_failures_total` (the control plane as the agent sees
it), and `siterecovery_directory_{size,free,agent_used}_bytes{kind, path}` for
its spool, datastore and retention directories, as of the last heartbeat (no
directory walk at scrape time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from siterecovery.common.pb import common_pb2
from siterecovery.common.pb import replication_pb2 as rpb

STATES = {
    rpb.PAIR_STATE_INITIAL_SYNC: "initial-sync",
    rpb.PAIR_STATE_REPLICATING: "replicating",
    rpb.PAIR_STATE_PAUSED: "paused",
    rpb.PAIR_STATE_ERROR: "error",
}
SENDING_ROLES = ("source", "process-server")
DIRECTORY_KINDS = {
    common_pb2.DIRECTORY_KIND_SPOOL: "spool",
    common_pb2.DIRECTORY_KIND_DATASTORE: "datastore",
    common_pb2.DIRECTORY_KIND_RETENTION: "retention",
    common_pb2.DIRECTORY_KIND_STATE: "state",
}


def _seconds(stamp) -> float:  # google.protobuf.Timestamp
    return stamp.seconds + stamp.nanos / 1e9


class PairCollector:
    """The pairs an agent serves, from `statuses()` (its PairParticipant.pair_statuses)."""

    def __init__(self, role: str, statuses: Callable[[], Sequence[rpb.PairStatus]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.role = role
        self._statuses = statuses
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        labels = ["pair", "role"]
        now = self._clock()

        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"siterecovery_pair_{name}", doc, labels=[*labels, *extra])

        state = gauge("state", "1 for the state this agent reports for the pair.", ["state"])
        last_seq = gauge("last_seq", "Highest seq produced (source), spooled (process server) or applied (master target).")
        acked_seq = gauge("acked_seq", "Highest seq the next hop acknowledged.")
        backlog_bytes = gauge("backlog_bytes", "Bytes waiting at this hop for the next one.")
        backlog_frames = gauge("backlog_frames", "Frames waiting at this hop for the next one.")
        pending_age = gauge("oldest_pending_age_seconds", "Age of the oldest write waiting at this hop (0: none).")
        sent = CounterMetricFamily("siterecovery_pair_sent_bytes", "Payload bytes sent to the next hop since the agent started.", labels=labels)
        rate = gauge("throughput_bytes_per_second", "Recent send rate as the agent measures it.")
        sync_done = gauge("sync_done_bytes", "Initial or delta sync: bytes of the disk done.")
        sync_total = gauge("sync_total_bytes", "Initial or delta sync: bytes of the disk to do.")
        applied = CounterMetricFamily("siterecovery_pair_applied_bytes", "Payload bytes applied at the target over the pair's life.", labels=labels)
        journal = gauge("journal_bytes", "Undo journal bytes on the retention drive.")
        points = gauge("recovery_points", "Recovery points held for the pair.")
        latest_point = gauge("latest_point_timestamp_seconds", "Capture time of the newest recovery point.")
        applied_at = gauge("applied_capture_timestamp_seconds", "Capture time (source clock) of the last write applied.")

        for status in self._statuses():
            key = [status.pair_id, self.role]
            for value, name in STATES.items():
                state.add_metric([*key, name], 1.0 if status.state == value else 0.0)
            last_seq.add_metric(key, status.last_seq)
            backlog_bytes.add_metric(key, status.backlog_bytes)
            backlog_frames.add_metric(key, status.backlog_frames)
            pending = status.oldest_pending_captured_at if status.HasField("oldest_pending_captured_at") else None
            pending_age.add_metric(key, max(0.0, now - _seconds(pending)) if pending is not None else 0.0)
            if self.role in SENDING_ROLES:
                acked_seq.add_metric(key, status.acked_seq)
                sent.add_metric(key, status.bytes_sent)
                rate.add_metric(key, status.throughput_bytes_per_second)
            if self.role == "source":
                sync_done.add_metric(key, status.sync_done_bytes)
                sync_total.add_metric(key, status.sync_total_bytes)
            if self.role == "master-target" or status.applied_bytes_total or status.points:
                applied.add_metric(key, status.applied_bytes_total)
                journal.add_metric(key, status.journal_bytes)
                points.add_metric(key, len(status.points))
                if status.points:
                    latest_point.add_metric(key, _seconds(status.points[-1].captured_at))
                if status.HasField("applied_captured_at"):
                    applied_at.add_metric(key, _seconds(status.applied_captured_at))
        return [state, last_seq, acked_seq, backlog_bytes, backlog_frames, pending_age, sent, rate,
                sync_done, sync_total, applied, journal, points, latest_point, applied_at]


class AgentCollector:
    """The agent's own view of the control plane, and its directories as of the last heartbeat.

    `heartbeat()` returns (Unix time of the last successful registration or
    heartbeat or None, failed attempts since start); `directories()` the
    DirectoryFacts last sent.
    """

    def __init__(self, heartbeat: Callable[[], tuple[float | None, int]],
                 directories: Callable[[], Sequence[common_pb2.DirectoryFacts]]) -> None:
        self._heartbeat = heartbeat
        self._directories = directories

    def collect(self) -> Iterable[Metric]:
        last, failures = self._heartbeat()
        out: list[Metric] = []
        if last is not None:
            out.append(GaugeMetricFamily(
                "siterecovery_heartbeat_last_success_timestamp_seconds",
                "When the configuration server last answered a registration or heartbeat.", value=last,
            ))
        out.append(CounterMetricFamily(
            "siterecovery_heartbeat_failures",
            "Registrations and heartbeats that failed (each retry counts).", value=failures,
        ))
        labels = ["kind", "path"]
        size = GaugeMetricFamily("siterecovery_directory_size_bytes", "Size of the file system holding the directory.", labels=labels)
        free = GaugeMetricFamily("siterecovery_directory_free_bytes", "Free bytes on the file system holding the directory.", labels=labels)
        used = GaugeMetricFamily("siterecovery_directory_agent_used_bytes", "Bytes the agent itself keeps in the directory (counted at most once a minute).", labels=labels)
        for facts in self._directories():
            key = [DIRECTORY_KINDS.get(facts.kind, "other"), facts.path]
            size.add_metric(key, facts.total_bytes)
            free.add_metric(key, facts.free_bytes)
            used.add_metric(key, facts.used_by_agent_bytes)
        return [*out, size, free, used]
