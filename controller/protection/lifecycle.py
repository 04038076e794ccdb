"""Where a protected machine stands, and the one table of how it may move.

The failback cycle of DESIGN §1, as states of a protected machine:

    protecting ──► protected ──► failing-over ──► failed-over
        (to the cloud)   │  ▲                         │
                         │  └─ test-cleanup ◄─┐       ▼ reprotect (to on-premises)
                         └─► test-failing-over ─► test-failed-over
                                                  reprotecting-to-onprem
                                                        │
    protected ◄── reprotecting-to-cloud ◄── failed-back ◄── failing-back ◄── failback-protected

    unprotect: from any state at rest (protected, failed-over, failback-protected,
    failed-back) through unprotecting to no protected machine at all.

Each workflow job moves a machine from one of its `start` states into its
`busy` state with a compare-and-set on the machine's version (so two jobs, or
two configuration servers, cannot both start on one machine), and its last
step moves it to `done`; compensating the first step moves it back to the
state it started from. `direction` is where the machine's data flows while it
is in that state: the recovery plan's `--direction` is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from siterecovery.common import errors

PROTECTING = "protecting"
PROTECTED = "protected"
TEST_FAILING_OVER = "test-failing-over"
TEST_FAILED_OVER = "test-failed-over"
TEST_CLEANING_UP = "test-cleaning-up"
FAILING_OVER = "failing-over"
FAILED_OVER = "failed-over"
REPROTECTING_TO_ONPREM = "reprotecting-to-onprem"
FAILBACK_PROTECTED = "failback-protected"
FAILING_BACK = "failing-back"
FAILED_BACK = "failed-back"
REPROTECTING_TO_CLOUD = "reprotecting-to-cloud"
DELETING_CLOUD_VM = "deleting-cloud-vm"
UNPROTECTING = "unprotecting"
UNPROTECTED = "unprotected"  # the done state of `unprotect`: the record is gone when it is reached

STATES = (
    PROTECTING,
    PROTECTED,
    TEST_FAILING_OVER,
    TEST_FAILED_OVER,
    TEST_CLEANING_UP,
    FAILING_OVER,
    FAILED_OVER,
    REPROTECTING_TO_ONPREM,
    FAILBACK_PROTECTED,
    FAILING_BACK,
    FAILED_BACK,
    REPROTECTING_TO_CLOUD,
    DELETING_CLOUD_VM,
    UNPROTECTING,
)

TO_CLOUD = "to-cloud"
TO_ONPREM = "to-onprem"


@dataclass(frozen=True)
class Move:
    """A workflow's effect on a machine: from one of `start`, through `busy`, to `done`."""

    workflow: str
    start: frozenset[str]
    busy: str
    done: str
    hint: str  # what to do when the machine is in none of `start`


MOVES: dict[str, Move] = {
    move.workflow: move
    for move in (
        Move("test-failover", frozenset({PROTECTED}), TEST_FAILING_OVER, TEST_FAILED_OVER,
             "a test failover needs a protected machine without a test VM (clean up the last test first)"),
        Move("test-cleanup", frozenset({TEST_FAILED_OVER}), TEST_CLEANING_UP, PROTECTED,
             "there is no test failover to clean up"),
        Move("failover", frozenset({PROTECTED}), FAILING_OVER, FAILED_OVER,
             "fail over a protected machine (clean up a test failover first)"),
        Move("reprotect-to-onprem", frozenset({FAILED_OVER}), REPROTECTING_TO_ONPREM, FAILBACK_PROTECTED,
             "reprotect a machine that runs in the cloud after a failover"),
        Move("failback", frozenset({FAILBACK_PROTECTED}), FAILING_BACK, FAILED_BACK,
             "reprotect the machine to on-premises first (`srctl machine reprotect`), then fail back"),
        Move("reprotect-to-cloud", frozenset({FAILED_BACK}), REPROTECTING_TO_CLOUD, PROTECTED,
             "reprotect a machine that was failed back to on-premises"),
        Move("delete-cloud-vm", frozenset({PROTECTED}), DELETING_CLOUD_VM, PROTECTED,
             "the cloud VM is deleted once the machine is protected to the cloud again"),
        Move("protect", frozenset({PROTECTING}), PROTECTING, PROTECTED, "the machine is protected already"),
        Move("unprotect", frozenset({PROTECTED, FAILED_OVER, FAILBACK_PROTECTED, FAILED_BACK}), UNPROTECTING,
             UNPROTECTED, "wait for the machine's job to end (`srctl jobs list`), clean up a test failover first"),
    )
}

# Where data flows while a machine is at rest in a state (failover direction checks).
DIRECTION_OF = {PROTECTED: TO_CLOUD, FAILBACK_PROTECTED: TO_ONPREM}
# The failover workflow for each plan direction.
FAILOVER_FOR_DIRECTION = {TO_CLOUD: "failover", TO_ONPREM: "failback"}


def move(workflow: str) -> Move:
    try:
        return MOVES[workflow]
    except KeyError:
        raise errors.InvalidInput(f"{workflow!r} is not a workflow", code="workflow-unknown") from None


def check_can_start(workflow: str, name: str, state: str) -> Move:
    """The move, or PreconditionFailed saying where the machine stands and what to do."""
    wanted = move(workflow)
    if state not in wanted.start:
        raise errors.PreconditionFailed(
            f"{name} is {state}; {workflow} needs it {' or '.join(sorted(wanted.start))}",
            hint=wanted.hint,
            code="wrong-state",
        )
    return wanted


def check_direction(direction: str, name: str, state: str) -> str:
    """The failover workflow for `direction`, or PreconditionFailed when the machine replicates the other way."""
    if direction not in FAILOVER_FOR_DIRECTION:
        raise errors.InvalidInput(
            f"{direction!r} is not a direction", hint=f"use {TO_CLOUD} or {TO_ONPREM}", code="direction-invalid"
        )
    flowing = DIRECTION_OF.get(state)
    if flowing != direction:
        now = f"replicates {flowing}" if flowing else f"is {state} and does not replicate"
        raise errors.PreconditionFailed(
            f"{name} {now}; a failover {direction} is not possible",
            hint=(
                "reprotect it to on-premises first (`srctl machine reprotect`)"
                if direction == TO_ONPREM
                else "a failover to the cloud needs a machine protected to the cloud"
            ),
            code="wrong-direction",
        )
    return FAILOVER_FOR_DIRECTION[direction]
