"""Two configuration servers on one store never run the same step twice (both backends).

Each "server" is its own store connection and its own runner, as two
controller replicas sharing one PostgreSQL are; the guarantee is the store's
compare-and-set claims, not anything in one process.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime

from siterecovery.controller.jobs.engine import (
    FunctionStep,
    JobKind,
    JobRunner,
    RetryPolicy,
    StepContext,
    create_job,
)
from siterecovery.controller.store import Store, open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_two_servers_racing_over_many_jobs_run_each_step_once(store: Store, store_url: str) -> None:
    executions: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def track(ctx: StepContext) -> None:
        with lock:
            executions[(ctx.job.id, ctx.step.index)] += 1

    kind = JobKind("demo", [FunctionStep(f"s{i}", track) for i in range(4)])
    jobs = [create_job(store, kind, f"vm{i}", now=T0) for i in range(10)]
    second = open_store(store_url)
    try:
        runners = [
            JobRunner(s, f"cs-{i}", [kind], RetryPolicy(max_attempts=1, initial_backoff=0, max_backoff=0),
                      lease_seconds=60)
            for i, s in enumerate((store, second))
        ]
        barrier = threading.Barrier(len(runners))

        def work(runner: JobRunner) -> None:
            barrier.wait(timeout=10)
            while runner.store.runnable_job_ids(now=T0):
                runner.run_once(now=T0)

        threads = [threading.Thread(target=work, args=(r,)) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        second.close()
    assert executions == Counter({(j.id, i): 1 for j in jobs for i in range(4)})
    assert all(store.get_job(j.id).status == "succeeded" for j in jobs)
