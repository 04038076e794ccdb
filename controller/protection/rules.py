"""A failback rule's verdict, so one set of rules serves both the refusal and the checklist.

The failback rules (`site_steps.onprem_failback_rules`,
`vsphere_rules.vsphere_failback_rules`) return one `Verdict` per rule, in the
order the rules depend on each other. A reprotect raises the first failure
(`raise_first`), exactly the error it always raised; `srctl doctor --machine`
shows every verdict, with the fix for each failure. A rule whose premise
failed or is not chosen yet (no master target) is `skipped` with the reason,
never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from siterecovery.common import errors

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Verdict:
    rule: str
    status: Status
    message: str
    error: errors.SiteRecoveryError | None = None

    @property
    def hint(self) -> str:
        return self.error.hint if self.error is not None else ""

    @property
    def code(self) -> str:
        return self.error.code if self.error is not None else ""


def passed(rule: str, message: str) -> Verdict:
    return Verdict(rule, "ok", message)


def skipped(rule: str, why: str) -> Verdict:
    return Verdict(rule, "skipped", why)


def check(rule: str, body: Callable[[], str]) -> Verdict:
    """Run one rule: `body` returns what it found, or raises PreconditionFailed naming the fix."""
    try:
        return passed(rule, body())
    except errors.PreconditionFailed as exc:
        return Verdict(rule, "failed", exc.message, exc)


def raise_first(verdicts: Iterable[Verdict]) -> None:
    for verdict in verdicts:
        if verdict.status == "failed" and verdict.error is not None:
            raise verdict.error
