"""The job engine: steps, job kinds, and the runner that drives persisted jobs.

A job kind is an ordered list of steps; each step has `execute(ctx)` and
`compensate(ctx)`, and either may run more than once (after a crash, after a
lost lease, on retry), so both must be idempotent. A job is rows in the store
(see `controller/store/base.py`); the runner keeps no state of its own that
matters, so any runner (another thread, another replica, this one restarted)
can pick a job up where it stands.

`JobRunner.run_once()` asks the store which jobs need something, and for each
drives it as far as it can: start it, claim its next step with a lease, run the
step (tenacity retries retryable errors by `RetryPolicy`), record the outcome,
settle the job's status. A step that fails for good makes the job compensate:
the steps that succeeded are compensated in reverse order and the job ends
`compensated`, or `failed` when a compensation fails too. Jobs of a kind this
runner does not know, or whose steps no longer match their kind, are left
alone: another replica (perhaps running another version) may know them. What comes next is
decided by `states.next_action`, the same rule the store uses to allow a
claim, so two runners can only ever hold different steps of different jobs,
and the store, not an in-process lock, guarantees it.

A step that has to wait for the world (an initial sync to finish, an operator
to confirm a manual action) raises `Waiting`: the runner records its progress
and message, keeps the step `running` under a lease that ends when it should be
looked at again, and moves on to other jobs; when that lease ends, any runner
claims the step again and `execute` runs from the top (so it must find out
where things stand rather than remember it).

A job kind's steps may depend on the job's parameters (a recovery plan's
failover has a step per group and per manual action): `JobKind(plan=...)`
derives them, and since parameters never change after creation, every runner
derives the same steps.

While a step runs, a keeper thread renews its lease every third of the lease
length. A runner that loses its lease (it was too slow, or the store thought
it dead) stops recording anything for that step: `progress()` raises
`LeaseLost` and the outcome is dropped; the new owner runs the step again.

A `JobObserver`, when given, is told how long each run of a step and each job
this runner ends took (the configuration server's metrics, controller/metrics.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, Self

import structlog
import tenacity

from siterecovery.common.errors import Conflict, InvalidInput, SiteRecoveryError
from siterecovery.common.logging import get_logger
from siterecovery.controller.jobs import states
from siterecovery.controller.store.base import JobRecord, StepRecord, Store

log = get_logger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- retry policy -----------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a step is retried on a retryable error.

    `max_attempts` counts the first try. The wait doubles from
    `initial_backoff` up to `max_backoff` seconds.
    """

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_backoff < 0:
            raise InvalidInput(f"initial_backoff must not be negative: {self.initial_backoff}")
        if self.max_backoff < self.initial_backoff:
            raise InvalidInput(
                f"max_backoff ({self.max_backoff}) is below initial_backoff ({self.initial_backoff})"
            )


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, SiteRecoveryError) and error.retryable


# --- steps and kinds --------------------------------------------------------------------


class Waiting(Exception):
    """Raised by a step that cannot finish yet: look again in `delay` seconds.

    Not an error and not retried in place: the runner records `progress` and
    `message`, sets the step's lease to end after `delay`, and lets the thread
    go to other jobs. The step runs again from the top when the lease ends.
    """

    def __init__(self, message: str, *, delay: float = 2.0, progress: float | None = None) -> None:
        super().__init__(message)
        if delay <= 0:
            raise InvalidInput(f"a wait must be positive, not {delay}")
        self.message = message
        self.delay = delay
        self.progress = progress


class LeaseLost(Conflict):
    """This runner no longer holds the step's lease; another runner has it."""

    def __init__(self, job_id: str, index: int) -> None:
        super().__init__(
            f"lost the lease on step {index} of job {job_id}",
            hint="another runner took the step over; nothing to do here",
            code="lease-lost",
        )


@dataclass
class StepContext:
    """What a step sees while it runs.

    `outputs` maps the names of steps that produced output to that output;
    while compensating it includes this step's own output (`ctx.output`).
    """

    job: JobRecord
    step: StepRecord
    store: Store
    phase: str  # "execute" or "compensate"
    outputs: Mapping[str, dict]
    _report: Callable[[float, str], None] = field(repr=False)

    @property
    def params(self) -> dict:
        return self.job.params

    @property
    def output(self) -> dict:
        """This step's own recorded output (useful to compensate)."""
        return self.outputs.get(self.step.name, {})

    @property
    def attempt(self) -> int:
        """How many times this step was claimed, this claim included."""
        return self.step.attempt

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress (0..1) in the store. Raises LeaseLost if the step was taken over."""
        self._report(fraction, message)


class Step(ABC):
    """One idempotent unit of a job. Nova calls these execute/rollback."""

    name: str

    @abstractmethod
    def execute(self, ctx: StepContext) -> dict | None:
        """Do the work; return a JSON-able dict for later steps (or None). May run twice."""

    @abstractmethod
    def compensate(self, ctx: StepContext) -> None:
        """Undo what `execute` did; must cope with a partial or a repeated execute."""


class FunctionStep(Step):
    """A step made of two functions, for simple steps and tests."""

    def __init__(
        self,
        name: str,
        execute: Callable[[StepContext], dict | None],
        compensate: Callable[[StepContext], None] | None = None,
    ) -> None:
        self.name = name
        self._execute = execute
        self._compensate = compensate

    def execute(self, ctx: StepContext) -> dict | None:
        return self._execute(ctx)

    def compensate(self, ctx: StepContext) -> None:
        if self._compensate is not None:
            self._compensate(ctx)


@dataclass(frozen=True, init=False)
class JobKind:
    """A named, ordered list of steps. The name is what jobs record as their kind.

    Either fixed `steps`, or `plan`: a function of the job's parameters that
    returns the steps (the same ones for the same parameters, every time).
    """

    name: str
    steps: tuple[Step, ...]
    plan: Callable[[Mapping[str, Any]], Iterable[Step]] | None

    def __init__(
        self,
        name: str,
        steps: Iterable[Step] = (),
        *,
        plan: Callable[[Mapping[str, Any]], Iterable[Step]] | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "plan", plan)
        if not name:
            raise InvalidInput("a job kind needs a name")
        if plan is not None and self.steps:
            raise InvalidInput(f"job kind {name!r} has both fixed steps and a plan")
        if plan is None:
            _check_step_names(name, self.steps)

    @property
    def step_names(self) -> list[str]:
        """The fixed steps' names (a planned kind has none without parameters)."""
        return [step.name for step in self.steps]

    def steps_for(self, params: Mapping[str, Any]) -> tuple[Step, ...]:
        if self.plan is None:
            return self.steps
        planned = tuple(self.plan(params))
        _check_step_names(self.name, planned)
        return planned


def _check_step_names(kind: str, steps: Sequence[Step]) -> None:
    names = [step.name for step in steps]
    if not names or len(set(names)) != len(names) or not all(names):
        raise InvalidInput(f"step names of job kind {kind!r} must be unique and not empty: {names}")


def registry(kinds: Iterable[JobKind] | Mapping[str, JobKind]) -> dict[str, JobKind]:
    """Job kinds by name; InvalidInput on a duplicate name."""
    if isinstance(kinds, Mapping):
        kinds = kinds.values()
    by_name: dict[str, JobKind] = {}
    for kind in kinds:
        if kind.name in by_name:
            raise InvalidInput(f"job kind {kind.name!r} is registered twice")
        by_name[kind.name] = kind
    return by_name


def create_job(
    store: Store,
    kind: JobKind,
    target: str,
    params: dict | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """Persist a new pending job of `kind`; a runner will pick it up."""
    params = params or {}
    return store.create_job(
        kind=kind.name,
        target=target,
        step_names=[step.name for step in kind.steps_for(params)],
        params=params,
        now=now or utcnow(),
    )


def cancel_job(store: Store, job_id: str, *, now: datetime | None = None) -> bool:
    """Cancel a job: a pending one ends `cancelled`, a running one compensates.

    Returns False when the job had already finished (or was compensating).
    """
    now = now or utcnow()
    if store.set_job_status(job_id, expected={states.PENDING}, new=states.CANCELLED, now=now):
        return True
    return store.set_job_status(
        job_id,
        expected={states.RUNNING},
        new=states.COMPENSATING,
        now=now,
        error_code="cancelled",
        error_message="cancelled on request",
    )


# --- the runner ---------------------------------------------------------------------


class JobObserver(Protocol):
    """Told how long steps and jobs took (controller/metrics.py turns it into histograms).

    `step_finished`: one run of a step's execute or compensate on this runner,
    outcome succeeded | failed | waiting | lease-lost | stopped.
    `job_finished`: a job this runner ended, from its creation; outcome is its
    final status (succeeded, compensated, failed).
    """

    def step_finished(self, kind: str, phase: str, outcome: str, seconds: float) -> None: ...

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None: ...


class _NoObserver:
    def step_finished(self, kind: str, phase: str, outcome: str, seconds: float) -> None:
        pass

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
        pass


class JobRunner:
    """Drives jobs from the store. Several runners (threads, replicas) may share a store."""

    def __init__(
        self,
        store: Store,
        owner_id: str | None = None,
        kinds: Iterable[JobKind] | Mapping[str, JobKind] = (),
        retry_policy: RetryPolicy | None = None,
        *,
        lease_seconds: float = 60.0,
        clock: Clock = utcnow,
        observer: JobObserver | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise InvalidInput(f"lease_seconds must be positive, not {lease_seconds}")
        self.store = store
        self.owner_id = owner_id or f"runner-{uuid.uuid4()}"
        self.kinds = registry(kinds)
        self.retry_policy = retry_policy or RetryPolicy()
        self.lease_seconds = lease_seconds
        self._clock = clock
        self.observer: JobObserver = observer or _NoObserver()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- background loop ---

    def start(self, interval: float = 2.0) -> None:
        """Call run_once every `interval` seconds in a background thread until stop()."""
        if self._thread is not None:
            raise Conflict("the job runner is already started")
        released = self.store.release_leases(self.owner_id, now=self._clock())
        if released:
            log.info("took up the jobs this runner held before it restarted", jobs=released)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name=f"jobs-{self.owner_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the loop to stop and wait for it; a step in progress is left to its lease.

        A stopped runner stays stopped: run_once() does nothing until start().
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the loop alive; the next round retries
                log.exception("job runner round failed", owner=self.owner_id)
            self._stop.wait(interval)

    # --- one round ---

    def run_once(self, now: datetime | None = None) -> int:
        """Drive every runnable job as far as it goes now; return how many steps ran.

        With `now` given, that time is used throughout (tests drive leases with
        it); otherwise the clock is read at every store write. A job whose
        driving fails unexpectedly (the store went away, a bug) is logged and
        left to the next round; the other jobs still get their turn.
        """
        clock: Clock = (lambda: now) if now is not None else self._clock
        ran = 0
        for job_id in self.store.runnable_job_ids(now=clock()):
            if self._stop.is_set():
                break
            try:
                ran += self._drive(job_id, clock)
            except Exception:
                log.exception("driving a job failed; retrying next round", job=job_id)
        return ran

    def _drive(self, job_id: str, clock: Clock) -> int:
        ran = 0
        while not self._stop.is_set():
            job = self.store.get_job(job_id)
            kind = self.kinds.get(job.kind)
            if kind is None:
                log.warning("job of an unknown kind left alone", job=job_id, kind=job.kind)
                return ran
            try:
                planned = kind.steps_for(job.params)
            except Exception:  # parameters this version cannot plan: not ours to touch
                log.warning("job's steps cannot be planned; left alone", job=job_id, kind=job.kind, exc_info=True)
                return ran
            if [s.name for s in planned] != [s.name for s in job.steps]:
                log.warning(
                    "job's steps do not match its kind; left alone",
                    job=job_id,
                    kind=job.kind,
                    steps=[s.name for s in job.steps],
                )
                return ran
            action = states.next_action(job, clock())
            if action.kind == "settle":
                self._settle(job, action, clock)
                continue  # re-read; if someone else settled it first, that is fine
            if action.kind != "claim":
                return ran  # waiting on someone else's lease, or finished
            step = self.store.claim_step(
                job_id,
                action.index,
                owner=self.owner_id,
                lease_seconds=self.lease_seconds,
                now=clock(),
            )
            if step is None:
                return ran  # another runner got there first
            ran += 1
            if not self._run_step(job, planned[step.index], step, clock):
                return ran  # lost the lease: the job is someone else's now
        return ran  # stopping: the rest of the job waits for the next start

    def _settle(self, job: JobRecord, action: states.Action, clock: Clock) -> None:
        now = clock()
        changed = self.store.set_job_status(
            job.id,
            expected={job.status},
            new=action.status,
            now=now,
            error_code=action.error_code,
            error_message=action.error_message,
        )
        if changed:
            log.info("job status", job=job.id, kind=job.kind, old=job.status, new=action.status)
            if action.status in states.TERMINAL_JOB_STATUSES:
                self._job_finished(job, action.status, now)

    def _job_finished(self, job: JobRecord, outcome: str, now: datetime) -> None:
        self.observer.job_finished(job.kind, outcome, (now - job.created_at).total_seconds())

    def _run_step(self, job: JobRecord, impl: Step, step: StepRecord, clock: Clock) -> bool:
        """Run one claimed step and record its outcome; False when the lease was lost."""
        phase = "execute" if step.status == states.RUNNING else "compensate"
        # Re-read: outputs of earlier steps (and this one's, to compensate).
        job = self.store.get_job(job.id)
        outputs = {s.name: s.output for s in job.steps if s.output}
        lost = threading.Event()

        def report(fraction: float, message: str) -> None:
            if lost.is_set() or not self.store.update_step(
                job.id,
                step.index,
                owner=self.owner_id,
                now=clock(),
                progress=fraction,
                message=message,
            ):
                lost.set()
                raise LeaseLost(job.id, step.index)

        ctx = StepContext(job=job, step=step, store=self.store, phase=phase, outputs=outputs, _report=report)
        bound = {"job": job.id, "kind": job.kind, "step": step.name, "phase": phase}
        waiting: Waiting | None = None
        started = time.monotonic()

        def ran(outcome: str) -> None:
            self.observer.step_finished(job.kind, phase, outcome, time.monotonic() - started)

        with (
            structlog.contextvars.bound_contextvars(**bound),
            _LeaseKeeper(self, job.id, step.index, clock, lost),
        ):
            log.info("step started", attempt=step.attempt)
            try:
                result = self._with_retries(impl.execute if phase == "execute" else impl.compensate, ctx)
            except Waiting as exc:
                waiting = exc
            except LeaseLost:
                log.warning("step lease lost; leaving the step to its new owner")
                ran("lease-lost")
                return False
            except BaseException as exc:
                if self._stop.is_set() and is_retryable(exc):
                    # Shutting down mid-retry is not a failure: the lease expires
                    # and a runner (maybe this one, restarted) takes it up again.
                    log.info("stopping; step left to its lease")
                    ran("stopped")
                    return False
                if not isinstance(exc, Exception):
                    raise
                ran("failed")
                return self._record_failure(job, step, phase, exc, clock)
            if lost.is_set():
                ran("lease-lost")
                return False
            if waiting is None:
                ran("succeeded")
                return self._record_success(job, step, phase, result, clock)
        # Outside the keeper, which would otherwise renew the lease to its usual length.
        ran("waiting")
        self._record_waiting(job, step, waiting, clock)
        return False

    def _record_waiting(self, job: JobRecord, step: StepRecord, waiting: Waiting, clock: Clock) -> None:
        now = clock()
        if self.store.update_step(
            job.id, step.index, owner=self.owner_id, now=now, progress=waiting.progress, message=waiting.message
        ):
            self.store.renew_lease(job.id, step.index, owner=self.owner_id, lease_seconds=waiting.delay, now=now)
            log.debug("step waiting", job=job.id, step=step.name, delay=waiting.delay, message=waiting.message)

    def _with_retries(self, fn: Callable[[StepContext], Any], ctx: StepContext) -> Any:
        policy = self.retry_policy
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(policy.max_attempts) | tenacity.stop_when_event_set(self._stop),
            wait=tenacity.wait_exponential(
                multiplier=policy.initial_backoff,
                min=policy.initial_backoff,
                max=policy.max_backoff,
            ),
            retry=tenacity.retry_if_exception(is_retryable),
            sleep=self._stop.wait,  # wakes up early on stop()
            before_sleep=lambda state: log.warning(
                "step failed; retrying",
                try_number=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else "",
            ),
            reraise=True,
        )
        return retrying(fn, ctx)

    def _record_success(
        self, job: JobRecord, step: StepRecord, phase: str, result: Any, clock: Clock
    ) -> bool:
        if phase == "execute":
            if result is not None and not isinstance(result, dict):
                return self._record_failure(
                    job,
                    step,
                    phase,
                    InvalidInput(f"step {step.name!r} returned {type(result).__name__}, not dict"),
                    clock,
                )
            done = self.store.update_step(
                job.id,
                step.index,
                owner=self.owner_id,
                now=clock(),
                status=states.SUCCEEDED,
                progress=1.0,
                # The step's last progress message stays: it says what was done.
                error_code="",
                output=result or {},
            )
        else:
            done = self.store.update_step(
                job.id,
                step.index,
                owner=self.owner_id,
                now=clock(),
                status=states.COMPENSATED,
                progress=1.0,
                message="",
            )
        if done:
            log.info("step done")
        return done

    def _record_failure(
        self, job: JobRecord, step: StepRecord, phase: str, exc: Exception, clock: Clock
    ) -> bool:
        expected = isinstance(exc, SiteRecoveryError)
        code = exc.code if expected else "internal"
        message = str(exc) or type(exc).__name__
        # A domain error says enough; anything else is a bug and needs its traceback.
        log.warning("step failed", error_code=code, error=message, exc_info=None if expected else exc)
        if phase == "execute":
            # The next round sees the failed step and turns the job to compensating.
            return self.store.update_step(
                job.id,
                step.index,
                owner=self.owner_id,
                now=clock(),
                status=states.FAILED,
                message=message,
                error_code=code,
            )
        # A failed compensation ends the job as failed: a person has to look.
        # Only the lease holder decides that, so check the lease first.
        if not self.store.renew_lease(
            job.id,
            step.index,
            owner=self.owner_id,
            lease_seconds=self.lease_seconds,
            now=clock(),
        ):
            return False
        earlier = self.store.get_job(job.id)
        now = clock()
        if self.store.set_job_status(
            job.id,
            expected={states.COMPENSATING},
            new=states.FAILED,
            now=now,
            error_code=code,
            error_message="; ".join(
                m for m in (earlier.error_message, f"compensating {step.name!r} failed: {message}") if m
            ),
        ):
            self._job_finished(job, states.FAILED, now)
        self.store.update_step(
            job.id,
            step.index,
            owner=self.owner_id,
            now=clock(),
            status=states.FAILED,
            message=message,
            error_code=code,
        )
        return False  # the job is finished; nothing more to drive


class _LeaseKeeper:
    """Renews a step's lease in the background while the step runs."""

    def __init__(
        self, runner: JobRunner, job_id: str, index: int, clock: Clock, lost: threading.Event
    ) -> None:
        self._runner = runner
        self._job_id = job_id
        self._index = index
        self._clock = clock
        self._lost = lost
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self._runner.lease_seconds / 3
        while not self._done.wait(interval):
            try:
                renewed = self._runner.store.renew_lease(
                    self._job_id,
                    self._index,
                    owner=self._runner.owner_id,
                    lease_seconds=self._runner.lease_seconds,
                    now=self._clock(),
                )
            except Exception:  # the store is down; try again next interval
                log.warning("could not renew a step lease", job=self._job_id, exc_info=True)
                continue
            if not renewed:
                self._lost.set()
                return
