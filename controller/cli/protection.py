"""srctl group / machine / plan: protection groups, protected machines, recovery plans, and their workflows.

Every command that starts a job follows it like `srctl jobs watch` (a progress
bar per step; the exit code says how it ended) unless given --no-wait.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from siterecovery.common import errors
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller.cli import completion, output
from siterecovery.controller.cli.completion import GroupArg, PlanArg, ProtectedMachineArg
from siterecovery.controller.cli.follow import WaitOption, follow
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import protect_call

group_app = typer.Typer(help="Protection groups (each with its <name>_Failback twin).", no_args_is_help=True)
machine_app = typer.Typer(
    help="Protected machines: protect, test failover, failover, reprotect, failback, and where each stands. "
    "(`srctl machines list` lists the machines whose agents registered.)",
    no_args_is_help=True,
)
plan_app = typer.Typer(help="Recovery plans: ordered groups of machines, with scripts and manual pauses.",
                       no_args_is_help=True)

PointOption = Annotated[
    str,
    typer.Option(
        "--recovery-point", "-p",
        help="latest, latest-app-consistent, latest-crash-consistent, latest-multi-vm-consistent, or a point id",
    ),
]


# -- groups -----------------------------------------------------------------------------


@group_app.command("create")
def group_create(
    name: str,
    rpo_threshold: Annotated[int, typer.Option(help="seconds; above it a machine warns (default 900)")] = 0,
    crash_interval: Annotated[int, typer.Option(help="seconds between crash-consistent points (default 300)")] = 0,
    app_interval: Annotated[int, typer.Option(help="seconds between app-consistent points (default 3600)")] = 0,
    retention: Annotated[int, typer.Option(help="seconds of recovery points kept (default 86400)")] = 0,
    output_format: OutputOption = Format.table,
) -> None:
    """Create a protection group and its failback twin NAME_Failback."""
    policy = rpb.RecoveryPolicy(
        rpo_threshold_seconds=rpo_threshold, crash_consistent_interval_seconds=crash_interval,
        app_consistent_interval_seconds=app_interval, retention_window_seconds=retention,
    )
    group = protect_call("CreateProtectionGroup", ppb.CreateProtectionGroupRequest(name=name, policy=policy))
    if output_format is not Format.table:
        output.emit(output_format, _group_json(group))
        return
    output.console.print(f"protection group {group.name} created, with its failback twin {group.name}_Failback")


@group_app.command("list")
def group_list(output_format: OutputOption = Format.table) -> None:
    """List protection groups."""
    groups = protect_call("ListProtectionGroups", ppb.ListProtectionGroupsRequest()).groups
    if output_format is not Format.table:
        output.emit(output_format, [_group_json(g) for g in groups])
        return
    output.print_table(
        "Protection groups",
        ["NAME", "TWIN OF", "MACHINES", "RPO ALERT", "CRASH", "APP", "RETENTION"],
        [[g.name, g.failback_of, g.machines, f"{g.policy.rpo_threshold_seconds}s",
          f"{g.policy.crash_consistent_interval_seconds}s", f"{g.policy.app_consistent_interval_seconds}s",
          f"{g.policy.retention_window_seconds}s"] for g in groups],
    )


@group_app.command("remove")
def group_remove(name: GroupArg, output_format: OutputOption = Format.table) -> None:
    """Remove a protection group and its twin (refused while they hold machines)."""
    protect_call("RemoveProtectionGroup", ppb.RemoveProtectionGroupRequest(name=name))
    output.emit(output_format, {"removed": [name, f"{name}_Failback"]},
                lambda: output.console.print(f"protection group {name} and {name}_Failback removed"))


def _group_json(g: ppb.ProtectionGroup) -> dict:
    return {
        "id": g.id, "name": g.name, "failback_of": g.failback_of, "machines": g.machines,
        "policy": {
            "rpo_threshold_seconds": g.policy.rpo_threshold_seconds,
            "crash_consistent_interval_seconds": g.policy.crash_consistent_interval_seconds,
            "app_consistent_interval_seconds": g.policy.app_consistent_interval_seconds,
            "retention_window_seconds": g.policy.retention_window_seconds,
        },
    }


# -- machines ---------------------------------------------------------------------------


@machine_app.command("protect")
def machine_protect(
    machine: Annotated[str, typer.Argument(help="a machine whose agent registered (see `srctl machines list`)",
                                           autocompletion=completion.machines)],
    group: Annotated[str, typer.Option("--group", "-g", help="the protection group", autocompletion=completion.groups)],
    process_server: Annotated[str, typer.Option(help="id or host name; empty when there is one")] = "",
    master_target: Annotated[str, typer.Option(help="the cloud side's replica target")] = "",
    datastore: Annotated[str, typer.Option(help="a datastore of that master target")] = "",
    azure_site: Annotated[str, typer.Option(
        help="protect to Azure: the site whose storage account holds the replicas (no master target then)",
        autocompletion=completion.azure_sites)] = "",
    azure_vm_size: Annotated[str, typer.Option(help="size of the VM a failover to Azure creates")] = "",
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Protect a machine to the cloud: create its pairs and wait for the initial sync."""
    job = protect_call("ProtectMachine", ppb.ProtectMachineRequest(
        machine=machine, group=group, process_server=process_server, master_target=master_target, datastore=datastore,
        azure_site=azure_site, azure_vm_size=azure_vm_size,
    ))
    follow(job, wait, output_format)


def _workflow(machine: str, workflow: str, wait: bool, output_format: Format, **fields) -> None:
    job = protect_call("StartWorkflow", ppb.StartWorkflowRequest(machine=machine, workflow=workflow, **fields))
    follow(job, wait, output_format)


@machine_app.command("test-failover")
def machine_test_failover(machine: ProtectedMachineArg, recovery_point: PointOption = "latest", wait: WaitOption = True,
                          output_format: OutputOption = Format.table) -> None:
    """Start a test VM in the cloud's isolated network from a point; replication goes on."""
    _workflow(machine, "test-failover", wait, output_format, recovery_point=recovery_point)


@machine_app.command("test-cleanup")
def machine_test_cleanup(machine: ProtectedMachineArg, wait: WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Delete the test VM of the last test failover."""
    _workflow(machine, "test-cleanup", wait, output_format)


@machine_app.command("failover")
def machine_failover(machine: ProtectedMachineArg, recovery_point: PointOption = "latest", wait: WaitOption = True,
                     output_format: OutputOption = Format.table) -> None:
    """Fail a protected machine over to the cloud (unplanned: the source is shut down if it answers)."""
    _workflow(machine, "failover", wait, output_format, recovery_point=recovery_point)


@machine_app.command("reprotect")
def machine_reprotect(
    machine: ProtectedMachineArg,
    process_server: Annotated[str, typer.Option(help="to on-premises: the process server in the cloud")] = "",
    master_target: Annotated[str, typer.Option(help="to on-premises: the on-premises master target")] = "",
    datastore: Annotated[str, typer.Option(help="a datastore of that master target")] = "",
    target: Annotated[str, typer.Option(help="original (the VM it came from), alternate or new")] = "original",
    retention_dir: Annotated[str, typer.Option(
        help="to on-premises: refuse unless the master target keeps its journals here (each master target has "
        "one retention directory, its retention_dir setting; the ASR-style option only checks it)")] = "",
    vcenter: Annotated[str, typer.Option(help="the vCenter / ESXi endpoint (vSphere provider)")] = "",
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Replicate a failed-over machine back to on-premises (or a failed-back one to the cloud again)."""
    _workflow(machine, "reprotect", wait, output_format, process_server=process_server, master_target=master_target,
              datastore=datastore, target=target, retention_dir=retention_dir, vcenter=vcenter)


@machine_app.command("failback")
def machine_failback(machine: ProtectedMachineArg, recovery_point: PointOption = "latest", wait: WaitOption = True,
                     output_format: OutputOption = Format.table) -> None:
    """Fail a reprotected machine back to on-premises; its cloud VM is shut down."""
    _workflow(machine, "failback", wait, output_format, recovery_point=recovery_point)


@machine_app.command("delete-cloud-vm")
def machine_delete_cloud_vm(machine: ProtectedMachineArg, wait: WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Delete the cloud VM a failback left behind (after the machine is protected to the cloud again)."""
    _workflow(machine, "delete-cloud-vm", wait, output_format)


@machine_app.command("unprotect")
def machine_unprotect(machine: ProtectedMachineArg, wait: WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Stop protecting a machine: its pairs end and it leaves its group; replicas, journals and any cloud VM stay."""
    _workflow(machine, "unprotect", wait, output_format)


@machine_app.command("list")
def machine_list(output_format: OutputOption = Format.table) -> None:
    """List protected machines: state, direction, group."""
    machines = protect_call("ListProtectedMachines", ppb.ListProtectedMachinesRequest()).machines
    if output_format is not Format.table:
        output.emit(output_format, [_machine_json(m) for m in machines])
        return
    output.print_table(
        "Protected machines",
        ["NAME", "STATE", "DIRECTION", "GROUP", "CLOUD VM", "LAST JOB"],
        [[m.name, m.state, m.direction or "-", m.group, json.loads(m.details_json).get("cloud", {}).get("vm", "") or "-",
          m.job_id or "-"] for m in machines],
    )


@machine_app.command("failback-status")
def machine_failback_status(machine: ProtectedMachineArg, output_format: OutputOption = Format.table) -> None:
    """Where a machine stands in the failback cycle, and what each workflow did."""
    m = protect_call("GetProtectedMachine", ppb.GetProtectedMachineRequest(machine=machine))
    if output_format is not Format.table:
        output.emit(output_format, _machine_json(m))
        return
    details = json.loads(m.details_json)
    onprem, cloud = details.get("onprem", {}), details.get("cloud", {})
    output.console.print(f"[bold]{m.name}[/bold]  {m.state}  direction {m.direction or '-'}  group {m.group}")
    output.console.print(f"  on-premises VM: {_where(onprem.get('vm'), onprem.get('provider'))}   "
                         f"cloud VM: {_where(cloud.get('vm'), cloud.get('provider'), cloud.get('site'))}   "
                         f"test VM: {details.get('test', {}).get('vm') or '-'}", highlight=False)
    output.console.print(f"  next: {_next_step(m.state)}", highlight=False)
    if m.pairs:
        output.print_table("Pairs", ["DISK", "STATE", "SYNC", "RPO", "TARGET"], [
            [p.disk_name, output.enum_label(rpb.PairState.Name(p.state), "PAIR_STATE_"), f"{p.sync_progress:.0%}",
             f"{p.rpo_seconds:.1f}s" if p.rpo_known else "?", p.target_path] for p in m.pairs
        ])
    history = details.get("history", [])
    if history:
        output.print_table("History", ["WORKFLOW", "JOB", "SECONDS", "BYTES MOVED", "POINT", "AT"], [
            [h["workflow"], h["job"], f"{h['seconds']:.1f}", output.human_bytes(int(h.get("bytes_moved", 0))),
             h.get("point", ""), h["at"]] for h in history
        ])


NEXT = {
    "protecting": "wait for the initial sync (srctl jobs watch)",
    "protected": "test-failover to rehearse, or failover in a disaster",
    "test-failed-over": "check the test VM, then srctl machine test-cleanup",
    "failed-over": "srctl machine reprotect (to on-premises) when the site is back",
    "failback-protected": "srctl plan failover PLAN --direction to-onprem (or srctl machine failback)",
    "failed-back": "srctl machine reprotect (to the cloud again)",
}


def _where(vm: str | None, provider: str | None, site: str | None = None) -> str:
    """`app01 (azure dr-west)`: the VM and where it lives, as far as it is known."""
    if not vm:
        return "-"
    where = " ".join(part for part in (provider, site) if part)
    return f"{vm} ({where})" if where else vm


def _next_step(state: str) -> str:
    return NEXT.get(state, "a job is working on it (srctl jobs list)")


def _machine_json(m: ppb.ProtectedMachine) -> dict:
    return {
        "id": m.id, "name": m.name, "state": m.state, "direction": m.direction, "group": m.group,
        "job": m.job_id, "details": json.loads(m.details_json or "{}"),
        "pairs": [{"pair_id": p.pair_id, "disk": p.disk_name, "state": rpb.PairState.Name(p.state),
                   "sync_progress": p.sync_progress, "target_path": p.target_path} for p in m.pairs],
    }


# -- plans ------------------------------------------------------------------------------


def _positioned(values: list[str] | None, what: str) -> list[tuple[int, str]]:
    parsed = []
    for value in values or []:
        index, sep, text = value.partition(":")
        if not sep or not index.isdigit() or not text:
            raise errors.InvalidInput(f"{what} {value!r} is not GROUP:TEXT", hint=f"e.g. --{what} 2:check-dns.sh",
                                      code="plan-action-invalid")
        parsed.append((int(index), text))
    return parsed


@plan_app.command("create")
def plan_create(
    name: str,
    group: Annotated[list[str], typer.Option("--group", help="machines of one group, comma-separated; repeat in boot order")],
    script_before: Annotated[list[str] | None, typer.Option(help="GROUP:SCRIPT run before the group")] = None,
    script_after: Annotated[list[str] | None, typer.Option(help="GROUP:SCRIPT run after the group")] = None,
    pause_before: Annotated[list[str] | None, typer.Option(help="GROUP:TEXT manual action before the group")] = None,
    pause_after: Annotated[list[str] | None, typer.Option(help="GROUP:TEXT manual action after the group")] = None,
    replace: Annotated[bool, typer.Option(help="replace the plan of that name")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """Create (or --replace) a recovery plan; each machine's protection group and its twin join it."""
    groups = [ppb.PlanGroup(machines=[m.strip() for m in g.split(",") if m.strip()]) for g in group]
    for what, values, field, kind in (
        ("script-before", script_before, "before", "script"), ("script-after", script_after, "after", "script"),
        ("pause-before", pause_before, "before", "manual"), ("pause-after", pause_after, "after", "manual"),
    ):
        for index, text in _positioned(values, what):
            if not 1 <= index <= len(groups):
                raise errors.InvalidInput(f"--{what} names group {index}; the plan has {len(groups)}",
                                          code="plan-action-invalid")
            action = ppb.PlanAction(kind=kind, script=text) if kind == "script" else ppb.PlanAction(kind=kind, text=text)
            getattr(groups[index - 1], field).append(action)
    version = 0
    if replace:
        version = next((p.version for p in protect_call("ListRecoveryPlans", ppb.ListRecoveryPlansRequest()).plans
                        if p.name == name), 0)
    plan = protect_call("SaveRecoveryPlan", ppb.SaveRecoveryPlanRequest(
        plan=ppb.RecoveryPlan(name=name, groups=groups), expected_version=version))
    _print_plan(plan, output_format)


@plan_app.command("list")
def plan_list(output_format: OutputOption = Format.table) -> None:
    """List recovery plans."""
    plans = protect_call("ListRecoveryPlans", ppb.ListRecoveryPlansRequest()).plans
    if output_format is not Format.table:
        output.emit(output_format, [_plan_json(p) for p in plans])
        return
    output.print_table("Recovery plans", ["NAME", "GROUPS", "MACHINES", "PROTECTION GROUPS"], [
        [p.name, len(p.groups), sum(len(g.machines) for g in p.groups), ", ".join(p.protection_groups)] for p in plans
    ])


@plan_app.command("show")
def plan_show(name: PlanArg, output_format: OutputOption = Format.table) -> None:
    """Show a plan's groups, actions and protection groups."""
    plans = [p for p in protect_call("ListRecoveryPlans", ppb.ListRecoveryPlansRequest()).plans if name in (p.name, p.id)]
    if not plans:
        raise errors.NotFound(f"no recovery plan called {name!r}", hint="`srctl plan list`", code="recovery-plan-not-found")
    _print_plan(plans[0], output_format)


@plan_app.command("remove")
def plan_remove(name: PlanArg, output_format: OutputOption = Format.table) -> None:
    """Remove a recovery plan (its machines stay protected)."""
    protect_call("RemoveRecoveryPlan", ppb.RemoveRecoveryPlanRequest(name=name))
    output.emit(output_format, {"removed": name}, lambda: output.console.print(f"recovery plan {name} removed"))


def _plan_workflow(plan: PlanArg, workflow: str, wait: bool, output_format: Format, **fields) -> None:
    job = protect_call("StartPlanWorkflow", ppb.StartPlanWorkflowRequest(plan=plan, workflow=workflow, **fields))
    follow(job, wait, output_format)


@plan_app.command("failover")
def plan_failover(
    plan: PlanArg,
    direction: Annotated[str, typer.Option(help="to-cloud or to-onprem (failback); checked against every machine")],
    recovery_point: PointOption = "latest",
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Unplanned failover of a plan; --direction to-onprem is the failback (the cloud VMs are shut down)."""
    _plan_workflow(plan, "failover", wait, output_format, direction=direction, recovery_point=recovery_point)


@plan_app.command("test-failover")
def plan_test_failover(plan: PlanArg, recovery_point: PointOption = "latest", wait: WaitOption = True,
                       output_format: OutputOption = Format.table) -> None:
    """Test failover of every machine of a plan into the isolated network."""
    _plan_workflow(plan, "test-failover", wait, output_format, recovery_point=recovery_point)


@plan_app.command("test-cleanup")
def plan_test_cleanup(plan: PlanArg, wait: WaitOption = True, output_format: OutputOption = Format.table) -> None:
    """Delete the test VMs of a plan's test failover."""
    _plan_workflow(plan, "test-cleanup", wait, output_format)


@plan_app.command("reprotect")
def plan_reprotect(
    plan: PlanArg,
    process_server: Annotated[str, typer.Option(help="to on-premises: the process server in the cloud")] = "",
    master_target: Annotated[str, typer.Option(help="to on-premises: the on-premises master target")] = "",
    datastore: Annotated[str, typer.Option(help="a datastore of that master target")] = "",
    target: Annotated[str, typer.Option(help="original, alternate or new")] = "original",
    wait: WaitOption = True,
    output_format: OutputOption = Format.table,
) -> None:
    """Reprotect every machine of a plan (the direction follows where they run)."""
    _plan_workflow(plan, "reprotect", wait, output_format, process_server=process_server,
                   master_target=master_target, datastore=datastore, target=target)


def _plan_json(p: ppb.RecoveryPlan) -> dict:
    return {
        "id": p.id, "name": p.name, "version": p.version, "protection_groups": list(p.protection_groups),
        "groups": [
            {"machines": list(g.machines),
             "before": [{"kind": a.kind, "script": a.script, "text": a.text} for a in g.before],
             "after": [{"kind": a.kind, "script": a.script, "text": a.text} for a in g.after]}
            for g in p.groups
        ],
    }


def _print_plan(plan: ppb.RecoveryPlan, output_format: Format) -> None:
    if output_format is not Format.table:
        output.emit(output_format, _plan_json(plan))
        return
    output.console.print(f"[bold]Recovery plan {plan.name}[/bold] (version {plan.version}); "
                         f"protection groups: {', '.join(plan.protection_groups)}", highlight=False)

    def actions(items) -> str:
        return "; ".join(f"{a.kind} {a.script or a.text}" for a in items) or "-"

    output.print_table("Groups", ["#", "MACHINES", "BEFORE", "AFTER"], [
        [i + 1, ", ".join(g.machines), actions(g.before), actions(g.after)] for i, g in enumerate(plan.groups)
    ])
