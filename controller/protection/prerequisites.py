"""The failback prerequisites of one protected machine, as `srctl doctor --machine` shows them.

Runs the very rules a reprotect to on-premises runs (`site_steps.onprem_failback_rules`
for the `local` provider, `vsphere_rules.vsphere_failback_rules` on an
endpoint's last discovery) and returns every rule's verdict with its fix,
not only the first refusal. Reads only: nothing is claimed, stored or started.

The route (master target, datastore) is the one asked for, else the one the
machine's last reprotect recorded; a rule that needs a choice not made yet
says which choice is missing.
"""

from __future__ import annotations

from siterecovery.common import errors, pki
from siterecovery.common.pb import admin_pb2
from siterecovery.controller import replication
from siterecovery.controller.diagnostics import Check
from siterecovery.controller.protection import lifecycle, rules
from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.protection.service import TARGETS, find_item
from siterecovery.controller.protection.site_steps import onprem_failback_rules
from siterecovery.controller.protection.steps import FAILBACK
from siterecovery.controller.protection.vsphere_rules import vsphere_failback_rules
from siterecovery.controller.store.base import ProtectedItemRecord, ServerRecord, Store

PREFIX = "failback: "
WHERE = {
    lifecycle.FAILED_OVER: "failed over: these are the rules `srctl machine reprotect` checks now",
    lifecycle.PROTECTED: "protected to the cloud: these are the rules a reprotect after a failover would check",
}


MAX_FIELD = 256


def check_request(request: admin_pb2.DiagnoseRequest) -> None:
    """Names only: short, printable (they are looked up in the store)."""
    for field in ("machine", "master_target", "target", "vcenter", "datastore"):
        value = getattr(request, field)
        if len(value) > MAX_FIELD or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise errors.InvalidInput(f"{field} is not a name (at most {MAX_FIELD} printable characters)",
                                      hint="name it as `srctl ... list` shows it", code="diagnose-invalid")


def failback_checks(store: Store, env: Environment | None, request: admin_pb2.DiagnoseRequest) -> list[Check]:
    try:
        item = find_item(store, request.machine)
    except errors.SiteRecoveryError as exc:
        return [_failed("protected machine", request.machine, exc)]
    subject = item.name
    checks = [Check(PREFIX + "state", "ok", f"{item.name} is {WHERE.get(item.state, item.state)}", subject=subject)]
    target = request.target or "original"
    if target not in TARGETS:
        return checks + [_failed("target", subject, errors.InvalidInput(
            f"{target!r} is not a failback target", hint="original, alternate or new", code="target-invalid"))]
    target = "new" if target == "alternate" else target
    master_target: ServerRecord | None = None
    ref = request.master_target or item.details.get(FAILBACK, {}).get("master_target", "")
    if ref:
        try:
            master_target = replication.resolve_server(store, ref, pki.MASTER_TARGET)
        except errors.SiteRecoveryError as exc:
            checks.append(_failed("master target", subject, exc))
    verdicts: list[rules.Verdict] = []
    provider = item.details.get("onprem", {}).get("provider", "")
    vcenter = request.vcenter or item.details.get("onprem", {}).get("vcenter", "")
    if env is not None and env.local is not None and provider in ("local", ""):
        verdicts += onprem_failback_rules(env, store, item, target, master_target.id if master_target else None)
    if vcenter:
        verdicts += _vsphere(store, item, target, vcenter, master_target, request.datastore)
    if not verdicts:
        checks.append(Check(PREFIX + "rules", "skipped",
                            f"no on-premises provider drives {item.name} here: name its vCenter or ESXi endpoint",
                            hint="srctl doctor --machine NAME --vcenter ENDPOINT", subject=subject))
    return checks + [_from_verdict(v, subject) for v in verdicts]


def _vsphere(store: Store, item: ProtectedItemRecord, target: str, vcenter: str,
             master_target: ServerRecord | None, datastore: str) -> list[rules.Verdict]:
    rule = "vSphere inventory"
    try:
        endpoint = store.get_vcenter(vcenter)
        document = store.get_vcenter_inventory(endpoint.id).document
    except errors.NotFound as exc:
        return [rules.Verdict(rule, "failed", exc.message, errors.PreconditionFailed(
            exc.message, hint="`srctl vcenter list` shows the endpoints; `srctl vcenter discover NAME` discovers one",
            code=exc.code))]
    if master_target is None:
        return [rules.skipped(rule, "not checked: no master target chosen yet (reprotect --master-target records "
                                    "it; `srctl doctor --machine M --master-target MT` checks one)")]
    mt_uuid = master_target.inventory.get("host", {}).get("machine_uuid", "")
    if not mt_uuid:
        return [rules.skipped(rule, f"not checked: master target {master_target.hostname} reports no VM UUID "
                                    "(set machine_uuid in its configuration)")]
    route_datastore = datastore or item.details.get(FAILBACK, {}).get("datastore", "") or None
    try:
        verdicts, _ = vsphere_failback_rules(
            document, vm_uuid=item.details.get("onprem", {}).get("vm_uuid", "") or None,
            kind="physical" if item.details.get("kind") == "physical" else "vm", target=target,  # type: ignore[arg-type]
            master_target_vm_uuid=mt_uuid, datastore=route_datastore, endpoint_name=endpoint.name,
        )
    except errors.InvalidInput as exc:
        return [rules.Verdict(rule, "failed", exc.message, errors.PreconditionFailed(exc.message, hint=exc.hint))]
    return [rules.passed(rule, f"as discovered from {endpoint.name}")] + verdicts


def _from_verdict(verdict: rules.Verdict, subject: str) -> Check:
    status = {"ok": "ok", "failed": "failed", "skipped": "skipped"}[verdict.status]
    return Check(PREFIX + verdict.rule, status, verdict.message, hint=verdict.hint, code=verdict.code,  # type: ignore[arg-type]
                 subject=subject)


def _failed(name: str, subject: str, exc: errors.SiteRecoveryError) -> Check:
    return Check(PREFIX + name, "failed", exc.message, hint=exc.hint, code=exc.code, subject=subject)


# Where a protected machine runs, by state: the other side's VM is off, and its agent silent.
_RUNS_IN_CLOUD = {lifecycle.FAILED_OVER, lifecycle.REPROTECTING_TO_ONPREM, lifecycle.FAILBACK_PROTECTED,
                  lifecycle.FAILING_BACK}
_CLOUD_VM_OFF = {lifecycle.FAILED_BACK, lifecycle.REPROTECTING_TO_CLOUD, lifecycle.PROTECTED,
                 lifecycle.DELETING_CLOUD_VM}


def expected_silent(store: Store) -> dict[str, str]:
    """Server id → why that source agent is silent by design: the on-premises VM while its machine
    runs in the cloud, the cloud VM after a failback shut it down."""
    silent: dict[str, str] = {}
    for item in store.list_protected_items():
        if item.state in _RUNS_IN_CLOUD:
            side, why = "onprem", f"{item.name} runs in the cloud ({item.state}); its on-premises VM is off"
        elif item.state in _CLOUD_VM_OFF and item.details.get("cloud", {}).get("vm"):
            side, why = "cloud", f"{item.name} failed back; its cloud VM is shut down"
        else:
            continue
        machine_id = item.details.get(side, {}).get("machine_id", "")
        try:
            silent[store.get_machine(machine_id).server_id] = why
        except errors.NotFound:
            continue
    return silent
