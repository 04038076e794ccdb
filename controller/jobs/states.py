"""Job and step statuses, the allowed transitions, and what a job needs next.

`TRANSITIONS` is the one table of allowed status changes, for jobs and for
steps; the store checks every write against it and `check_transition` is the
only way to ask. `next_action` reads a job with its steps and says what has to
happen next (start it, claim a step, settle its status, wait, or nothing). The
store uses it to decide whether a claim is allowed and which jobs are runnable;
the runner uses it to decide what to do. Both read the same rules, so a runner
and the store cannot disagree about which step comes next.

A job's life:

    pending ──► running ──► succeeded
       │           │
       │           ├──► compensating ──► compensated
       │           │          │
       │           └──────────┴──────► failed
       └──► cancelled

`running -> compensating` happens when a step fails for good, or when someone
cancels a running job. `running -> failed` is for a job that cannot even be
compensated (for instance its kind no longer matches its steps). `compensating
-> failed` means a compensation failed: the site may need a person.

A step's life: `pending -> running -> succeeded | failed`; a succeeded step may
later be `compensating -> compensated | failed`. A step that was running when
its job switched to compensating, and whose lease ran out, is compensated too
(`running -> compensating`): it may have done part of its work. `running ->
running` and `compensating -> compensating` are re-claims of an expired lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from siterecovery.common.errors import InvalidInput

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
COMPENSATING = "compensating"
COMPENSATED = "compensated"
CANCELLED = "cancelled"

JOB_STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, COMPENSATING, COMPENSATED, CANCELLED)
STEP_STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, COMPENSATING, COMPENSATED)

# Jobs in these statuses still have work to do; the runner looks only at them.
ACTIVE_JOB_STATUSES = frozenset({PENDING, RUNNING, COMPENSATING})
TERMINAL_JOB_STATUSES = frozenset(JOB_STATUSES) - ACTIVE_JOB_STATUSES
# A step in one of these statuses is held by a lease; any other status releases it.
LEASED_STEP_STATUSES = frozenset({RUNNING, COMPENSATING})

Entity = Literal["job", "step"]

# The one table: for each entity, status -> statuses it may change to.
TRANSITIONS: dict[Entity, dict[str, frozenset[str]]] = {
    "job": {
        PENDING: frozenset({RUNNING, CANCELLED}),
        RUNNING: frozenset({SUCCEEDED, COMPENSATING, FAILED}),
        COMPENSATING: frozenset({COMPENSATED, FAILED}),
        SUCCEEDED: frozenset(),
        FAILED: frozenset(),
        COMPENSATED: frozenset(),
        CANCELLED: frozenset(),
    },
    "step": {
        PENDING: frozenset({RUNNING}),
        RUNNING: frozenset({RUNNING, SUCCEEDED, FAILED, COMPENSATING}),
        SUCCEEDED: frozenset({COMPENSATING}),
        COMPENSATING: frozenset({COMPENSATING, COMPENSATED, FAILED}),
        COMPENSATED: frozenset(),
        FAILED: frozenset(),
    },
}
JOB_TRANSITIONS = TRANSITIONS["job"]
STEP_TRANSITIONS = TRANSITIONS["step"]


def is_allowed(old: str, new: str, *, entity: Entity = "job") -> bool:
    return new in TRANSITIONS[entity].get(old, frozenset())


def check_transition(old: str, new: str, *, entity: Entity = "job") -> None:
    """Raise InvalidInput unless `old -> new` is in the table for `entity`."""
    table = TRANSITIONS[entity]
    if new not in table:
        raise InvalidInput(
            f"{new!r} is not a {entity} status",
            hint=f"use one of: {', '.join(table)}",
            code=f"unknown-{entity}-status",
        )
    if not is_allowed(old, new, entity=entity):
        allowed = ", ".join(sorted(table.get(old, ()))) or "nothing (it is final)"
        raise InvalidInput(
            f"a {entity} cannot go from {old!r} to {new!r}",
            hint=f"from {old!r} it may go to: {allowed}",
            code=f"bad-{entity}-transition",
        )


def check_status(status: str, *, entity: Entity = "job") -> None:
    if status not in TRANSITIONS[entity]:
        raise InvalidInput(
            f"{status!r} is not a {entity} status",
            hint=f"use one of: {', '.join(TRANSITIONS[entity])}",
            code=f"unknown-{entity}-status",
        )


# --- what a job needs next ---------------------------------------------------


class _StepView(Protocol):
    index: int
    name: str
    status: str
    message: str
    error_code: str
    lease_expires_at: datetime | None


class _JobView(Protocol):
    status: str

    @property
    def steps(self) -> Sequence[_StepView]: ...


@dataclass(frozen=True)
class Action:
    """What a job needs next.

    kind:
      "settle" - change the job's status to `status` (a compare-and-set);
      "claim"  - claim step `index` (to execute it when the job is running,
                 to compensate it when the job is compensating);
      "wait"   - a step is held by a live lease; someone else is on it;
      "none"   - the job is finished.
    """

    kind: Literal["settle", "claim", "wait", "none"]
    status: str = ""
    index: int = -1
    error_code: str = ""
    error_message: str = ""


WAIT = Action("wait")
NONE = Action("none")


def lease_expired(step: _StepView, now: datetime) -> bool:
    return step.lease_expires_at is None or step.lease_expires_at <= now


def next_action(job: _JobView, now: datetime) -> Action:
    """Decide what `job` needs next, from its status and its steps' statuses."""
    if job.status == PENDING:
        return Action("settle", status=RUNNING)
    if job.status == RUNNING:
        return _next_in_execution(job.steps, now)
    if job.status == COMPENSATING:
        return _next_in_compensation(job.steps, now)
    return NONE


def _next_in_execution(steps: Sequence[_StepView], now: datetime) -> Action:
    # Steps run strictly in order: the first one not yet succeeded is the one.
    for step in steps:
        if step.status == SUCCEEDED:
            continue
        if step.status == PENDING:
            return Action("claim", index=step.index)
        if step.status == RUNNING:
            return Action("claim", index=step.index) if lease_expired(step, now) else WAIT
        if step.status == FAILED:
            return Action(
                "settle",
                status=COMPENSATING,
                error_code=step.error_code or "step-failed",
                error_message=f"step {step.name!r} failed: {step.message}",
            )
        # A compensating/compensated step in a running job is not a state the
        # engine produces; refuse to guess and let a person look.
        return Action(
            "settle",
            status=FAILED,
            error_code="inconsistent-job",
            error_message=f"step {step.name!r} is {step.status} while the job is running",
        )
    return Action("settle", status=SUCCEEDED)


def _next_in_compensation(steps: Sequence[_StepView], now: datetime) -> Action:
    # A running step with a live lease may still succeed; it must be compensated
    # after it finishes, so nothing is compensated before it does.
    for step in steps:
        if step.status == RUNNING and not lease_expired(step, now):
            return WAIT
    # Undo in reverse: the highest step that did (or may have done) work.
    for step in reversed(steps):
        if step.status == SUCCEEDED:
            return Action("claim", index=step.index)
        if step.status in LEASED_STEP_STATUSES:
            return Action("claim", index=step.index) if lease_expired(step, now) else WAIT
    return Action("settle", status=COMPENSATED)


def claim_target(job_status: str) -> str:
    """The status a claimed step takes: running while the job runs, else compensating."""
    return RUNNING if job_status == RUNNING else COMPENSATING
