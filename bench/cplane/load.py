"""One load-generator process: many simulated agents on one grpc.aio event loop.

Each agent has its own mutual-TLS channel with its own certificate (so the
server sees one connection per agent, as in the field) and the channel
options every agent uses (common/channels.py). The process registers its
agents, reports back, and on the start signal heartbeats each of them every
`interval` seconds at its own fixed offset: agent g of N fires at
t0 + g·interval/N + k·interval, so the whole fleet's heartbeats are spread
evenly. The pacing is the workload; the clock is CLOCK_MONOTONIC, shared by
every process on the machine.

For each heartbeat scheduled inside the measured window it keeps the latency
(from just before the call to the response, client side) and how late the
call went out against its schedule: a late start means the generator, not the
server, fell behind.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc

from bench.cplane import fleet
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc


@dataclass(frozen=True)
class Plan:
    server: fleet.Server
    agents: list[fleet.AgentIdentity]
    fleet_size: int
    interval: float
    warmup: float
    seconds: float


@dataclass
class Samples:
    latencies_ms: array = field(default_factory=lambda: array("d"))
    lags_ms: array = field(default_factory=lambda: array("d"))
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0


def run(plan: Plan, conn: Connection) -> None:
    """The process's entry (multiprocessing, spawn): register, wait for t0, heartbeat, report."""
    asyncio.run(_main(plan, conn))


async def _main(plan: Plan, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    channels = [_channel(plan.server, agent) for agent in plan.agents]
    stubs = [agent_pb2_grpc.AgentControlStub(c) for c in channels]
    try:
        started = time.monotonic()
        intervals = await _register_all(plan, stubs)
        if set(intervals) != {plan.interval}:
            raise SystemExit(f"the server dictates heartbeat intervals {sorted(set(intervals))}, not {plan.interval}")
        conn.send(("registered", time.monotonic() - started))
        _, t0 = await loop.run_in_executor(None, conn.recv)
        samples = await _heartbeat(plan, stubs, t0)
        conn.send(("samples", samples.latencies_ms.tobytes(), samples.lags_ms.tobytes(), samples.errors,
                   samples.sent))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def _channel(server: fleet.Server, agent: fleet.AgentIdentity) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(server.ca_pem, agent.key_pem, agent.cert_pem)
    return grpc.aio.secure_channel(server.address, credentials, options=server.options())


async def _register_all(plan: Plan, stubs: list, concurrency: int = 16) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(agent: fleet.AgentIdentity, stub: agent_pb2_grpc.AgentControlStub) -> float:
        async with gate:
            reply = await _retrying(lambda: stub.Register(
                agent_pb2.RegisterRequest(inventory=fleet.inventory(agent)), timeout=RPC_TIMEOUT))
            if reply.server_id != agent.id:
                raise SystemExit(f"{agent.hostname} registered as {reply.server_id}, not {agent.id}")
            return reply.heartbeat_interval_seconds

    return list(await asyncio.gather(*(one(a, s) for a, s in zip(plan.agents, stubs, strict=True))))


async def _retrying(call, attempts: int = 8, backoff: float = 0.2, cap: float = 10.0):
    """Retry an unavailable server as an agent does (agents/runtime.py: capped exponential backoff).

    Thousands of agents registering at once is the one moment the server may refuse
    or time out a handshake; an agent then simply tries again.
    """
    for attempt in range(attempts):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if not retryable or attempt == attempts - 1:
                raise
        await asyncio.sleep(min(cap, backoff * 2**attempt))  # backoff between attempts, as agents do
    raise AssertionError("unreachable")


async def _heartbeat(plan: Plan, stubs: list, t0: float) -> Samples:
    samples = Samples()
    measure_from, end = t0 + plan.warmup, t0 + plan.warmup + plan.seconds
    slot = plan.interval / plan.fleet_size
    pending: set[asyncio.Task] = set()
    tick = 0
    while True:
        round_start = t0 + tick * plan.interval
        if round_start >= end:
            break
        for agent, stub in zip(plan.agents, stubs, strict=True):
            due = round_start + agent.index * slot
            if due >= end:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = fleet.heartbeat(agent.index, tick)
            record = samples if due >= measure_from else None
            task = asyncio.create_task(_one(stub, request, due, record))
            pending.add(task)
            task.add_done_callback(pending.discard)
        tick += 1
    await asyncio.gather(*pending)
    return samples


async def _one(stub: agent_pb2_grpc.AgentControlStub, request: agent_pb2.HeartbeatRequest, due: float,
               samples: Samples | None) -> None:
    started = time.monotonic()
    code = ""
    try:
        await stub.Heartbeat(request, timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    elapsed = time.monotonic() - started
    if samples is None:
        return
    samples.sent += 1
    if code:
        samples.errors[code] = samples.errors.get(code, 0) + 1
    else:
        samples.latencies_ms.append(elapsed * 1000)
    samples.lags_ms.append((started - due) * 1000)
