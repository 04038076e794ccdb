"""The job engine on a real SQLite store, in-process, with time driven explicitly.

Steps act on a small "site" (marker files in a directory) so the tests check
what the engine left behind, not how it was called.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.common.errors import Integrity, InvalidInput, Unavailable
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import (
    FunctionStep,
    JobKind,
    JobRunner,
    RetryPolicy,
    Step,
    StepContext,
    Waiting,
    cancel_job,
    create_job,
    registry,
)
from siterecovery.controller.store import SqlStore, Store, open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0)


class Crash(BaseException):
    """Stands for the process dying in the middle of a step."""


class Site:
    """A directory of marker files standing for resources on a recovery site."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.journal: list[tuple[str, str]] = []  # (action, step) in the order they happened
        self.tries: Counter[str] = Counter()

    def note(self, action: str, name: str) -> None:
        with self.lock:
            self.journal.append((action, name))
            self.tries[f"{action}:{name}"] += 1

    def resources(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())


class MakeResource(Step):
    """Creates `<job>-<name>` (idempotently) and returns where it is."""

    def __init__(
        self,
        site: Site,
        name: str,
        fail: Callable[[StepContext], None] | None = None,
        fail_compensate: Exception | None = None,
    ) -> None:
        self.site = site
        self.name = name
        self.fail = fail
        self.fail_compensate = fail_compensate

    def execute(self, ctx: StepContext) -> dict:
        self.site.note("execute", self.name)
        if self.fail:
            self.fail(ctx)
        path = self.site.root / f"{ctx.job.target}-{self.name}"
        path.write_text(ctx.params.get("content", ""))
        return {"path": str(path), "after": sorted(ctx.outputs)}

    def compensate(self, ctx: StepContext) -> None:
        self.site.note("compensate", self.name)
        if self.fail_compensate:
            raise self.fail_compensate
        Path(ctx.output["path"]).unlink(missing_ok=True)


@pytest.fixture
def store(tmp_path: Path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = tmp_path / "site"
    root.mkdir()
    return Site(root)


def kind_of(site: Site, *names: str, **special) -> JobKind:
    return JobKind("demo", [special.get(n) or MakeResource(site, n) for n in names])


def statuses(store: Store, job_id: str) -> tuple[str, list[str]]:
    job = store.get_job(job_id)
    return job.status, [s.status for s in job.steps]


# --- the happy path ----------------------------------------------------------------------


def test_a_job_runs_its_steps_in_order_and_succeeds(store: Store, site: Site) -> None:
    seen_progress: list[tuple[float, str]] = []

    def half_way(ctx: StepContext) -> None:
        ctx.progress(0.5, "half way")
        step = ctx.store.get_job(ctx.job.id).steps[ctx.step.index]
        seen_progress.append((step.progress, step.message))

    kind = kind_of(site, "a", "b", "c", b=MakeResource(site, "b", fail=half_way))
    job = create_job(store, kind, "vm1", {"content": "x"}, now=T0)
    runner = JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE)

    assert runner.run_once(now=T0) == 3

    done = store.get_job(job.id)
    assert done.status == "succeeded"
    assert [(s.status, s.attempt, s.progress, s.lease_owner) for s in done.steps] == [
        ("succeeded", 1, 1.0, "")
    ] * 3
    assert site.journal == [("execute", "a"), ("execute", "b"), ("execute", "c")]
    assert site.resources() == ["vm1-a", "vm1-b", "vm1-c"]
    # Each step saw the outputs of the ones before it; progress reached the store.
    assert [s.output["after"] for s in done.steps] == [[], ["a"], ["a", "b"]]
    assert seen_progress == [(0.5, "half way")]
    assert store.runnable_job_ids(now=T0) == []
    assert runner.run_once(now=T0) == 0


def test_a_runner_stopped_mid_job_counts_the_step_it_ran_and_leaves_the_rest(store: Store, site: Site) -> None:
    runner: JobRunner

    def stop_runner(ctx: StepContext) -> None:
        runner.stop()  # the configuration server shutting down while step "a" runs

    kind = kind_of(site, "a", "b", a=MakeResource(site, "a", fail=stop_runner))
    job = create_job(store, kind, "vm1", {"content": "x"}, now=T0)
    runner = JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE)

    assert runner.run_once(now=T0) == 1
    assert statuses(store, job.id)[1] == ["succeeded", "pending"]
    assert site.resources() == ["vm1-a"]


def test_a_retryable_error_is_retried_then_the_step_succeeds(store: Store, site: Site) -> None:
    def flaky(ctx: StepContext) -> None:
        if site.tries["execute:b"] < 3:
            raise Unavailable("vCenter did not answer")

    kind = kind_of(site, "a", "b", b=MakeResource(site, "b", fail=flaky))
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    assert statuses(store, job.id) == ("succeeded", ["succeeded", "succeeded"])
    assert site.tries["execute:b"] == 3
    assert store.get_job(job.id).steps[1].attempt == 1  # retries happen within one claim


# --- failure and compensation ------------------------------------------------------------------------


def test_a_non_retryable_failure_compensates_completed_steps_in_reverse(store: Store, site: Site) -> None:
    def broken(ctx: StepContext) -> None:
        raise InvalidInput("datastore 'ds9' does not exist", code="no-datastore")

    kind = kind_of(site, "a", "b", "c", "d", c=MakeResource(site, "c", fail=broken))
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    done = store.get_job(job.id)
    assert done.status == "compensated"
    assert [s.status for s in done.steps] == ["compensated", "compensated", "failed", "pending"]
    assert done.error_code == "no-datastore"
    assert "datastore 'ds9' does not exist" in done.error_message
    assert done.steps[2].error_code == "no-datastore"
    assert site.tries["execute:c"] == 1  # not retryable: tried once
    assert site.journal == [
        ("execute", "a"),
        ("execute", "b"),
        ("execute", "c"),
        ("compensate", "b"),
        ("compensate", "a"),
    ]
    assert site.resources() == []


def test_retries_run_out_then_the_job_compensates(store: Store, site: Site) -> None:
    def down(ctx: StepContext) -> None:
        raise Unavailable("Azure is throttling", code="throttled")

    kind = kind_of(site, "a", "b", b=MakeResource(site, "b", fail=down))
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    assert statuses(store, job.id) == ("compensated", ["compensated", "failed"])
    assert site.tries["execute:b"] == FAST.max_attempts
    assert store.get_job(job.id).error_code == "throttled"


def test_a_failed_compensation_ends_the_job_failed(store: Store, site: Site) -> None:
    def broken(ctx: StepContext) -> None:
        raise InvalidInput("bad disk size")

    kind = kind_of(
        site,
        "a",
        "b",
        "c",
        a=MakeResource(site, "a", fail_compensate=Integrity("replica checksum mismatch")),
        c=MakeResource(site, "c", fail=broken),
    )
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    done = store.get_job(job.id)
    assert done.status == "failed"
    assert [s.status for s in done.steps] == ["failed", "compensated", "failed"]
    assert done.error_code == "integrity"
    assert "bad disk size" in done.error_message
    assert "compensating 'a' failed: replica checksum mismatch" in done.error_message
    assert site.resources() == ["vm1-a"]  # left for a person to look at
    assert store.runnable_job_ids(now=T0 + timedelta(days=1)) == []


def test_cancelling_a_running_job_compensates_what_it_did(store: Store, site: Site) -> None:
    def cancel_now(ctx: StepContext) -> None:
        assert cancel_job(ctx.store, ctx.job.id, now=T0)

    kind = kind_of(site, "a", "b", "c", b=MakeResource(site, "b", fail=cancel_now))
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    # b finished while the job was being cancelled: it is compensated too, c never ran.
    assert statuses(store, job.id) == ("compensated", ["compensated", "compensated", "pending"])
    assert store.get_job(job.id).error_code == "cancelled"
    assert site.resources() == []

    pending = create_job(store, kind, "vm2", now=T0)
    assert cancel_job(store, pending.id, now=T0)
    assert statuses(store, pending.id) == ("cancelled", ["pending"] * 3)


# --- crashes, leases, concurrency -------------------------------------------------------------------


def test_a_crashed_runner_is_resumed_by_another_after_its_lease_expires(store: Store, site: Site) -> None:
    def crash_first_time(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise Crash()

    kind = kind_of(site, "a", "b", "c", b=MakeResource(site, "b", fail=crash_first_time))
    job = create_job(store, kind, "vm1", now=T0)
    first = JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE)
    with pytest.raises(Crash):
        first.run_once(now=T0)

    # r1 is gone; it left step b running under its lease.
    stuck = store.get_job(job.id).steps[1]
    assert (stuck.status, stuck.lease_owner, stuck.attempt) == ("running", "r1", 1)

    second = JobRunner(store, "r2", [kind], FAST, lease_seconds=LEASE)
    assert second.run_once(now=T0 + timedelta(seconds=LEASE / 2)) == 0  # lease still live
    assert second.run_once(now=T0 + timedelta(seconds=LEASE)) == 2

    done = store.get_job(job.id)
    assert done.status == "succeeded"
    assert [(s.status, s.attempt) for s in done.steps] == [
        ("succeeded", 1),
        ("succeeded", 2),
        ("succeeded", 1),
    ]
    assert site.tries == Counter({"execute:a": 1, "execute:b": 2, "execute:c": 1})
    assert site.resources() == ["vm1-a", "vm1-b", "vm1-c"]


def test_a_runner_that_lost_its_lease_records_nothing(store: Store, site: Site) -> None:
    def stolen(ctx: StepContext) -> None:
        # The store decided r1 was dead and r2 took the step over.
        later = T0 + timedelta(seconds=LEASE)
        assert ctx.store.claim_step(ctx.job.id, 0, owner="r2", lease_seconds=LEASE, now=later)
        ctx.progress(0.9, "almost")  # r1 finds out here

    kind = kind_of(site, "a", "b", a=MakeResource(site, "a", fail=stolen))
    job = create_job(store, kind, "vm1", now=T0)
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)

    after = store.get_job(job.id)
    assert after.status == "running"
    step = after.steps[0]
    assert (step.status, step.lease_owner, step.attempt, step.progress) == ("running", "r2", 2, 0.0)


def test_a_second_runner_does_not_touch_a_step_in_progress(store: Store, site: Site) -> None:
    entered, release = threading.Event(), threading.Event()

    def block(ctx: StepContext) -> None:
        entered.set()
        assert release.wait(timeout=10)

    kind = kind_of(site, "a", "b", a=MakeResource(site, "a", fail=block))
    job = create_job(store, kind, "vm1", now=T0)
    first = JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE)
    second = JobRunner(store, "r2", [kind], FAST, lease_seconds=LEASE)
    worker = threading.Thread(target=first.run_once, kwargs={"now": T0})
    worker.start()
    try:
        assert entered.wait(timeout=10)
        assert second.run_once(now=T0) == 0
        assert store.get_job(job.id).steps[0].lease_owner == "r1"
    finally:
        release.set()
        worker.join(timeout=10)
    assert statuses(store, job.id) == ("succeeded", ["succeeded", "succeeded"])
    assert site.tries == Counter({"execute:a": 1, "execute:b": 1})


def test_two_runners_racing_over_many_jobs_run_each_step_once(store: Store, site: Site) -> None:
    executions: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def track(ctx: StepContext) -> None:
        with lock:
            executions[(ctx.job.id, ctx.step.index)] += 1

    kind = JobKind("demo", [FunctionStep(f"s{i}", track) for i in range(3)])
    jobs = [create_job(store, kind, f"vm{i}", now=T0) for i in range(8)]
    runners = [JobRunner(store, f"r{i}", [kind], FAST, lease_seconds=LEASE) for i in range(2)]
    barrier = threading.Barrier(len(runners))

    def work(runner: JobRunner) -> None:
        barrier.wait(timeout=10)
        while runner.store.runnable_job_ids(now=T0):
            runner.run_once(now=T0)

    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert executions == Counter({(j.id, i): 1 for j in jobs for i in range(3)})
    assert all(store.get_job(j.id).status == "succeeded" for j in jobs)


# --- the background loop and the small pieces ---------------------------------------------------------------


class ObservedStore(SqlStore):
    """The real store, telling the test when a job reaches a final status."""

    finished = threading.Event()

    def set_job_status(self, job_id, *, expected, new, now, error_code="", error_message=""):
        changed = super().set_job_status(
            job_id,
            expected=expected,
            new=new,
            now=now,
            error_code=error_code,
            error_message=error_message,
        )
        if changed and new in states.TERMINAL_JOB_STATUSES:
            self.finished.set()
        return changed


def test_start_runs_jobs_in_the_background_until_stopped(tmp_path: Path, site: Site) -> None:
    store = ObservedStore(f"sqlite:///{tmp_path}/bg.db")
    store.finished = threading.Event()
    store.migrate()
    kind = kind_of(site, "a", "b")
    runner = JobRunner(store, "bg", [kind], FAST, lease_seconds=LEASE)
    runner.start(interval=0.05)
    try:
        job = create_job(store, kind, "vm1")
        assert store.finished.wait(timeout=10)
    finally:
        runner.stop(timeout=10)
    assert statuses(store, job.id) == ("succeeded", ["succeeded", "succeeded"])
    store.close()


def test_jobs_of_unknown_kinds_are_left_alone(store: Store, site: Site) -> None:
    other = JobKind("other", [MakeResource(site, "x")])
    job = create_job(store, other, "vm1", now=T0)
    JobRunner(store, "r1", [kind_of(site, "a")], FAST, lease_seconds=LEASE).run_once(now=T0)
    assert statuses(store, job.id) == ("pending", ["pending"])


def test_retry_policy_is_validated_data() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.5, max_backoff=8)
    with pytest.raises(FrozenInstanceError):
        policy.max_attempts = 9  # type: ignore[misc]
    for bad in (
        {"max_attempts": 0},
        {"initial_backoff": -1.0},
        {"initial_backoff": 5.0, "max_backoff": 1.0},
    ):
        with pytest.raises(InvalidInput):
            RetryPolicy(**bad)


def test_kinds_need_unique_names(site: Site) -> None:
    with pytest.raises(InvalidInput):
        JobKind("dup", [MakeResource(site, "a"), MakeResource(site, "a")])
    with pytest.raises(InvalidInput):
        registry([kind_of(site, "a"), kind_of(site, "b")])  # both named "demo"
    assert list(registry([kind_of(site, "a")])) == ["demo"]


def test_the_transition_table_is_the_only_judge() -> None:
    states.check_transition("pending", "running")
    states.check_transition("succeeded", "compensating", entity="step")
    with pytest.raises(InvalidInput):
        states.check_transition("succeeded", "compensating")  # a finished job stays finished
    with pytest.raises(InvalidInput):
        states.check_transition("pending", "succeeded", entity="step")


# --- waiting, planned steps, restarts ------------------------------------------------------


def test_a_waiting_step_frees_the_runner_and_is_looked_at_again_after_its_delay(store: Store, site: Site) -> None:
    ready = threading.Event()

    def until_ready(ctx: StepContext) -> None:
        if not ready.is_set():
            raise Waiting("waiting for the initial sync: 40 %", delay=10.0, progress=0.4)

    kind = kind_of(site, "a", "b", b=MakeResource(site, "b", fail=until_ready))
    job = create_job(store, kind, "vm1", now=T0)
    plain = JobKind("plain", [MakeResource(site, "c")])
    other = create_job(store, plain, "vm2", now=T0)
    runner = JobRunner(store, "r1", [kind, plain], FAST, lease_seconds=LEASE)

    runner.run_once(now=T0)
    waiting = store.get_job(job.id).steps[1]
    assert (waiting.status, waiting.progress, waiting.message) == ("running", 0.4, "waiting for the initial sync: 40 %")
    assert waiting.lease_expires_at == T0 + timedelta(seconds=10)
    assert store.get_job(other.id).status == "succeeded"  # the wait did not hold the runner
    assert runner.run_once(now=T0 + timedelta(seconds=9)) == 0

    ready.set()
    assert runner.run_once(now=T0 + timedelta(seconds=10)) == 1
    assert statuses(store, job.id) == ("succeeded", ["succeeded", "succeeded"])
    assert site.tries["execute:b"] == 2 and site.tries["execute:a"] == 1 and site.tries["execute:c"] == 1


def test_a_planned_kind_derives_its_steps_from_the_parameters(store: Store, site: Site) -> None:
    kind = JobKind("plan", plan=lambda params: [MakeResource(site, n) for n in params["groups"]])
    job = create_job(store, kind, "plan1", {"groups": ["g1", "pause", "g2"]}, now=T0)
    assert [s.name for s in job.steps] == ["g1", "pause", "g2"]
    JobRunner(store, "r1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)
    assert store.get_job(job.id).status == "succeeded"
    assert site.resources() == ["plan1-g1", "plan1-g2", "plan1-pause"]
    with pytest.raises(InvalidInput):
        create_job(store, kind, "plan2", {"groups": []}, now=T0)
    with pytest.raises(InvalidInput):
        JobKind("both", [MakeResource(site, "a")], plan=lambda params: [])


def test_a_restarted_runner_takes_up_its_own_steps_at_once(store: Store, site: Site) -> None:
    def crash_first_time(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise Crash()

    kind = kind_of(site, "a", "b", b=MakeResource(site, "b", fail=crash_first_time))
    job = create_job(store, kind, "vm1", now=T0)
    with pytest.raises(Crash):
        JobRunner(store, "cs-1", [kind], FAST, lease_seconds=LEASE).run_once(now=T0)
    assert store.release_leases("someone-else", now=T0) == 0
    restarted = JobRunner(store, "cs-1", [kind], FAST, lease_seconds=LEASE)
    assert restarted.run_once(now=T0) == 0  # still under the dead process's lease
    assert store.release_leases("cs-1", now=T0) == 1
    assert restarted.run_once(now=T0) == 1
    assert statuses(store, job.id) == ("succeeded", ["succeeded", "succeeded"])
