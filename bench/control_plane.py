"""Control plane: N simulated agents heartbeating against one configuration server.

Issue 7 item 5: 2,000 agents heartbeating every 10 s, on SQLite and on
PostgreSQL; targets p99 heartbeat latency <= 50 ms and the configuration
server's CPU <= 50 % of one core. There is no peer program to run beside it:
the targets are absolute.

For each store: start a configuration server as a real subprocess
(controller/launcher.py, 127.0.0.1, port 0; PostgreSQL in a throwaway cluster
with default durability), enroll the fleet through the passphrase flow
(cplane/fleet.py), register every agent with a source agent's inventory, wait
for the register-server jobs that first registrations start, then heartbeat
each agent every interval at evenly spread offsets (cplane/load.py, grpc.aio in
--workers processes). One interval of warm-up is not measured; over the next
--seconds it records each heartbeat's client-side latency and samples the
server's CPU and RSS (and PostgreSQL's, and the generator's own CPU).

    .venv/bin/python -m bench.control_plane --agents 2000 --seconds 60 --store both

The last line holds the results against the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import platform
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psutil

from bench.cplane import fleet, load, measure, postgres
from siterecovery.common.pb import admin_pb2, admin_pb2_grpc
from siterecovery.controller import launcher

P99_TARGET_MS = 50.0
CPU_TARGET_PERCENT = 50.0
MIB = 1 << 20


@dataclass
class Outcome:
    store: str
    latencies_ms: list[float]
    lags_ms: list[float]
    errors: dict[str, int]
    sent: int
    server: measure.Usage
    generator: measure.Usage
    database: measure.Usage | None
    setup: dict[str, float]
    detail: str = ""

    @property
    def p50(self) -> float:
        return measure.percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return measure.percentile(self.latencies_ms, 0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured steady-state window")
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat interval the server dictates")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before the window (default: one interval)")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--keep", type=Path, help="keep the server's state directory and log here")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.interval
    if args.agents < 1 or args.workers < 1 or args.seconds <= 0 or args.interval <= 0:
        parser.error("--agents, --workers, --seconds and --interval must be positive")
    return args


def machine_facts() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load1, load5, _ = psutil.getloadavg()
    return (f"machine: {model}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.1f} GiB RAM, "
            f"kernel {platform.release()}, Python {platform.python_version()}, grpcio {grpc.__version__}; "
            f"load average {load1:.2f} / {load5:.2f} (1 / 5 min) at start")


@contextlib.contextmanager
def store_url(store: str, root: Path) -> Iterator[tuple[list[str], postgres.Cluster | None]]:
    if store == "sqlite":
        yield [], None  # the default: <state_dir>/store.db
        return
    with postgres.cluster() as cluster:
        print(f"  {cluster.version}, fsync on, unix socket", flush=True)
        yield ["--store-url", cluster.url()], cluster


def run_store(store: str, args: argparse.Namespace, root: Path) -> Outcome:
    print(f"{store}: starting the configuration server", flush=True)
    state_dir = root / store / "config-server"
    with store_url(store, root) as (url_args, cluster):
        server_process = launcher.launch(
            "config-server",
            ["--state-dir", str(state_dir), "--listen", "127.0.0.1", "--port", "0",
             "--heartbeat-interval", f"{args.interval:g}", *url_args],
            state_dir=state_dir,
            log_path=root / store / "config-server.log",
        )
        try:
            return _drive(store, args, server_process, cluster)
        finally:
            launcher.stop(server_process)


def _drive(store: str, args: argparse.Namespace, launched: launcher.Launched,
           cluster: postgres.Cluster | None) -> Outcome:
    server = fleet.Server.from_state_dir(launched.state_dir, launched.state["port"])
    setup: dict[str, float] = {}
    started = time.monotonic()
    identities = asyncio.run(fleet.enroll_fleet(server, args.agents))
    setup["enroll"] = time.monotonic() - started
    print(f"  enrolled {len(identities)} agents in {setup['enroll']:.1f} s", flush=True)

    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    for w in range(args.workers):
        plan = load.Plan(server=server, agents=identities[w::args.workers], fleet_size=args.agents,
                         interval=args.interval, warmup=args.warmup, seconds=args.seconds)
        mine, theirs = context.Pipe()
        process = context.Process(target=load.run, args=(plan, theirs), name=f"load-{w}")
        process.start()
        workers.append(process)
        pipes.append(mine)
    try:
        started = time.monotonic()
        for pipe in pipes:
            _expect(pipe, "registered")
        setup["register"] = time.monotonic() - started
        print(f"  registered them in {setup['register']:.1f} s", flush=True)
        started = time.monotonic()
        failed = wait_for_jobs(server)
        setup["jobs"] = time.monotonic() - started
        print(f"  their register-server jobs ended in {setup['jobs']:.1f} s ({failed} failed)", flush=True)
        return _measure(store, args, launched, cluster, workers, pipes, setup)
    finally:
        for process in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def _expect(pipe, what: str) -> tuple:
    message = pipe.recv()
    if message[0] != what:
        raise SystemExit(f"a load generator said {message[0]!r}, expected {what!r}")
    return message


def wait_for_jobs(server: fleet.Server, timeout: float = 900.0) -> int:
    """Wait until no job is pending or running (polling the Admin API); return how many failed."""
    busy = [admin_pb2.JOB_STATUS_PENDING, admin_pb2.JOB_STATUS_RUNNING, admin_pb2.JOB_STATUS_COMPENSATING]

    async def poll() -> int:
        async with server.admin_channel() as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            deadline = time.monotonic() + timeout
            while (await stub.ListJobs(admin_pb2.ListJobsRequest(statuses=busy, limit=1), timeout=30)).jobs:
                if time.monotonic() > deadline:
                    raise SystemExit(f"register-server jobs still running after {timeout:.0f} s")
                await asyncio.sleep(0.5)  # polling another process's state: it has no event to wait on
            failed = await stub.ListJobs(admin_pb2.ListJobsRequest(statuses=[admin_pb2.JOB_STATUS_FAILED]),
                                         timeout=30)
            return len(failed.jobs)

    return asyncio.run(poll())


def _measure(store: str, args: argparse.Namespace, launched: launcher.Launched, cluster: postgres.Cluster | None,
             workers: list, pipes: list, setup: dict[str, float]) -> Outcome:
    server_proc = launched.process()
    assert server_proc is not None, "the configuration server died"
    generator_procs = [psutil.Process(w.pid) for w in workers]
    windows = {
        "server": measure.Window(lambda: [server_proc]),
        "generator": measure.Window(lambda: generator_procs),
    }
    if cluster is not None:
        windows["database"] = measure.Window(cluster.processes)
    t0 = time.monotonic() + 1.0
    for pipe in pipes:
        pipe.send(("start", t0))
    begin, end = t0 + args.warmup, t0 + args.warmup + args.seconds
    print(f"  heartbeating: {args.warmup:g} s warm-up, then {args.seconds:g} s measured", flush=True)
    _until(begin)
    for window in windows.values():
        window.begin()
    while time.monotonic() < end:
        _until(min(end, time.monotonic() + 1.0))
        for window in windows.values():
            window.sample()
    usage = {name: window.end() for name, window in windows.items()}
    latencies, lags, errors, sent = array("d"), array("d"), {}, 0
    for pipe in pipes:
        _, lat, lag, errs, count = _expect(pipe, "samples")
        latencies.frombytes(lat)
        lags.frombytes(lag)
        sent += count
        for code, n in errs.items():
            errors[code] = errors.get(code, 0) + n
    return Outcome(store=store, latencies_ms=list(latencies), lags_ms=list(lags), errors=errors, sent=sent,
                   server=usage["server"], generator=usage["generator"], database=usage.get("database"),
                   setup=setup)


def _until(when: float) -> None:
    """Wait for a point of the workload's schedule (pacing, not synchronisation)."""
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def report(outcome: Outcome, args: argparse.Namespace) -> None:
    expected = int(args.seconds / args.interval * args.agents)
    lat = outcome.latencies_ms
    print(f"{outcome.store}: {outcome.sent} heartbeats measured (schedule: ~{expected}), "
          f"{len(outcome.errors) and sum(outcome.errors.values())} failed {outcome.errors or ''}")
    print(f"  latency ms: p50 {outcome.p50:.1f}  p90 {measure.percentile(lat, 0.9):.1f}  "
          f"p99 {outcome.p99:.1f}  p99.9 {measure.percentile(lat, 0.999):.1f}  max {max(lat, default=float('nan')):.1f}")
    print(f"  generator start lag ms: p99 {measure.percentile(outcome.lags_ms, 0.99):.1f}  "
          f"max {max(outcome.lags_ms, default=float('nan')):.1f}")
    per_beat = 1000 * outcome.server.cpu_seconds / outcome.sent if outcome.sent else float("nan")
    print(f"  configuration server: cpu {outcome.server.cpu_percent:.1f} % of one core "
          f"({per_beat:.2f} ms a heartbeat; target <= {CPU_TARGET_PERCENT * args.interval / args.agents * 10:.2f}), "
          f"rss peak {outcome.server.rss_peak / MIB:.0f} MiB")
    if outcome.database is not None:
        print(f"  postgresql (all its processes): cpu {outcome.database.cpu_percent:.1f} % of one core, "
              f"rss peak {outcome.database.rss_peak / MIB:.0f} MiB")
    print(f"  load generator ({args.workers} processes): cpu {outcome.generator.cpu_percent:.1f} % of one core, "
          f"rss peak {outcome.generator.rss_peak / MIB:.0f} MiB")
    load1, load5, _ = psutil.getloadavg()
    print(f"  setup: enroll {outcome.setup['enroll']:.1f} s, register {outcome.setup['register']:.1f} s, "
          f"register-server jobs {outcome.setup['jobs']:.1f} s; load average {load1:.2f} / {load5:.2f} at the end",
          flush=True)


def summary(outcomes: list[Outcome], agents: int) -> str:
    parts = [
        f"{o.store} p99 {o.p99:.1f} ms ({o.p99 / P99_TARGET_MS:.2f}x target) "
        f"cpu {o.server.cpu_percent:.0f} % ({o.server.cpu_percent / CPU_TARGET_PERCENT:.2f}x target)"
        + (f" errors {sum(o.errors.values())}" if o.errors else "")
        for o in outcomes
    ]
    return (f"control_plane {agents} agents: " + " | ".join(parts)
            + f" (absolute targets, no peer: p99 <= {P99_TARGET_MS:g} ms, cpu <= {CPU_TARGET_PERCENT:g} % of one core)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    print(f"control_plane: {args.agents} agents, heartbeat every {args.interval:g} s, {args.seconds:g} s measured, "
          f"{args.workers} generator processes, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(machine_facts(), flush=True)
    outcomes = []
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            root = args.keep
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sr-bench-cp-")))
        for store in stores:
            outcome = run_store(store, args, root)
            report(outcome, args)
            outcomes.append(outcome)
    print(summary(outcomes, args.agents))


if __name__ == "__main__":
    main()
