"""Starting a gRPC server the one way production and tests share.

`start_server` binds (port 0 allowed), adds health and reflection, installs the
authorisation interceptor (after any observers, such as common/metrics.py's
RPC timer) and returns the bound port. With `aio=True` the server is
gRPC's asyncio server on an event loop of its own thread (the configuration
server: thousands of agents' small RPCs, see "The asyncio server" below).
Every RPC runs inside `_guard`, which
- identifies the caller from its client certificate and refuses it unless the
  table in common/authz.py allows its role to call the method;
- binds `rpc`, `caller` and `role` to the log context;
- turns a SiteRecoveryError into its gRPC status (with code and hint in the
  trailing metadata) and any other exception into INTERNAL without leaking it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
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
    server: grpc.Server | grpc.aio.Server
    port: int
    health: health.HealthServicer | health.aio.HealthServicer
    # The asyncio server's event loop and its thread (None: the threaded server).
    loop: _LoopThread | None = None

    def stop(self, grace: float = 5.0) -> None:
        if self.loop is None:
            self.health.enter_graceful_shutdown()
            self.server.stop(grace).wait()
            return
        if self.loop.closed:
            return
        try:
            self.loop.run(self._stop_aio(grace))
        finally:
            self.loop.close()

    async def _stop_aio(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def start_server(
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials,
    services: Sequence[Service],
    is_revoked: Callable[[pki.Identity, bytes], bool] | None = None,
    max_workers: int = 32,
    observers: Sequence[grpc.ServerInterceptor | grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = False,
) -> RunningServer:
    """`observers` run around the authorisation guard (common/metrics.py times RPCs so,
    refused ones included); they see every call and must not change its outcome.
    `options` are added to (and override) SERVER_OPTIONS.

    `aio`: serve with gRPC's asyncio server on an event loop of its own thread
    (observers must then be `grpc.aio.ServerInterceptor`s). Handlers that are coroutine
    functions (or async generators) run on that loop; the others run as before, on a
    pool of `max_workers` threads (see `_ThreadContext` for the context they get)."""
    merged = list({**dict(SERVER_OPTIONS), **dict(options)}.items())
    if aio:
        loop = _LoopThread("grpc-aio")
        try:
            return loop.run(_start_aio(host, port, credentials, services, is_revoked, max_workers, observers,
                                       merged, loop))
        except BaseException:
            loop.close()
            raise
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[*observers, _AuthInterceptor(is_revoked)],
        options=merged,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = _add_services(server, services, host, port, credentials)
    server.start()
    for name in ["", *(s.name for s in services)]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer)


async def _start_aio(host: str, port: int, credentials: grpc.ServerCredentials, services: Sequence[Service],
                     is_revoked: Callable[[pki.Identity, bytes], bool] | None, max_workers: int,
                     observers: Sequence[Any], options: list[tuple[str, Any]], loop: _LoopThread) -> RunningServer:
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc")
    loop.executors.append(pool)
    server = grpc.aio.server(
        migration_thread_pool=pool,
        interceptors=[*observers, _AioAuthInterceptor(is_revoked, pool)],
        options=options,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _GenericOnly(server))
    bound = _add_services(server, services, host, port, credentials, adding_to=_GenericOnly(server))
    await server.start()
    for name in ["", *(s.name for s in services)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer, loop=loop)


def _add_services(server: grpc.Server | grpc.aio.Server, services: Sequence[Service], host: str, port: int,
                  credentials: grpc.ServerCredentials, *, adding_to: Any = None) -> int:
    """Add `services` (to `adding_to`, by default `server`) and reflection, bind; return the
    bound port."""
    for service in services:
        service.add_to_server(service.servicer, adding_to or server)
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
    return bound


class _GenericOnly:
    """The asyncio server, as the generated `add_*Servicer_to_server` functions see it: their
    methods are looked up by name (a generic handler) and not registered with gRPC core one by
    one. The asyncio server waits for the next call of every registered method at once
    (`asyncio.wait` on a future per method, set up again after every call): with the
    configuration server's sixty methods that was a few % of its CPU per heartbeat."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass  # the generic handler added with them serves the same methods


class _LoopThread:
    """An asyncio event loop running on a thread of its own, for a server started and
    stopped from synchronous code (the daemons' `run`)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        # Shut down without waiting when the loop closes: the server's pool, and the loop's
        # default executor (what its coroutines hand blocking work to).
        self.executors: list[futures.ThreadPoolExecutor] = [
            futures.ThreadPoolExecutor(thread_name_prefix=f"{name}-default")
        ]
        self.loop.set_default_executor(self.executors[0])
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stop the loop and its thread; threads still running a handler finish on their own."""
        self.closed = True
        for pool in self.executors:
            pool.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


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


class _GuardedHandlers:
    """method -> (the registered handler, its guarded copy): built once per method, not per call."""

    def __init__(self, guard: Callable[[str, Callable], tuple[Callable, Callable]]) -> None:
        self._guard = guard
        self._known: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        known = self._known.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _wrap(handler, lambda behaviour: self._guard(method, behaviour))
        self._known[method] = (handler, guarded)
        return guarded


class _AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, is_revoked: Callable[[pki.Identity, bytes], bool] | None) -> None:
        self._handlers = _GuardedHandlers(lambda method, behaviour: _guard(method, behaviour, is_revoked))

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)


class _AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """The same guard on the asyncio server. Every guarded handler is a coroutine (or an
    async generator): a synchronous one runs on `pool`, with a `_ThreadContext`."""

    def __init__(self, is_revoked: Callable[[pki.Identity, bytes], bool] | None,
                 pool: futures.ThreadPoolExecutor) -> None:
        self._handlers = _GuardedHandlers(lambda method, behaviour: _aio_guard(method, behaviour, is_revoked, pool))

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return self._handlers.get(await continuation(handler_call_details), handler_call_details.method)


def _check(method: str, context: Any, is_revoked: Callable | None) -> pki.Identity:
    """The caller, when its certificate may call `method`; else the SiteRecoveryError saying why."""
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
    return who


def _authorize(method: str, context: grpc.ServicerContext, is_revoked: Callable | None) -> pki.Identity:
    structlog.contextvars.clear_contextvars()
    try:
        who = _check(method, context, is_revoked)
    except errors.SiteRecoveryError as exc:
        log.warning("rpc refused", rpc=method, peer=context.peer(), reason=exc.message)
        errors.abort(context, exc)
    structlog.contextvars.bind_contextvars(rpc=method, caller=who.id, role=who.role)
    return who


def _fail(context: grpc.ServicerContext, exc: Exception) -> None:
    """Map what a servicer raised onto a status; nothing unexpected leaks to a client."""
    errors.abort(context, _failure(exc))


def _failure(exc: Exception) -> errors.SiteRecoveryError:
    """What a client is told of `exc` (logged here)."""
    if isinstance(exc, errors.SiteRecoveryError):
        log.info("rpc failed", code=exc.code, error=exc.message)
        return exc
    log.error("rpc crashed", exc_info=exc)
    return errors.Internal("internal error; see the server log", code="internal")


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


# -- the asyncio server ---------------------------------------------------------------------
#
# On gRPC's asyncio server every RPC is a task on one event loop: no thread hand-off per
# call, which was most of what gRPC's threaded server cost per heartbeat (bench/RESULTS.md,
# Control plane). The guard is the same, as a coroutine. A synchronous handler runs on the
# server's thread pool, as it did on the threaded server, with the log context and caller
# of its RPC (copied into the thread) and a `_ThreadContext`.


async def _aio_abort(context: grpc.aio.ServicerContext, error: errors.SiteRecoveryError) -> None:
    context.set_trailing_metadata(error.trailing_metadata())
    await context.abort(error.status, error.message)


async def _aio_authorize(method: str, context: grpc.aio.ServicerContext, is_revoked: Callable | None) -> pki.Identity:
    structlog.contextvars.clear_contextvars()
    try:
        who = _check(method, context, is_revoked)
    except errors.SiteRecoveryError as exc:
        log.warning("rpc refused", rpc=method, peer=context.peer(), reason=exc.message)
        await _aio_abort(context, exc)
    structlog.contextvars.bind_contextvars(rpc=method, caller=who.id, role=who.role)
    return who


def _already_ended(context: grpc.aio.ServicerContext, exc: Exception) -> bool:
    """Whether the servicer ended the RPC itself (an abort, or a status it set) before raising."""
    return isinstance(exc, grpc.aio.AbortError) or (
        context.code() is not None and not isinstance(exc, errors.SiteRecoveryError)
    )


_END = object()


def _aio_guard(method: str, behaviour: Callable, is_revoked: Callable | None,
               pool: futures.ThreadPoolExecutor) -> tuple[Callable, Callable]:
    is_coroutine = inspect.iscoroutinefunction(behaviour)
    is_async_stream = inspect.isasyncgenfunction(behaviour)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = _caller.set(await _aio_authorize(method, context, is_revoked))
        threaded = None
        try:
            if is_coroutine:
                return await behaviour(request, context)
            loop = asyncio.get_running_loop()
            threaded = _ThreadContext(context, loop)
            request = _blocking_requests(request, loop)
            return await loop.run_in_executor(pool, contextvars.copy_context().run, behaviour, request, threaded)
        except asyncio.CancelledError:
            if threaded is not None:
                threaded.gone = True
            raise
        except Exception as exc:
            if _already_ended(context, exc):
                raise
            await _aio_abort(context, _failure(exc))
        finally:
            _caller.reset(token)

    async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        token = _caller.set(await _aio_authorize(method, context, is_revoked))
        threaded = None
        try:
            if is_async_stream:
                async for item in behaviour(request, context):
                    yield item
                return
            if is_coroutine:  # writes its responses itself (`await context.write(...)`)
                await behaviour(request, context)
                return
            loop = asyncio.get_running_loop()
            threaded = _ThreadContext(context, loop)
            request = _blocking_requests(request, loop)
            # One context for the generator's whole life: each step runs in it, on some pool thread.
            run_in = contextvars.copy_context().run
            items: Iterator[Any] = iter(run_in(behaviour, request, threaded))
            while (item := await loop.run_in_executor(pool, run_in, next, items, _END)) is not _END:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            if threaded is not None:
                threaded.gone = True
            raise
        except Exception as exc:
            if _already_ended(context, exc):
                raise
            await _aio_abort(context, _failure(exc))
        finally:
            _caller.reset(token)

    return guarded, guarded_stream


def _blocking_requests(request: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """A streamed request (an async iterator on this server) as the iterator a synchronous
    handler reads on its thread; a single request as it is."""
    if not isinstance(request, AsyncIterator):
        return request

    def each() -> Iterator[Any]:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(anext(request), loop).result()
            except StopAsyncIteration:
                return

    return each()


class _ThreadContext:
    """What a synchronous handler is given on the asyncio server: the `grpc.ServicerContext`
    methods, over the RPC's asyncio context. gRPC's own stand-in (`_SyncServicerContext`) has
    neither `code()` nor `is_active()`, which the guard, the RPC metrics and streaming
    servicers use."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self.gone = False  # the client went away (or the server is stopping) while this ran

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        asyncio.run_coroutine_threadsafe(self._context.abort(code, details), self._loop).result()

    def abort_with_status(self, status: grpc.Status) -> None:
        asyncio.run_coroutine_threadsafe(self._context.abort_with_status(status), self._loop).result()

    def send_initial_metadata(self, metadata: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._context.send_initial_metadata(metadata), self._loop).result()

    def is_active(self) -> bool:
        return not self.gone and not self._context.done()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._context.add_done_callback(lambda _context: callback())
        return True

    def __getattr__(self, name: str) -> Any:
        # code, details, set_code, set_details, set_trailing_metadata, invocation_metadata,
        # peer, auth_context, time_remaining, ...: plain calls on the asyncio context.
        return getattr(self._context, name)


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
