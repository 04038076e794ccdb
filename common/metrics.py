"""Prometheus metrics of one daemon: its registry, its /metrics listener, RPC latencies.

Every daemon can serve `/metrics` in the Prometheus text format on a plain
HTTP listener of its own: setting `metrics_listen = "host:port"` (port 0 picks
a free one; the bound port is logged and written into the daemon's state file
as `metrics_port`). Empty, the default, serves nothing. The page carries no
secret and no path to user data, but it does name pairs, disks and hosts: keep
the listener on loopback or a management network, as with node_exporter.

`DaemonMetrics` holds what every daemon has:
- its own `CollectorRegistry`, never prometheus_client's global one, so that
  several daemons started in one test process do not collide;
- `process_*` (CPU, resident memory, open files, start time) and
  `siterecovery_build_info{version, role}`;
- `siterecovery_grpc_server_handling_seconds{grpc_service, grpc_method,
  grpc_type, grpc_code}`, a histogram of every RPC the daemon serves, filled
  by `rpc_interceptor()` (a gRPC server interceptor placed before the
  authorisation guard, so refused calls count too, with their code), and
  `siterecovery_grpc_server_in_flight` (open streams: replication sessions);
- `register(name, collector)` for collectors that read the daemon's state when
  scraped. Each runs guarded: one that raises is logged and left out of that
  scrape (`siterecovery_metrics_collector_errors_total{collector}` counts it)
  instead of turning the whole page into an HTTP 500, and
  `siterecovery_metrics_collect_seconds{collector}` says what it cost.

Names follow Prometheus' conventions: the `siterecovery_` prefix, base units
(`_seconds`, `_bytes`), `_total` for counters, `_timestamp_seconds` for Unix
times. Labels stay low-cardinality: pair id, disk name, agent id, role, RPC
method, status code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from siterecovery import __version__
from siterecovery.common import errors
from siterecovery.common.logging import get_logger
from siterecovery.common.settings import parse_listen

log = get_logger(__name__)

# RPC latencies: milliseconds for the control plane, up to an hour for
# replication streams (which last as long as their session).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class DaemonMetrics:
    """One daemon's registry and the instruments every daemon shares."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        Info("siterecovery_build", "The siterecovery version and the daemon's role.", registry=self.registry).info(
            {"version": __version__, "role": role}
        )
        self.rpc_seconds = Histogram(
            "siterecovery_grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, by method and status code "
            "(a stream's whole life for streaming RPCs).",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.rpc_in_flight = Gauge(
            "siterecovery_grpc_server_in_flight",
            "RPCs being served now (open streams included).",
            ["grpc_service", "grpc_method"],
            registry=self.registry,
        )
        self.collect_seconds = Gauge(
            "siterecovery_metrics_collect_seconds",
            "How long a collector took at the last scrape.",
            ["collector"],
            registry=self.registry,
        )
        self.collector_errors = Counter(
            "siterecovery_metrics_collector_errors_total",
            "Scrapes at which a collector failed and was left out.",
            ["collector"],
            registry=self.registry,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- collectors read at scrape time ---------------------------------------------
    def register(self, name: str, collector: Collector) -> None:
        self.registry.register(_Guarded(name, collector, self))

    # -- gRPC ------------------------------------------------------------------------
    def rpc_interceptor(self) -> grpc.ServerInterceptor:
        return _RpcMetricsInterceptor(self)

    # -- the HTTP listener -------------------------------------------------------------
    def serve(self, listen: str) -> int:
        """Serve /metrics on `listen` ("host:port"; port 0 picks one); return the bound port."""
        host, port = parse_listen(listen, setting="metrics_listen")
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise errors.Unavailable(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}",
                hint="the port is in use or the address is not this host's; change metrics_listen",
                code="bind-failed",
            ) from exc
        bound = int(self._server.server_port)
        log.info("serving metrics", address=host, port=bound, path="/metrics")
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


def start(role: str, listen: str) -> tuple[DaemonMetrics | None, int]:
    """A daemon's metrics and the bound port, or (None, 0) when `listen` is empty (off)."""
    if not listen:
        return None, 0
    # No `*_created` series: Prometheus would store each as a series of its own. A
    # process-wide switch of prometheus_client, set only by a daemon that serves metrics.
    disable_created_metrics()
    metrics = DaemonMetrics(role)
    return metrics, metrics.serve(listen)


class _Guarded:
    """A collector that cannot break the page: failures are logged and counted."""

    def __init__(self, name: str, inner: Collector, metrics: DaemonMetrics) -> None:
        self._name = name
        self._inner = inner
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        try:
            families = list(self._inner.collect())
        except Exception as exc:
            # A known failure (the store is unreachable) says enough; anything else is a bug.
            expected = isinstance(exc, errors.SiteRecoveryError)
            log.warning("a metrics collector failed; its metrics are left out of this scrape",
                        collector=self._name, error=str(exc), exc_info=None if expected else exc)
            self._metrics.collector_errors.labels(self._name).inc()
            families = []
        self._metrics.collect_seconds.labels(self._name).set(time.perf_counter() - started)
        return families

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: the families depend on what exists when scraped,
        # and an empty description keeps the registry from collecting at registration.
        return []


# -- gRPC server interceptor --------------------------------------------------------------


def _split(full_method: str) -> tuple[str, str]:
    """"/siterecovery.v1.Admin/ListServers" → ("siterecovery.v1.Admin", "ListServers")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


def _code(context: grpc.ServicerContext, *, failed: bool) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed:
        return "UNKNOWN"
    if not context.is_active():  # the client went away, or its deadline passed, before the end
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "OK"


class _RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Times every RPC with a handler (unknown methods are not recorded: no unbounded labels)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        rpc_type = _rpc_type(handler)
        histogram = self._metrics.rpc_seconds
        in_flight = self._metrics.rpc_in_flight.labels(service, method)

        def observe(started: float, code: str) -> None:
            in_flight.dec()
            histogram.labels(service, method, rpc_type, code).observe(time.perf_counter() - started)

        def unary_response(behaviour: Callable) -> Callable:
            def timed(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                in_flight.inc()
                failed = True
                try:
                    response = behaviour(request, context)
                    failed = False
                    return response
                finally:
                    observe(started, _code(context, failed=failed))

            return timed

        def stream_response(behaviour: Callable) -> Callable:
            def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.perf_counter()
                in_flight.inc()
                code = None
                try:
                    yield from behaviour(request, context)
                except GeneratorExit:  # the client went away mid-stream
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code(context, failed=True)
                    raise
                finally:
                    observe(started, code or _code(context, failed=False))

            return timed

        return _rewrap(handler, unary_response, stream_response)


def _rewrap(handler: grpc.RpcMethodHandler, unary: Callable, stream: Callable) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )
