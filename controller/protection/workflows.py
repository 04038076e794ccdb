"""The protection workflows as job kinds: which steps each runs, for one machine or a recovery plan.

A workflow job's parameters:

    {"workflow": "failover", "plan": "" or the plan's name,
     "options": {"point": "latest-app-consistent", ...},
     "groups": [{"items": [{"id": ITEM, "label": "app01"}],
                 "before": [ACTION, ...], "after": [ACTION, ...]}]}

A single machine's job is one group of one machine with no actions. The steps
are planned from these parameters (`JobKind(plan=...)`): for every group its
`before` actions, then each machine's steps (named "<label>: <step>"), then its
`after` actions. Machines of a group run one after the other. ACTION is
{"kind": "script", "script": NAME, "timeout": SECONDS} (a file in the server's
`plan_scripts_dir`, run with SR_PLAN, SR_JOB, SR_DIRECTION, SR_GROUP set; it
must be idempotent, as a step may run twice) or {"kind": "manual", "text": ...}
(the job waits until `srctl jobs resume JOB`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from typing import Any

from siterecovery.common import errors
from siterecovery.controller.jobs.engine import JobKind, Step, StepContext, Waiting
from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.protection.site_steps import (
    ApplyNetwork,
    CreateCloudVm,
    DeleteCloudVm,
    DeleteTestVm,
    FindAgent,
    PowerOnOnprem,
    PreflightOnprem,
    PrepareOnpremTarget,
    RecoverOnprem,
    RecoverToCloud,
    ShutdownCloudVm,
    ShutdownSource,
)
from siterecovery.controller.protection.steps import (
    BOTH,
    FAILBACK,
    FORWARD,
    Claim,
    CreatePairs,
    FinalPoint,
    Finish,
    Forget,
    PausePairs,
    RemovePairs,
    Sync,
)

# Each workflow's steps for one machine, in order: (class, extra keyword arguments).
RECIPES: dict[str, list[tuple[type, dict]]] = {
    "protect": [(Claim, {}), (CreatePairs, {"direction": FORWARD}), (Sync, {"direction": FORWARD}), (Finish, {})],
    "test-failover": [(Claim, {}), (RecoverToCloud, {"test": True}), (CreateCloudVm, {"test": True}), (Finish, {})],
    "test-cleanup": [(Claim, {}), (DeleteTestVm, {}), (Finish, {})],
    "failover": [
        (Claim, {}),
        (FinalPoint, {"direction": FORWARD}),
        (ShutdownSource, {}),
        (PausePairs, {"direction": FORWARD}),
        (RecoverToCloud, {}),
        (CreateCloudVm, {}),
        (RemovePairs, {"direction": FORWARD}),
        (Finish, {}),
    ],
    "reprotect-to-onprem": [
        (Claim, {}),
        (PreflightOnprem, {}),
        (FindAgent, {"side": "cloud"}),
        (PrepareOnpremTarget, {}),
        (CreatePairs, {"direction": FAILBACK}),
        (Sync, {"direction": FAILBACK}),
        (Finish, {}),
    ],
    "failback": [
        (Claim, {}),
        (FinalPoint, {"direction": FAILBACK}),
        (ShutdownCloudVm, {}),
        (PausePairs, {"direction": FAILBACK}),
        (RecoverOnprem, {}),
        (RemovePairs, {"direction": FAILBACK}),
        (PowerOnOnprem, {}),
        (FindAgent, {"side": "onprem"}),
        (ApplyNetwork, {}),
        (Finish, {}),
    ],
    "reprotect-to-cloud": [
        (Claim, {}),
        (FindAgent, {"side": "onprem"}),
        (CreatePairs, {"direction": FORWARD}),
        (Sync, {"direction": FORWARD}),
        (Finish, {}),
    ],
    "delete-cloud-vm": [(Claim, {}), (DeleteCloudVm, {}), (Finish, {})],
    "unprotect": [
        (Claim, {}),
        (RemovePairs, {"direction": BOTH}),
        (Forget, {}),
    ],
}
WORKFLOWS = tuple(RECIPES)


class ScriptAction(Step):
    """Run a recovery plan's script on the configuration server; a non-zero exit fails the step."""

    def __init__(self, env: Environment, name: str, action: Mapping[str, Any], params: Mapping[str, Any], group: int):
        self.env = env
        self.name = name
        self.script = str(action.get("script", ""))
        self.timeout = float(action.get("timeout", 600))
        self.params = params
        self.group = group

    def execute(self, ctx: StepContext) -> dict:
        path = (self.env.scripts_dir / self.script).resolve()
        if not path.is_relative_to(self.env.scripts_dir.resolve()) or not path.is_file() or not os.access(path, os.X_OK):
            raise errors.PreconditionFailed(
                f"script {self.script!r} is not an executable file in {self.env.scripts_dir}",
                hint="put it there (chmod +x) and resume the plan", code="plan-script-missing",
            )
        environment = {
            **os.environ,
            "SR_PLAN": str(self.params.get("plan", "")),
            "SR_JOB": ctx.job.id,
            "SR_DIRECTION": str(self.params.get("options", {}).get("direction", "")),
            "SR_GROUP": str(self.group + 1),
        }
        try:
            done = subprocess.run(
                [str(path)], env=environment, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise errors.PreconditionFailed(
                f"script {self.script} did not finish in {self.timeout:.0f} s", code="plan-script-timeout"
            ) from None
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        if done.returncode != 0:
            raise errors.PreconditionFailed(
                f"script {self.script} exited with {done.returncode}: {' / '.join(tail)}",
                hint="fix what it reports, then run the plan again", code="plan-script-failed",
            )
        ctx.progress(1.0, " / ".join(tail) or f"{self.script} done")
        return {"exit": 0}

    def compensate(self, ctx: StepContext) -> None:
        """A script's effect is its own business; there is nothing generic to undo."""


class ManualAction(Step):
    """Wait until an operator confirms a manual action (`srctl jobs resume JOB`)."""

    def __init__(self, name: str, action: Mapping[str, Any]) -> None:
        self.name = name
        self.text = str(action.get("text", ""))

    def execute(self, ctx: StepContext) -> dict:
        if f"resume:{self.name}" in ctx.store.job_signals(ctx.job.id) or "resume" in ctx.store.job_signals(ctx.job.id):
            return {"confirmed": True}
        raise Waiting(f"manual action: {self.text} — then run `srctl jobs resume {ctx.job.id}`", delay=2.0)

    def compensate(self, ctx: StepContext) -> None:
        """Nothing to undo."""


def _actions(env: Environment, params: Mapping[str, Any], group: int, when: str) -> list[Step]:
    steps: list[Step] = []
    for index, action in enumerate(params["groups"][group].get(when, [])):
        name = f"group {group + 1} {when} {index + 1}: {action.get('kind', '?')}"
        if action.get("kind") == "script":
            steps.append(ScriptAction(env, name, action, params, group))
        elif action.get("kind") == "manual":
            steps.append(ManualAction(name, action))
        else:
            raise errors.InvalidInput(f"unknown plan action {action.get('kind')!r}", code="plan-action-invalid")
    return steps


def plan_steps(env: Environment, params: Mapping[str, Any]) -> list[Step]:
    workflow = params["workflow"]
    recipe = RECIPES[workflow]
    options = dict(params.get("options", {}))
    steps: list[Step] = []
    for index, group in enumerate(params["groups"]):
        steps += _actions(env, params, index, "before")
        for item in group["items"]:
            for cls, extra in recipe:
                steps.append(cls(env, workflow, item["id"], item["label"], options, **extra))
        steps += _actions(env, params, index, "after")
    return steps


def kinds(env: Environment) -> list[JobKind]:
    return [JobKind(workflow, plan=lambda params, env=env: plan_steps(env, params)) for workflow in WORKFLOWS]
