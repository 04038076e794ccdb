"""Protection groups, recovery plans, and starting workflows: what the Protection RPCs call.

Everything a request names is checked before anything is stored, so a refused
request changes nothing. Starting a workflow checks the machine's state here
for an immediate answer; the job's first step checks it again with a
compare-and-set (another job, or another server, may have started meanwhile).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime

from siterecovery.common import errors, pki
from siterecovery.common.pb import common_pb2
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import replication
from siterecovery.controller.convert import timestamp
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import JobKind, create_job
from siterecovery.controller.protection import cloud as cloud_sites
from siterecovery.controller.protection import lifecycle
from siterecovery.controller.protection import onprem as onprem_sites
from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.protection.site_steps import onprem_preflight
from siterecovery.controller.protection.steps import (
    FAILBACK,
    FORWARD,
    MULTI_VM,
    common_multi_vm_points,
    pairs_of,
)
from siterecovery.controller.store.base import (
    JobRecord,
    ProtectedItemRecord,
    ProtectionGroupRecord,
    RecoveryPlanRecord,
    Store,
)

TWIN_SUFFIX = "_Failback"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TARGETS = ("original", "alternate", "new")
MAX_PLAN_GROUPS = 50
MAX_PLAN_MACHINES = 500
MAX_ACTIONS = 20


# --- protection groups ------------------------------------------------------------------


def create_group(store: Store, name: str, policy: rpb.RecoveryPolicy | None, *, now: datetime) -> ProtectionGroupRecord:
    if not _GROUP_NAME.match(name or "") or name.endswith(TWIN_SUFFIX):
        raise errors.InvalidInput(
            f"{name!r} cannot name a protection group",
            hint=f"letters, digits, '.', '_', '-' (at most 100), not ending in {TWIN_SUFFIX} (the twin's suffix)",
            code="group-name-invalid",
        )
    checked = replication.policy_from(policy)
    primary = ProtectionGroupRecord(id=f"pg-{uuid.uuid4().hex[:16]}", name=name, policy=checked, created_at=now)
    twin = ProtectionGroupRecord(
        id=f"pg-{uuid.uuid4().hex[:16]}", name=name + TWIN_SUFFIX, policy=checked, created_at=now,
        failback_of=primary.id,
    )
    store.add_protection_groups(primary, twin)
    return primary


def group_message(store: Store, group: ProtectionGroupRecord) -> ppb.ProtectionGroup:
    primary = store.get_protection_group(group.failback_of).name if group.failback_of else ""
    return ppb.ProtectionGroup(
        id=group.id,
        name=group.name,
        policy=rpb.RecoveryPolicy(**{k: v for k, v in group.policy.items() if k in replication.DEFAULT_POLICY}),
        failback_of=primary,
        machines=len(store.list_protected_items(group_id=group.id)),
        created_at=timestamp(group.created_at),
    )


# --- protected machines -----------------------------------------------------------------


def find_item(store: Store, ref: str) -> ProtectedItemRecord:
    """A protected machine by its id, its name, or the id / host name of one of its machines."""
    if not ref:
        raise errors.InvalidInput("no machine given", hint="`srctl machine list` shows them", code="machine-missing")
    items = store.list_protected_items()
    for item in items:
        if ref == item.id:
            return item
    found = [i for i in items if i.name == ref]
    if not found:
        found = [
            i for i in items
            if ref in (i.machine_id, i.details.get("onprem", {}).get("machine_id"), i.details.get("cloud", {}).get("machine_id"))
        ]
    if len(found) == 1:
        return found[0]
    if found:
        raise errors.Conflict(
            f"{len(found)} protected machines are called {ref!r}",
            hint="name it by id: " + ", ".join(i.id for i in found), code="machine-ambiguous",
        )
    raise errors.NotFound(
        f"{ref!r} is not a protected machine",
        hint="`srctl machine list` shows them; `srctl machine protect` protects one",
        code="protected-machine-not-found",
    )


def _label(item: ProtectedItemRecord, names: list[str]) -> str:
    return item.name if names.count(item.name) == 1 else f"{item.name}#{item.id[-6:]}"


def protect(
    store: Store,
    env: Environment,
    kind: JobKind,
    request: ppb.ProtectMachineRequest,
    *,
    now: datetime,
) -> JobRecord:
    machine = replication.resolve_machine(store, request.machine)
    group = store.get_protection_group(request.group) if request.group else None
    if group is None:
        raise errors.InvalidInput("name the protection group with --group", code="group-missing")
    if group.failback_of:
        raise errors.InvalidInput(
            f"{group.name} is a failback group; machines enter it by reprotect",
            hint=f"protect into {store.get_protection_group(group.failback_of).name}", code="group-is-twin",
        )
    for item in store.list_protected_items():
        if machine.id in (item.machine_id, item.details.get("onprem", {}).get("machine_id"),
                          item.details.get("cloud", {}).get("machine_id")):
            raise errors.Conflict(
                f"{machine.hostname} is already protected ({item.state})",
                hint="`srctl machine failback-status` shows where it stands", code="machine-already-protected",
            )
    if store.list_pairs(machine_id=machine.id):
        raise errors.Conflict(
            f"the disks of {machine.hostname} are replicated outside a protection group",
            hint="`srctl replication disable` them first", code="pair-exists",
        )
    ps = replication.resolve_server(store, request.process_server, pki.PROCESS_SERVER)
    route, cloud = _forward_route(store, request, ps.id)
    source = store.get_server(machine.server_id)
    vm_uuid = source.inventory.get("host", {}).get("machine_uuid", "")
    found = onprem_sites.identify(store, env.local.onprem if env.local is not None else None, vm_uuid)
    details = {
        "kind": "vm" if found is not None else "physical",
        "onprem": {
            "provider": found.provider if found is not None else "",
            "vm": found.vm if found is not None else "",
            "vm_uuid": vm_uuid,
            "vcenter": found.vcenter if found is not None else "",
            "machine_id": machine.id,
        },
        "cloud": {"vm": "", "vm_uuid": "", "machine_id": "", "replicas": {}, **cloud},
        FORWARD: route,
        "network": source.inventory.get("network", {}),
        "pairs": {FORWARD: [], FAILBACK: []},
    }
    job = create_job(store, kind, target=f"protect {machine.hostname}", params=_params(
        "protect", [[(f"it-{uuid.uuid4().hex[:16]}", machine.hostname)]], {}, plan=""), now=now)
    item_id = job.params["groups"][0]["items"][0]["id"]
    store.add_protected_item(
        ProtectedItemRecord(
            id=item_id, name=machine.hostname, machine_id=machine.id, group_id=group.id,
            state=lifecycle.PROTECTING, details={**details, "job": job.id}, created_at=now, updated_at=now,
        )
    )
    return job


_VM_SIZE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{1,63}$")


def _forward_route(store: Store, request: ppb.ProtectMachineRequest, process_server_id: str) -> tuple[dict, dict]:
    """Where a machine replicates to (the process server and the master target, or the Azure
    site whose page blobs hold the replicas) and what the cloud side records from the start."""
    if not request.azure_site:
        if request.azure_vm_size:
            raise errors.InvalidInput("--azure-vm-size applies to protection to Azure",
                                      hint="add --azure-site SITE, or leave the size out", code="azure-target-conflict")
        mt = replication.resolve_server(store, request.master_target, pki.MASTER_TARGET)
        return ({"process_server": process_server_id, "master_target": mt.id, "datastore": request.datastore},
                {"provider": cloud_sites.LOCAL})
    if request.master_target or request.datastore:
        raise errors.InvalidInput(
            "protection to Azure writes page blobs: it takes no master target or datastore",
            hint="leave out --master-target and --datastore with --azure-site", code="azure-target-conflict",
        )
    size = request.azure_vm_size or cloud_sites.DEFAULT_VM_SIZE
    if not _VM_SIZE.match(size):
        raise errors.InvalidInput(f"{size!r} is not an Azure VM size", hint="e.g. Standard_D2s_v3",
                                  code="azure-vm-size-invalid")
    site = replication.azure_site(store, request.azure_site)
    return ({"process_server": process_server_id, "azure_site": site.id},
            {"provider": cloud_sites.AZURE, "site": site.name, "vm_size": size})


def _params(
    workflow: str, groups: list[list[tuple[str, str]]], options: dict, *, plan: str, actions: list[dict] | None = None
) -> dict:
    actions = actions or [{} for _ in groups]
    return {
        "workflow": workflow,
        "plan": plan,
        "options": options,
        "groups": [
            {
                "items": [{"id": item_id, "label": label} for item_id, label in items],
                "before": action.get("before", []),
                "after": action.get("after", []),
            }
            for items, action in zip(groups, actions, strict=True)
        ],
    }


def workflow_for(item: ProtectedItemRecord, asked: str) -> str:
    """The workflow a user's word means for this machine ("reprotect" depends on where it runs)."""
    if asked == "reprotect":
        if item.state == lifecycle.FAILED_OVER:
            return "reprotect-to-onprem"
        if item.state == lifecycle.FAILED_BACK:
            return "reprotect-to-cloud"
        raise errors.PreconditionFailed(
            f"{item.name} is {item.state}; reprotect follows a failover (to on-premises) or a failback (to the cloud)",
            hint="`srctl machine failback-status` shows where it stands", code="wrong-state",
        )
    if asked not in lifecycle.MOVES or asked in ("protect", "reprotect-to-onprem", "reprotect-to-cloud"):
        raise errors.InvalidInput(
            f"{asked!r} is not a workflow",
            hint="use test-failover, test-cleanup, failover, reprotect, failback, delete-cloud-vm or unprotect",
            code="workflow-unknown",
        )
    return asked


def _options(store: Store, item: ProtectedItemRecord, workflow: str, request) -> dict:
    """The options of `workflow` from the request, checked now (the job must not fail on a typo)."""
    options: dict = {}
    if workflow in ("failover", "test-failover", "failback"):
        options["point"] = request.recovery_point or "latest"
        if options["point"] not in ("latest", *replication.LATEST_OF_KIND) and not re.match(
            r"^[A-Za-z0-9._-]{1,128}$", options["point"]
        ):
            raise errors.InvalidInput(f"{options['point']!r} is not a recovery point", code="point-invalid")
    if workflow == "reprotect-to-onprem":
        target = request.target or "original"
        if target not in TARGETS:
            raise errors.InvalidInput(f"{target!r} is not a failback target", hint="original, alternate or new",
                                      code="target-invalid")
        options["target"] = "new" if target == "alternate" else target
    return options


def _pin_multi_vm_points(store: Store, items: list[ProtectedItemRecord], workflow: str, options: dict) -> None:
    """For latest-multi-vm-consistent: one tag per group, common to all its machines, chosen now.
    For any other named point (a kind's latest, a tag id): every disk must hold one now, so a
    job is not started only to fail at its recover step."""
    if options.get("point", "latest") not in ("latest", MULTI_VM):
        _check_points_held(store, items, workflow, options["point"])
    if options.get("point") != MULTI_VM:
        return
    direction = FAILBACK if workflow == "failback" else FORWARD
    pairs = [p for item in items for p in pairs_of(store, item, direction)]
    options["multi_vm_points"] = common_multi_vm_points([(p, replication.points(store, p)) for p in pairs])


def _check_points_held(store: Store, items: list[ProtectedItemRecord], workflow: str, wanted: str) -> None:
    direction = FAILBACK if workflow == "failback" else FORWARD
    for item in items:
        for pair in pairs_of(store, item, direction):
            try:
                replication.choose_point(replication.points(store, pair), wanted)
            except errors.NotFound as exc:
                raise errors.NotFound(
                    f"{item.name}, disk {pair.disk_name}: {exc.message}",
                    hint=f"`srctl recovery-points list {item.name}` shows its points; take one with `srctl "
                    "recovery-points create` (--kind app-consistent for an app-consistent one), or choose "
                    "another point", code=exc.code,
                ) from None


def _failback_route(store: Store, request) -> dict:
    """The failback route a reprotect to on-premises names: process server, master target, datastore (checked)."""
    ps = replication.resolve_server(store, request.process_server, pki.PROCESS_SERVER)
    mt = replication.resolve_server(store, request.master_target, pki.MASTER_TARGET)
    if request.retention_dir:
        retention = [d.get("path") for d in replication.directories(mt, common_pb2.DIRECTORY_KIND_RETENTION)]
        if request.retention_dir not in retention:
            raise errors.NotFound(
                f"master target {mt.hostname} has no retention directory {request.retention_dir}",
                hint="its retention directories: " + ", ".join(retention), code="retention-not-found",
            )
    route = {"process_server": ps.id, "master_target": mt.id, "datastore": request.datastore}
    if request.vcenter:
        route["vcenter"] = store.get_vcenter(request.vcenter).id
    return route


def start_workflow(
    store: Store, env: Environment, kinds: dict[str, JobKind], request: ppb.StartWorkflowRequest, *, now: datetime
) -> JobRecord:
    item = find_item(store, request.machine)
    workflow = workflow_for(item, request.workflow)
    lifecycle.check_can_start(workflow, item.name, item.state)
    _check_not_busy(store, item)
    _check_cloud_free(item, workflow)
    if workflow == "unprotect" and item.state == lifecycle.PROTECTED and item.details.get("cloud", {}).get("vm"):
        raise errors.PreconditionFailed(
            f"{item.name} still has the cloud VM {item.details['cloud']['vm']} a failback left behind",
            hint=f"delete it first (`srctl machine delete-cloud-vm {item.name}`), then unprotect",
            code="cloud-vm-left",
        )
    if workflow == "delete-cloud-vm" and not item.details.get("cloud", {}).get("vm"):
        raise errors.PreconditionFailed(
            f"{item.name} has no cloud VM to delete",
            hint=f"`srctl machine failback-status {item.name}` shows its VMs", code="no-cloud-vm",
        )
    options = _options(store, item, workflow, request)
    _pin_multi_vm_points(store, [item], workflow, options)
    if workflow == "reprotect-to-onprem":
        _set_failback_routes(store, env, [item], request, options["target"], now=now)
    return create_job(store, kinds[workflow], target=f"{workflow} {item.name}",
                      params=_params(workflow, [[(item.id, item.name)]], options, plan=""), now=now)


def _check_cloud_free(item: ProtectedItemRecord, workflow: str) -> None:
    """A failover creates the cloud VM: one left by an earlier cycle must go first."""
    vm = item.details.get("cloud", {}).get("vm", "")
    if workflow == "failover" and vm:
        raise errors.PreconditionFailed(
            f"the cloud VM {vm} of an earlier failover of {item.name} still exists",
            hint=f"delete it with `srctl machine delete-cloud-vm {item.name}`, then fail over",
            code="cloud-vm-exists",
        )


def _check_not_busy(store: Store, item: ProtectedItemRecord) -> None:
    job_id = item.details.get("job", "")
    if not job_id:
        return
    try:
        job = store.get_job(job_id)
    except errors.NotFound:
        return
    if job.status in states.ACTIVE_JOB_STATUSES:
        raise errors.Conflict(
            f"{item.name} is in job {job.id} ({job.kind}, {job.status})",
            hint=f"follow it with `srctl jobs watch {job.id}`", code="machine-busy",
        )


def _raise_busy(item: ProtectedItemRecord) -> None:
    raise errors.Conflict(f"{item.name} changed meanwhile", hint="run the command again", code="machine-busy")


def item_message(store: Store, item: ProtectedItemRecord, *, heartbeat_interval: float, now: datetime) -> ppb.ProtectedMachine:
    pair_ids = {p for ids in item.details.get("pairs", {}).values() for p in ids}
    pairs = [p for p in store.list_pairs() if p.id in pair_ids]
    return ppb.ProtectedMachine(
        id=item.id,
        name=item.name,
        machine_id=item.machine_id,
        group=store.get_protection_group(item.group_id).name,
        state=item.state,
        direction=lifecycle.DIRECTION_OF.get(item.state, ""),
        details_json=json.dumps(item.details, sort_keys=True),
        job_id=item.details.get("job", ""),
        pairs=replication.views(store, pairs, heartbeat_interval=heartbeat_interval, now=now) if pairs else [],
        updated_at=timestamp(item.updated_at),
    )


# --- recovery plans ---------------------------------------------------------------------


def save_plan(store: Store, request: ppb.SaveRecoveryPlanRequest, *, now: datetime) -> RecoveryPlanRecord:
    plan = request.plan
    if not _GROUP_NAME.match(plan.name or ""):
        raise errors.InvalidInput(f"{plan.name!r} cannot name a recovery plan", code="plan-name-invalid")
    if not plan.groups or len(plan.groups) > MAX_PLAN_GROUPS:
        raise errors.InvalidInput(f"a plan has 1 to {MAX_PLAN_GROUPS} groups", code="plan-invalid")
    seen: set[str] = set()
    groups, protection_groups = [], set()
    for group in plan.groups:
        ids = []
        for ref in group.machines:
            item = find_item(store, ref)
            if item.id in seen:
                raise errors.InvalidInput(f"{item.name} is in the plan twice", code="plan-invalid")
            seen.add(item.id)
            ids.append(item.id)
            pg = store.get_protection_group(item.group_id)
            primary = store.get_protection_group(pg.failback_of) if pg.failback_of else pg
            protection_groups.add(primary.id)
            protection_groups.update(g.id for g in store.list_protection_groups() if g.failback_of == primary.id)
        groups.append({
            "machines": ids,
            "before": [_action(a) for a in group.before],
            "after": [_action(a) for a in group.after],
        })
    if len(seen) > MAX_PLAN_MACHINES:
        raise errors.InvalidInput(f"a plan holds at most {MAX_PLAN_MACHINES} machines", code="plan-invalid")
    definition = {"groups": groups, "protection_groups": sorted(protection_groups)}
    if request.expected_version:
        current = store.get_recovery_plan(plan.name)
        record = RecoveryPlanRecord(id=current.id, name=current.name, definition=definition,
                                    created_at=current.created_at, updated_at=now)
        return store.save_recovery_plan(record, expected_version=request.expected_version)
    record = RecoveryPlanRecord(id=f"rp-{uuid.uuid4().hex[:16]}", name=plan.name, definition=definition,
                                created_at=now, updated_at=now)
    return store.save_recovery_plan(record, expected_version=None)


def _action(action: ppb.PlanAction) -> dict:
    if action.kind == "script":
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", action.script):
            raise errors.InvalidInput(
                f"{action.script!r} is not a script name",
                hint="name a file in the server's plan_scripts_dir (no paths)", code="plan-action-invalid",
            )
        timeout = action.timeout_seconds or 600
        if not 1 <= timeout <= 86400:
            raise errors.InvalidInput("a script's timeout is 1 s to 24 h", code="plan-action-invalid")
        return {"kind": "script", "script": action.script, "timeout": timeout}
    if action.kind == "manual":
        if not action.text or len(action.text) > 1000:
            raise errors.InvalidInput("a manual action needs a text (at most 1000 characters)",
                                      code="plan-action-invalid")
        return {"kind": "manual", "text": action.text}
    raise errors.InvalidInput(f"{action.kind!r} is not a plan action", hint="script or manual",
                              code="plan-action-invalid")


def plan_message(store: Store, plan: RecoveryPlanRecord) -> ppb.RecoveryPlan:
    names = {i.id: i.name for i in store.list_protected_items()}
    groups = {g.id: g.name for g in store.list_protection_groups()}
    return ppb.RecoveryPlan(
        id=plan.id,
        name=plan.name,
        groups=[
            ppb.PlanGroup(
                machines=[names.get(i, i) for i in g["machines"]],
                before=[_action_message(a) for a in g.get("before", [])],
                after=[_action_message(a) for a in g.get("after", [])],
            )
            for g in plan.definition.get("groups", [])
        ],
        protection_groups=sorted(groups.get(g, g) for g in plan.definition.get("protection_groups", [])),
        version=plan.version,
        updated_at=timestamp(plan.updated_at),
    )


def _action_message(action: dict) -> ppb.PlanAction:
    return ppb.PlanAction(kind=action["kind"], script=action.get("script", ""),
                          timeout_seconds=int(action.get("timeout", 0)), text=action.get("text", ""))


def start_plan_workflow(
    store: Store, env: Environment, kinds: dict[str, JobKind], request: ppb.StartPlanWorkflowRequest, *,
    now: datetime,
) -> JobRecord:
    plan = store.get_recovery_plan(request.plan)
    asked = request.workflow or "failover"
    groups: list[list[tuple[str, str]]] = []
    actions: list[dict] = []
    workflow = ""
    all_items = [store.get_protected_item(i) for g in plan.definition["groups"] for i in g["machines"]]
    names = [i.name for i in all_items]
    skipped = []
    for group in plan.definition["groups"]:
        members = []
        for item_id in group["machines"]:
            item = store.get_protected_item(item_id)
            this = _member_workflow(item, asked, request.direction)
            if this is None:
                skipped.append(item.name)
                continue
            lifecycle.check_can_start(this, item.name, item.state)
            _check_not_busy(store, item)
            _check_cloud_free(item, this)
            if workflow and this != workflow:
                raise errors.PreconditionFailed(
                    f"the plan's machines stand in different places ({workflow} and {this})",
                    hint="`srctl machine list` shows where each one is; act on them one by one", code="plan-mixed",
                )
            workflow = this
            members.append((item.id, _label(item, names)))
        groups.append(members)
        actions.append({"before": group.get("before", []), "after": group.get("after", [])})
    if not workflow:
        raise errors.PreconditionFailed(
            f"every machine of plan {plan.name} has done that already: {', '.join(skipped)}", code="plan-nothing-to-do"
        )
    options = _options(store, all_items[0], workflow, request)
    options["direction"] = request.direction
    _pin_multi_vm_points(store, [store.get_protected_item(m[0]) for g in groups for m in g], workflow, options)
    kept = [(g, a) for g, a in zip(groups, actions, strict=True) if g or a["before"] or a["after"]]
    params = _params(workflow, [g for g, _ in kept], options, plan=plan.name, actions=[a for _, a in kept])
    if workflow == "reprotect-to-onprem":
        members = [store.get_protected_item(m[0]) for g in groups for m in g]
        _set_failback_routes(store, env, members, request, options["target"], now=now)
    return create_job(store, kinds[workflow], target=f"{workflow} of plan {plan.name}", params=params, now=now)


def _member_workflow(item: ProtectedItemRecord, asked: str, direction: str) -> str | None:
    """The workflow a plan command means for one of its machines; None when the machine is there already."""
    if asked == "failover":
        return None if _done(item, direction) else lifecycle.check_direction(direction, item.name, item.state)
    if asked == "reprotect" and item.state in lifecycle.DIRECTION_OF:
        return None  # protected already (one way or the other)
    return workflow_for(item, asked)


def _set_failback_routes(
    store: Store, env: Environment, items: list[ProtectedItemRecord], request, target: str, *, now: datetime
) -> None:
    """Check every machine against the failback rules, then record the route back; a refusal changes nothing."""
    routes = []
    for item in items:
        route = _failback_route(store, request)
        onprem_preflight(env, store, item, target, route)
        routes.append((item, route))
    for item, route in routes:
        details = {**item.details, FAILBACK: {**item.details.get(FAILBACK, {}), **route}}
        if store.update_protected_item(item.id, expected_version=item.version, now=now, details=details) is None:
            _raise_busy(item)


def _done(item: ProtectedItemRecord, direction: str) -> bool:
    """A machine already where a plan's failover would take it (so a plan can be run again)."""
    return (direction == lifecycle.TO_CLOUD and item.state == lifecycle.FAILED_OVER) or (
        direction == lifecycle.TO_ONPREM and item.state == lifecycle.FAILED_BACK
    )
