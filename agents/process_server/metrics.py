"""The process server's spool on its /metrics page (read when scraped; see agents/metrics.py for pairs).

  siterecovery_spool_used_bytes        unreleased frames of every pair plus reservations
  siterecovery_spool_limit_bytes       spool_limit_bytes: sources are held back at this
  siterecovery_spool_waiting_receivers streams held back for lack of room right now
  siterecovery_spool_damaged_pairs     pairs whose spool could not be opened (re-protect them)

Per pair, `siterecovery_pair_backlog_bytes{role="process-server"}` is the
pair's share of the spool.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .spool import Spool


class SpoolCollector:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def collect(self) -> Iterable[Metric]:
        spool = self._spool
        return [
            GaugeMetricFamily("siterecovery_spool_used_bytes",
                              "Spooled frames not yet acknowledged downstream, plus reservations.",
                              value=spool.used_bytes),
            GaugeMetricFamily("siterecovery_spool_limit_bytes",
                              "The spool's bound (spool_limit_bytes).", value=spool.limit_bytes),
            GaugeMetricFamily("siterecovery_spool_waiting_receivers",
                              "Replication streams held back because the spool is full.", value=spool.waiting),
            GaugeMetricFamily("siterecovery_spool_damaged_pairs",
                              "Pairs whose spool log is damaged and refused.", value=spool.damaged_count),
        ]
