"""common/metrics.py and the agents' collectors: the listener, RPC latencies, pairs, spool.

The RPC tests run a real gRPC server on port 0 with the interceptor and call it
over a real channel; the HTTP tests scrape the real listener.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from siterecovery.agents.metrics import AgentCollector, PairCollector
from siterecovery.agents.process_server.metrics import SpoolCollector
from siterecovery.agents.process_server.spool import Spool
from siterecovery.agents.settings import AgentSettings
from siterecovery.common import errors, metrics
from siterecovery.common.pb import common_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.common.settings import parse_listen
from siterecovery.controller.settings import ConfigServerSettings

NOW = 1_800_000_000.0


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def registry_with(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


# -- settings ----------------------------------------------------------------------------


def test_metrics_listen_needs_a_host_and_a_port():
    assert parse_listen("127.0.0.1:9464", setting="metrics_listen") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0", setting="metrics_listen") == ("::1", 0)
    for bad in ("127.0.0.1", "9464", ":9464", "host:port", "host:70000", "[::1]"):
        with pytest.raises(errors.InvalidInput):
            parse_listen(bad, setting="metrics_listen")


def test_settings_refuse_a_bad_metrics_listen_and_default_to_off():
    assert ConfigServerSettings().metrics_listen == ""
    assert AgentSettings(server="cs:443").metrics_listen == ""
    with pytest.raises(errors.InvalidInput, match="metrics_listen"):
        ConfigServerSettings(metrics_listen="localhost")
    with pytest.raises(errors.InvalidInput, match="metrics_listen"):
        AgentSettings(server="cs:443", metrics_listen="0.0.0.0:x")


# -- the listener --------------------------------------------------------------------------


def scrape(port: int) -> dict[str, list]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def test_off_when_listen_is_empty():
    assert metrics.start("source", "") == (None, 0)


def test_serves_its_own_registry_on_port_0_and_stops():
    served, port = metrics.start("process-server", "127.0.0.1:0")
    assert served is not None and port > 0
    try:
        families = scrape(port)
        (build,) = families["siterecovery_build_info"]
        assert build.labels == {"role": "process-server", "version": metrics.__version__}
        assert "process_resident_memory_bytes" in families
        # The registry is the daemon's own: prometheus_client's global one is not served.
        assert "python_info" not in families
    finally:
        served.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_daemons_in_one_process_do_not_collide():
    first, port1 = metrics.start("source", "127.0.0.1:0")
    second, port2 = metrics.start("master-target", "127.0.0.1:0")
    try:
        assert port1 != port2
        assert scrape(port1)["siterecovery_build_info"][0].labels["role"] == "source"
        assert scrape(port2)["siterecovery_build_info"][0].labels["role"] == "master-target"
    finally:
        first.stop()
        second.stop()


def test_a_port_in_use_is_a_clear_error():
    served, port = metrics.start("source", "127.0.0.1:0")
    try:
        with pytest.raises(errors.Unavailable, match="cannot serve metrics") as caught:
            metrics.start("source", f"127.0.0.1:{port}")
        assert caught.value.code == "bind-failed" and "metrics_listen" in caught.value.hint
    finally:
        served.stop()


class Broken:
    def collect(self):
        raise RuntimeError("store is down")


class Fine:
    def collect(self):
        yield from PairCollector("source", lambda: [rpb.PairStatus(pair_id="p1")], clock=lambda: NOW).collect()


def test_a_failing_collector_is_left_out_and_counted_not_fatal():
    served, port = metrics.start("config-server", "127.0.0.1:0")
    try:
        served.register("broken", Broken())
        served.register("fine", Fine())
        families = scrape(port)
        assert any(s.labels.get("pair") == "p1" for s in families["siterecovery_pair_last_seq"])
        # The failure is counted as it happens, so the next scrape shows it.
        families = scrape(port)
        (errors_sample,) = families["siterecovery_metrics_collector_errors"]
        assert errors_sample.labels == {"collector": "broken"} and errors_sample.value == 1
        assert {s.labels["collector"] for s in families["siterecovery_metrics_collect_seconds"]} == {"broken", "fine"}
    finally:
        served.stop()


# -- RPC latencies ----------------------------------------------------------------------------


@pytest.fixture
def echo():
    """A real gRPC server with the interceptor: Say (unary), Missing (aborts), Crash (raises), Count (stream)."""
    served = metrics.DaemonMetrics("config-server")
    release = threading.Event()

    def say(request, context):
        return request

    def missing(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def crash(request, context):
        raise RuntimeError("bug")

    def count(request, context):
        for number in range(3):
            yield bytes([number])
        # Holds the stream open until the test lets go or the client cancels, as a
        # servicer serving a long stream watches its context.
        while not release.is_set() and context.is_active():
            release.wait(0.02)

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Crash": grpc.unary_unary_rpc_method_handler(crash),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[served.rpc_interceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.v1.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield served, channel, release
    release.set()
    channel.close()
    server.stop(0).wait()


def count_of(served: metrics.DaemonMetrics, method: str, code: str, rpc_type: str = "unary") -> float | None:
    return served.registry.get_sample_value(
        "siterecovery_grpc_server_handling_seconds_count",
        {"grpc_service": "test.v1.Echo", "grpc_method": method, "grpc_type": rpc_type, "grpc_code": code},
    )


def wait_until(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_unary_rpcs_are_timed_by_method_and_code(echo):
    served, channel, _release = echo
    assert channel.unary_unary("/test.v1.Echo/Say")(b"hi", timeout=10) == b"hi"
    channel.unary_unary("/test.v1.Echo/Say")(b"again", timeout=10)
    with pytest.raises(grpc.RpcError) as missing:
        channel.unary_unary("/test.v1.Echo/Missing")(b"", timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # the interceptor changes no outcome
    with pytest.raises(grpc.RpcError) as crashed:
        channel.unary_unary("/test.v1.Echo/Crash")(b"", timeout=10)
    assert crashed.value.code() == grpc.StatusCode.UNKNOWN
    assert count_of(served, "Say", "OK") == 2
    assert count_of(served, "Missing", "NOT_FOUND") == 1
    assert count_of(served, "Crash", "UNKNOWN") == 1
    total = served.registry.get_sample_value(
        "siterecovery_grpc_server_handling_seconds_sum",
        {"grpc_service": "test.v1.Echo", "grpc_method": "Say", "grpc_type": "unary", "grpc_code": "OK"},
    )
    assert 0 < total < 10


def test_unknown_methods_make_no_labels(echo):
    served, channel, _release = echo
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.v1.Echo/Nope")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    methods = {
        s.labels["grpc_method"] for family in served.registry.collect() for s in family.samples
        if s.name.startswith("siterecovery_grpc_server_handling_seconds")
    }
    assert "Nope" not in methods


def test_a_stream_is_in_flight_until_it_ends(echo):
    served, channel, release = echo
    in_flight = {"grpc_service": "test.v1.Echo", "grpc_method": "Count"}
    call = channel.unary_stream("/test.v1.Echo/Count")(b"", timeout=10)
    assert [next(call) for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]
    assert served.registry.get_sample_value("siterecovery_grpc_server_in_flight", in_flight) == 1
    release.set()
    assert list(call) == []
    wait_until(lambda: count_of(served, "Count", "OK", "server_stream") == 1)
    assert served.registry.get_sample_value("siterecovery_grpc_server_in_flight", in_flight) == 0


def test_a_stream_the_client_cancels_counts_as_cancelled(echo):
    served, channel, _release = echo
    call = channel.unary_stream("/test.v1.Echo/Count")(b"", timeout=10)
    next(call)
    call.cancel()
    wait_until(lambda: count_of(served, "Count", "CANCELLED", "server_stream") == 1)


# -- the agents' collectors -----------------------------------------------------------------------


def source_status() -> rpb.PairStatus:
    return rpb.PairStatus(
        pair_id="p1", state=rpb.PAIR_STATE_REPLICATING, last_seq=120, acked_seq=100, backlog_frames=20,
        backlog_bytes=4096, oldest_pending_captured_at=stamp(NOW - 7.5), bytes_sent=10_000_000,
        throughput_bytes_per_second=2048.0, sync_done_bytes=1 << 20, sync_total_bytes=1 << 20,
    )


def test_pair_collector_source():
    registry = registry_with(PairCollector("source", lambda: [source_status()], clock=lambda: NOW))
    key = {"pair": "p1", "role": "source"}
    value = registry.get_sample_value
    assert value("siterecovery_pair_state", {**key, "state": "replicating"}) == 1
    assert value("siterecovery_pair_state", {**key, "state": "error"}) == 0
    assert (value("siterecovery_pair_last_seq", key), value("siterecovery_pair_acked_seq", key)) == (120, 100)
    assert value("siterecovery_pair_backlog_bytes", key) == 4096
    assert value("siterecovery_pair_oldest_pending_age_seconds", key) == pytest.approx(7.5, abs=0.01)
    assert value("siterecovery_pair_sent_bytes_total", key) == 10_000_000
    assert value("siterecovery_pair_throughput_bytes_per_second", key) == 2048
    assert value("siterecovery_pair_sync_total_bytes", key) == 1 << 20
    # What only a target knows is not made up for a source.
    assert value("siterecovery_pair_journal_bytes", key) is None


def test_pair_collector_master_target_and_nothing_pending():
    status = rpb.PairStatus(
        pair_id="p1", state=rpb.PAIR_STATE_INITIAL_SYNC, last_seq=99, journal_bytes=65536,
        applied_bytes_total=5 << 20, applied_captured_at=stamp(NOW - 3),
        points=[rpb.RecoveryPoint(tag_id="t1", captured_at=stamp(NOW - 300)),
                rpb.RecoveryPoint(tag_id="t2", captured_at=stamp(NOW - 60))],
    )
    registry = registry_with(PairCollector("master-target", lambda: [status], clock=lambda: NOW))
    key = {"pair": "p1", "role": "master-target"}
    value = registry.get_sample_value
    assert value("siterecovery_pair_state", {**key, "state": "initial-sync"}) == 1
    assert value("siterecovery_pair_oldest_pending_age_seconds", key) == 0
    assert value("siterecovery_pair_applied_bytes_total", key) == 5 << 20
    assert value("siterecovery_pair_journal_bytes", key) == 65536
    assert value("siterecovery_pair_recovery_points", key) == 2
    assert value("siterecovery_pair_latest_point_timestamp_seconds", key) == pytest.approx(NOW - 60)
    assert value("siterecovery_pair_applied_capture_timestamp_seconds", key) == pytest.approx(NOW - 3)
    assert value("siterecovery_pair_sent_bytes_total", key) is None


def test_agent_collector_heartbeat_and_directories():
    facts = [common_pb2.DirectoryFacts(kind=common_pb2.DIRECTORY_KIND_RETENTION, path="/ret", total_bytes=100,
                                       free_bytes=40, used_by_agent_bytes=25)]
    registry = registry_with(AgentCollector(lambda: (NOW, 3), lambda: facts))
    value = registry.get_sample_value
    assert value("siterecovery_heartbeat_last_success_timestamp_seconds") == NOW
    assert value("siterecovery_heartbeat_failures_total") == 3
    key = {"kind": "retention", "path": "/ret"}
    assert (value("siterecovery_directory_size_bytes", key), value("siterecovery_directory_free_bytes", key),
            value("siterecovery_directory_agent_used_bytes", key)) == (100, 40, 25)
    # A source agent's state directory (its journals) is labelled as such.
    state = [common_pb2.DirectoryFacts(kind=common_pb2.DIRECTORY_KIND_STATE, path="/var/lib/sr", total_bytes=9)]
    assert registry_with(AgentCollector(lambda: (NOW, 0), lambda: state)).get_sample_value(
        "siterecovery_directory_size_bytes", {"kind": "state", "path": "/var/lib/sr"}) == 9
    # Before the first heartbeat there is no timestamp to show.
    assert registry_with(AgentCollector(lambda: (None, 0), list)).get_sample_value(
        "siterecovery_heartbeat_last_success_timestamp_seconds") is None


def test_spool_collector(tmp_path: Path):
    spool = Spool(tmp_path / "spool", limit_bytes=1 << 20, fsync=False)
    try:
        registry = registry_with(SpoolCollector(spool))
        assert registry.get_sample_value("siterecovery_spool_limit_bytes") == 1 << 20
        assert registry.get_sample_value("siterecovery_spool_used_bytes") == 0
        assert spool.reserve(4096, cancelled=lambda: False)
        assert registry.get_sample_value("siterecovery_spool_used_bytes") == 4096
        assert registry.get_sample_value("siterecovery_spool_waiting_receivers") == 0
        assert registry.get_sample_value("siterecovery_spool_damaged_pairs") == 0
    finally:
        spool.close()
