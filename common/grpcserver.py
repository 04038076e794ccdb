"""Starting a gRPC server the one way production and tests share.

`start_server` binds (port 0 allowed), adds health and reflection, installs the
authorisation interceptor (after any observers, such as common/metrics.py's
RPC timer) and returns the bound port. Every RPC runs inside
`_guard`, which
- identifies the caller from its client certificate and refuses it unless the
  table in common/authz.py allows its role to call the method;
- binds `rpc`, `caller` and `role` to the log context;
- turns a SiteRecoveryError into its gRPC status (with code and hint in the
  trailing metadata) and any other exception into INTERNAL without leaking it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from siterecovery.common import authz, errors, pki
from siterecovery.common.logging import get_logger

log = get_logger(__name__)

_caller: contextvars.ContextVar[pki.Identity] = contextvars.ContextVar("caller")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# HTTP/2 flow control of what a server receives: a fixed window per stream
# instead of gRPC's BDP probing. With probing the window may grow far beyond
# that (most likely while the receiver is short of CPU), and gRPC buffers up to
# a window of a stream the application has not read yet: the process server
# peaked at 180-235 MiB during 1 GiB full syncs, 135-155 MiB with this
# (bench/RESULTS.md, full_sync). 8 MiB still keeps a 1 Gbit/s
# link full up to ~60 ms of round trip; a replication stream's receiver reads
# ahead 16 MiB of its own anyway.
STREAM_WINDOW_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
)


def raw_requests(add_to_server: Callable[[Any, Any], None], methods: Collection[str]) -> Callable[[Any, Any], None]:
    """A generated `add_*Servicer_to_server` whose `methods` get their requests as bytes.

    The replication streams parse their messages themselves (frames.received_frames):
    protobuf's parse of a 1 MiB frame copies its data, and taking the data copies it
    again. The generated function is run against a recorder and its handlers are
    registered with no request deserializer for `methods` (gRPC then hands the bytes over).
    """

    def add(servicer: Any, server: Any) -> None:
        recorded: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

        class _Recorder:
            def add_generic_rpc_handlers(self, _handlers: object) -> None:
                pass

            def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
                recorded.append((service, handlers))

        add_to_server(servicer, _Recorder())
        for service, handlers in recorded:
            unknown = set(methods) - set(handlers)
            if unknown:
                raise ValueError(f"{service} has no methods {sorted(unknown)}")
            handlers = {
                name: handler._replace(request_deserializer=None) if name in methods else handler
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            server.add_registered_method_handlers(service, handlers)

    return add


def caller() -> pki.Identity:
    """The authenticated caller of the RPC being served."""
    return _caller.get()


@dataclass(frozen=True)
class Service:
    """A servicer, the generated function that adds it, and its full service name."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials,
    services: Sequence[Service],
    is_revoked: Callable[[pki.Identity, bytes], bool] | None = None,
    max_workers: int = 32,
    observers: Sequence[grpc.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> RunningServer:
    """`observers` run around the authorisation guard (common/metrics.py times RPCs so,
    refused ones included); they see every call and must not change its outcome.
    `options` are added to (and override) SERVER_OPTIONS."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[*observers, _AuthInterceptor(is_revoked)],
        options=list({**dict(SERVER_OPTIONS), **dict(options)}.items()),
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_secure_port(f"{_bracket(host)}:{port}", credentials)
    if bound == 0:
        raise errors.Unavailable(
            f"cannot listen on {host}:{port}",
            hint="the port is in use or needs privileges; choose another with --port",
            code="bind-failed",
        )
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def identify(context: grpc.ServicerContext) -> pki.Identity:
    return _identify(context)[0]


def _identify(context: grpc.ServicerContext) -> tuple[pki.Identity, bytes]:
    """The caller and its certificate (PEM), from one `auth_context()`: gRPC builds that
    dictionary anew at every call."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise errors.Unauthenticated("no client certificate", code="no-certificate")
    return pki.identity_from_cert_pem(pems[0]), pems[0]


class _AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, is_revoked: Callable[[pki.Identity, bytes], bool] | None) -> None:
        self._is_revoked = is_revoked
        # method -> (the registered handler, its guarded copy): built once per method, not per call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _wrap(handler, lambda behaviour: _guard(method, behaviour, self._is_revoked))
        self._guarded[method] = (handler, guarded)
        return guarded


def _authorize(method: str, context: grpc.ServicerContext, is_revoked: Callable | None) -> pki.Identity:
    structlog.contextvars.clear_contextvars()
    try:
        who, pem = _identify(context)
        if is_revoked is not None and is_revoked(who, pem):
            raise errors.Unauthenticated(
                "this certificate has been revoked",
                hint="enroll the agent again with the connection passphrase",
                code="certificate-revoked",
            )
        if not authz.allowed(method, who.role):
            raise errors.PermissionDenied(
                f"a {who.role} certificate may not call {method}", code="role-not-allowed"
            )
    except errors.SiteRecoveryError as exc:
        log.warning("rpc refused", rpc=method, peer=context.peer(), reason=exc.message)
        errors.abort(context, exc)
    structlog.contextvars.bind_contextvars(rpc=method, caller=who.id, role=who.role)
    return who


def _fail(context: grpc.ServicerContext, exc: Exception) -> None:
    """Map what a servicer raised onto a status; nothing unexpected leaks to a client."""
    if isinstance(exc, errors.SiteRecoveryError):
        log.info("rpc failed", code=exc.code, error=exc.message)
        errors.abort(context, exc)
    log.error("rpc crashed", exc_info=exc)
    errors.abort(context, errors.Internal("internal error; see the server log", code="internal"))


def _guard(method: str, behaviour: Callable, is_revoked: Callable | None) -> tuple[Callable, Callable]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        token = _caller.set(_authorize(method, context, is_revoked))
        try:
            return behaviour(request, context)
        except Exception as exc:
            if context.code() is not None and not isinstance(exc, errors.SiteRecoveryError):
                raise  # already aborted by the servicer
            _fail(context, exc)
        finally:
            _caller.reset(token)

    def guarded_stream(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
        token = _caller.set(_authorize(method, context, is_revoked))
        try:
            yield from behaviour(request, context)
        except Exception as exc:
            if context.code() is not None and not isinstance(exc, errors.SiteRecoveryError):
                raise
            _fail(context, exc)
        finally:
            _caller.reset(token)

    return guarded, guarded_stream


def _wrap(handler: grpc.RpcMethodHandler, make: Callable) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        unary, _ = make(handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        _, stream = make(handler.unary_stream)
        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        unary, _ = make(handler.stream_unary)
        return grpc.stream_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    _, stream = make(handler.stream_stream)
    return grpc.stream_stream_rpc_method_handler(
        stream, handler.request_deserializer, handler.response_serializer
    )
