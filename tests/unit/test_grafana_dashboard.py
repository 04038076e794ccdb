"""deploy/grafana/siterecovery.json refers only to metrics and labels the daemons export.

What "exported" means is found out, not listed: every daemon's registry is
built with its real collectors over a small real state (a SQLite store with a
replicating pair and its reports, a spool, statuses of every role), one RPC,
one job and one step are observed, and the exposition is parsed. A panel whose
expression names a metric or a label nobody exports fails here, so the
dashboard cannot drift from the code. Expressions are parsed with a real PromQL
parser (promql-parser), so a syntax error fails too; the README's example
alerts are held to the same rules.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import promql_parser
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from siterecovery.agents.metrics import AgentCollector, PairCollector
from siterecovery.agents.process_server.metrics import SpoolCollector
from siterecovery.agents.process_server.spool import Spool
from siterecovery.common import metrics
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.convert import to_dict
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, create_job
from siterecovery.controller.metrics import JobMetrics, StoreCollector
from siterecovery.controller.store import MachineRecord, ServerRecord, open_store

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "siterecovery.json"
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
README = DASHBOARD.parents[2] / "README.md"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# What Grafana puts in place of its variables before a query is sent.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "15s", "$machine": ".*"}


def stamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def full_status(pair_id: str) -> rpb.PairStatus:
    """A status with every field set, as any role might report it."""
    return rpb.PairStatus(
        pair_id=pair_id, state=rpb.PAIR_STATE_REPLICATING, last_seq=9, acked_seq=8, backlog_frames=1,
        backlog_bytes=10, oldest_pending_captured_at=stamp(T0), bytes_sent=100, throughput_bytes_per_second=1.0,
        sync_done_bytes=1, sync_total_bytes=1, journal_bytes=5, applied_bytes_total=100,
        applied_captured_at=stamp(T0), points=[rpb.RecoveryPoint(tag_id="t", captured_at=stamp(T0))],
        views=[rpb.OpenView(view_id="view-1", tag_id="t", seq=9, opened_at=stamp(T0))],
    )


def exposition(served: metrics.DaemonMetrics) -> dict[str, set[str]]:
    generate_latest(served.registry)  # a collector's cost and failures show from the second scrape on
    text = generate_latest(served.registry).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
        # A family without samples still names its series (a histogram's _bucket/_sum/_count).
        out.setdefault(family.name, set())
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """Every metric name any daemon exports, with the labels seen on it."""
    tmp = tmp_path_factory.mktemp("exported")
    found: dict[str, set[str]] = {}

    def merge(served: metrics.DaemonMetrics) -> None:
        served.rpc_seconds.labels("s", "m", "unary", "OK").observe(0.01)
        served.rpc_in_flight.labels("s", "m").set(0)
        for name, labels in exposition(served).items():
            found.setdefault(name, set()).update(labels)

    # The configuration server, over a store with a replicating pair.
    store = open_store(f"sqlite:///{tmp}/store.db")
    try:
        for sid, role, inventory in (
            ("src-1", "source", {}),
            ("ps-1", "process-server", {"data_endpoint": "127.0.0.1:1"}),
            ("mt-1", "master-target", {"data_endpoint": "127.0.0.1:2", "directories": [
                {"kind": "DIRECTORY_KIND_DATASTORE", "path": "/ds", "free_bytes": str(2**40)},
                {"kind": "DIRECTORY_KIND_RETENTION", "path": "/ret", "free_bytes": str(2**40)}]}),
        ):
            store.add_server(ServerRecord(id=sid, role=role, hostname=sid, cert_serial="1", cert_fingerprint="f",
                                          enrolled_at=T0, inventory=inventory))
            store.record_heartbeat(sid, problems=[], directories=None, now=T0)
        store.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="app01", os="Linux", disks=[
            {"identity": "w", "path": "/d", "size_bytes": str(2**30), "name": "disk0"}]))
        (pair,) = replication.enable(store, admin_pb2.EnableReplicationRequest(machine="app01"), now=T0)
        for sid, role in (("src-1", "source"), ("ps-1", "process-server"), ("mt-1", "master-target")):
            store.record_pair_reports(sid, role, {pair.id: to_dict(full_status(pair.id))}, now=T0)
        create_job(store, JobKind("demo", [FunctionStep("a", lambda ctx: None)]), "x", now=T0)
        controller = metrics.DaemonMetrics("config-server")
        controller.register("store", StoreCollector(store, heartbeat_interval=10, clock=lambda: T0 + timedelta(seconds=1)))
        jobs = JobMetrics(controller.registry)
        jobs.job_finished("demo", "succeeded", 1.0)
        jobs.step_finished("demo", "execute", "succeeded", 1.0)
        merge(controller)
    finally:
        store.close()

    # The agents, with the collectors their daemons register.
    directories = [common_pb2.DirectoryFacts(kind=k, path="/x", total_bytes=2, free_bytes=1)
                   for k in (common_pb2.DIRECTORY_KIND_SPOOL, common_pb2.DIRECTORY_KIND_DATASTORE,
                             common_pb2.DIRECTORY_KIND_RETENTION)]
    spool = Spool(tmp / "spool", limit_bytes=2**20, fsync=False)
    try:
        for role in ("source", "process-server", "master-target"):
            agent = metrics.DaemonMetrics(role)
            agent.register("pairs", PairCollector(role, lambda: [full_status("p1")]))
            agent.register("agent", AgentCollector(lambda: (1.0, 1), lambda: directories))
            if role == "process-server":
                agent.register("spool", SpoolCollector(spool))
            merge(agent)
    finally:
        spool.close()
    return found


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((f"panel {inner['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            # Grafana's label_values(series, label) asks for what `group by (label) (series)` returns.
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\s*\)", query)
            out.append((f"variable {variable['name']}", f"group by ({found[2]}) ({found[1]})" if found else query))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_valid_json_with_a_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    taken: dict[tuple[int, int], str] = {}  # panels side by side, none on top of another
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]


def test_the_dashboard_covers_what_operators_watch(dashboard):
    text = " ".join(expr for _, expr in expressions(dashboard))
    for needed in (
        "siterecovery_replication_rpo_seconds", "siterecovery_replication_rpo_threshold_seconds",
        "siterecovery_replication_applied_bytes_total", "siterecovery_spool_used_bytes",
        "siterecovery_pair_journal_bytes", "siterecovery_agent_heartbeat_age_seconds",
        "siterecovery_job_duration_seconds_bucket", "siterecovery_grpc_server_handling_seconds_bucket",
    ):
        assert needed in text, f"no panel shows {needed}"


def promql(expr: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def problems_in(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    """What is wrong with each (where, PromQL): syntax, metrics nobody exports, labels they lack."""
    problems = []
    for where, expr in queries:
        try:
            tree = promql(expr)
        except ValueError as exc:
            problems.append(f"{where}: not PromQL ({exc}): {expr!r}")
            continue
        nodes: list = []
        promql_parser.walk(tree, nodes.append)
        selectors = [n for n in nodes if isinstance(n, promql_parser.VectorSelector)]
        if not any(n.name.startswith("siterecovery_") for n in selectors):
            problems.append(f"{where}: no siterecovery metric in {expr!r}")
        known = set(TARGET_LABELS)
        for selector in selectors:
            if selector.name not in exported:
                problems.append(f"{where}: {selector.name} is not exported")
                continue
            known |= exported[selector.name]
            for matcher in selector.matchers.matchers:
                if matcher.name not in exported[selector.name] | TARGET_LABELS:
                    problems.append(f"{where}: {selector.name} has no label {matcher.name}")
        grouped = [label for n in nodes if isinstance(n, promql_parser.AggregateExpr) and n.modifier
                   for label in n.modifier.labels]
        grouped += [label for n in nodes if isinstance(n, promql_parser.BinaryExpr) and n.modifier
                    for label in [*(n.modifier.matching.labels if n.modifier.matching else []),
                                  *(n.modifier.group_labels or [])]]
        problems += [f"{where}: no metric of {expr!r} has label {label}" for label in grouped if label not in known]
    return problems


def readme_queries() -> list[tuple[str, str]]:
    """The PromQL examples of the README's Metrics section, one alert per line (comments cut)."""
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```promql\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Metrics section has no promql block"
    queries, current = [], ""
    for line in "\n".join(blocks).splitlines():
        code = line.split("#", 1)[0].rstrip()
        if code and not code.startswith(" ") and current:
            queries.append(("README", current))
            current = ""
        current = f"{current} {code.strip()}".strip()
    return [*queries, ("README", current)] if current else queries


def test_every_expression_names_exported_metrics_and_labels(dashboard, exported):
    problems = problems_in(expressions(dashboard), exported)
    assert not problems, "\n".join(problems)


def test_the_readme_alerts_name_exported_metrics_and_labels(exported):
    queries = readme_queries()
    assert len(queries) >= 3
    problems = problems_in(queries, exported)
    assert not problems, "\n".join(problems)


def test_the_check_catches_drift(exported):
    # The check itself: a renamed metric, a label it lacks, a grouping by a label nobody has, bad syntax.
    assert problems_in([
        ("a", 'siterecovery_replication_rpo{machine="a"}'),
        ("b", 'siterecovery_spool_used_bytes{pair="p"}'),
        ("c", 'sum by (colour) (siterecovery_spool_used_bytes)'),
        ("d", 'siterecovery_spool_used_bytes > on (pair) siterecovery_spool_limit_bytes'),
        ("e", 'sum(rate(siterecovery_spool_used_bytes[$__rate_interval])'),
    ], exported) == [
        "a: siterecovery_replication_rpo is not exported",
        "b: siterecovery_spool_used_bytes has no label pair",
        "c: no metric of 'sum by (colour) (siterecovery_spool_used_bytes)' has label colour",
        "d: no metric of 'siterecovery_spool_used_bytes > on (pair) siterecovery_spool_limit_bytes' has label pair",
        "e: not PromQL (unclosed left parenthesis): 'sum(rate(siterecovery_spool_used_bytes[$__rate_interval])'",
    ]
