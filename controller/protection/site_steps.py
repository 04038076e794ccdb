"""The steps that act on the sites' VMs: recover disks, create, power and delete VMs.

The cloud side goes through cloud.py (`local` or Azure), the on-premises side
through onprem.py (`local` or vSphere); these steps hold the order, the waiting
and what the protected machine's document records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from siterecovery.common import errors, netidentity
from siterecovery.common.logging import get_logger
from siterecovery.controller import health, replication
from siterecovery.controller.jobs.engine import StepContext, Waiting
from siterecovery.controller.protection import cloud as cloud_sites
from siterecovery.controller.protection import onprem as onprem_sites
from siterecovery.controller.protection import rules
from siterecovery.controller.protection.steps import (
    FAILBACK,
    FORWARD,
    ItemStep,
    pairs_of,
    poll_delay,
    resolve_point,
)
from siterecovery.controller.store.base import ProtectedItemRecord

log = get_logger(__name__)


def _side(test: bool) -> str:
    """Where a protected machine's document keeps its cloud VM: "test" for a test failover's."""
    return "test" if test else "cloud"


# What a deleted cloud VM leaves in the document: nothing of it (the replicas and the route stay).
_VM_GONE = {"vm": "", "vm_uuid": "", "machine_id": "", "vm_id": "", "disk_ids": [], "nic_ids": [], "copies": [],
            "private_ip": ""}


class RecoverToCloud(ItemStep):
    """Bring every forward pair's chosen point into disks of the cloud VM's own (cloud.py: a master
    target's `Materialize` for the local provider, a copy of the blob snapshot on Azure)."""

    action = "recover disks"

    def __init__(self, *args: Any, test: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test = test

    def vm_name(self, item: ProtectedItemRecord) -> str:
        return f"{item.name}-test" if self.test else item.name

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = cloud_sites.cloud_for(self.env, ctx.store, item)
        name = self.vm_name(item)
        cloud.check_name_free(name)
        pairs = pairs_of(ctx.store, item, FORWARD)
        if not pairs:
            raise errors.PreconditionFailed(f"{item.name} has no replicated disks", code="no-pairs")
        wanted = self.options.get("point", "latest")
        points = {pair.id: self._point(ctx, item, pair, wanted, cloud.provider) for pair in pairs}
        side = _side(self.test)
        disks = cloud.recover(ctx, name, pairs, points,
                              lambda resources: self.update(ctx, **{side: {**resources, "vm": ""}}), test=self.test)
        return {"disks": disks, "point": ",".join(sorted(set(points.values()))) or wanted}

    def _point(self, ctx: StepContext, item: ProtectedItemRecord, pair, wanted: str, provider: str) -> str:
        if wanted in ("", "latest"):
            final = item.details.get("final_point", {})
            if final.get("job") == ctx.job.id and any(
                p.tag_id == final.get("tag") for p in replication.points(ctx.store, pair)
            ):
                # A master target's latest holds the final point and nothing after it (paused);
                # on Azure "latest" is a snapshot, and the final point is the newest one.
                return "latest" if provider == cloud_sites.LOCAL else final["tag"]
        return resolve_point(ctx, pair, wanted, self.options)

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        cloud = cloud_sites.cloud_for(self.env, ctx.store, item)
        recorded = {**item.details.get(_side(self.test), {}), "vm": self.vm_name(item)}
        # No VM of that name existed when this step began: one there now is what a failed "create VM"
        # left (a failed step is not compensated), and would refuse the next attempt as `vm-exists`.
        cloud.delete_vm(ctx, recorded)
        cloud.discard_recovered(self.vm_name(item), recorded)
        self.update(ctx, **{_side(self.test): _VM_GONE})


class CreateCloudVm(ItemStep):
    """Create the cloud VM on the recovered disks and start it (its agent starts with it)."""

    action = "create VM"

    def __init__(self, *args: Any, test: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test = test

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = cloud_sites.cloud_for(self.env, ctx.store, item)
        recovered = ctx.outputs.get(f"{self.label}: recover disks", {})
        name = f"{item.name}-test" if self.test else item.name
        side = _side(self.test)
        vm = cloud.create_vm(ctx, item, name, dict(recovered.get("disks", {})),
                             lambda resources: self.update(ctx, **{side: {**resources, "vm": name}}), test=self.test)
        if self.test:
            self.update(ctx, test={"vm": vm.name, "vm_uuid": vm.uuid, "point": recovered.get("point", ""),
                                   **vm.resources})
        else:
            self.update(ctx, cloud={"provider": vm.provider, "vm": vm.name, "vm_uuid": vm.uuid, "machine_id": "",
                                    **vm.resources})
        network = "isolated" if self.test else "production"
        ctx.progress(1.0, f"VM {vm.name} ({vm.provider}) is on in the {network} network")
        return {"vm": vm.name, "point": recovered.get("point", "")}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        side = _side(self.test)
        recorded = dict(item.details.get(side, {}))
        recorded.setdefault("vm", f"{item.name}-test" if self.test else item.name)
        cloud_sites.cloud_for(self.env, ctx.store, item).delete_vm(ctx, recorded)
        self.update(ctx, **{side: _VM_GONE})


def retire_agents(ctx: StepContext, vm_uuid: str, now) -> list[str]:
    """Revoke the agents of a VM that is gone: their certificates die with it (`srctl servers list --all`)."""
    retired = []
    forms = cloud_sites.uuid_forms(vm_uuid)
    for server in ctx.store.list_servers(role="source"):
        if forms and server.revoked_at is None and \
                server.inventory.get("host", {}).get("machine_uuid", "").lower() in forms:
            ctx.store.revoke_server(server.id, now=now)
            retired.append(server.id)
    return retired


class DeleteTestVm(ItemStep):
    action = "delete test VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        test = item.details.get("test", {})
        deleted = []
        if test.get("vm") or test.get("copies"):
            deleted = cloud_sites.cloud_for(self.env, ctx.store, item).delete_vm(ctx, test)
        retired = retire_agents(ctx, test.get("vm_uuid", ""), self.env.clock())
        self.update(ctx, test={**_VM_GONE, "point": ""})
        return {"deleted": deleted, "retired_agents": retired}


class DeleteCloudVm(ItemStep):
    """Delete the cloud VM left behind by a failback, with what was made for it; the replicas stay."""

    action = "delete cloud VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = item.details.get("cloud", {})
        deleted = []
        if cloud.get("vm"):
            deleted = cloud_sites.cloud_for(self.env, ctx.store, item).delete_vm(ctx, cloud)
        retired = retire_agents(ctx, cloud.get("vm_uuid", ""), self.env.clock())
        self.update(ctx, cloud=_VM_GONE)
        return {"deleted": deleted, "retired_agents": retired}


class ShutdownSource(ItemStep):
    """Power off the on-premises VM, if it can still be reached (an unplanned failover goes on anyway)."""

    action = "shut down source"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        onprem = item.details.get("onprem", {})
        name = onprem.get("vm", "")
        if not name or (onprem.get("provider") == onprem_sites.LOCAL and self.env.local is None):
            return {"shut_down": ""}
        try:
            onprem_sites.site_for(self.env, ctx.store, onprem).power_off(name)
        except errors.SiteRecoveryError as exc:
            ctx.progress(1.0, f"could not shut down {name}: {exc}; going on (unplanned failover)")
            return {"shut_down": ""}
        return {"shut_down": name}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        name = ctx.output.get("shut_down", "")
        if name:
            onprem_sites.site_for(self.env, ctx.store, item.details.get("onprem", {})).power_on(name)


class ShutdownCloudVm(ItemStep):
    """Power the cloud VM off (Azure: power off, then deallocate, so its compute is no longer billed)."""

    action = "shut down cloud VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        vm = item.details.get("cloud", {})
        if vm.get("vm"):
            cloud_sites.cloud_for(self.env, ctx.store, item).power_off(vm)
        return {"shut_down": vm.get("vm", "")}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        if ctx.output.get("shut_down", ""):
            cloud_sites.cloud_for(self.env, ctx.store, item).power_on(item.details.get("cloud", {}))


class FindAgent(ItemStep):
    """Wait until the agent of the VM on one side has registered and heartbeats; record its machine."""

    action = "find agent"

    def __init__(self, *args: Any, side: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.side = side  # "cloud" or "onprem"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        vm_uuid = item.details.get(self.side, {}).get("vm_uuid", "")
        known = item.details.get(self.side, {}).get("machine_id", "")
        forms = cloud_sites.uuid_forms(vm_uuid)
        now = self.env.clock()
        candidates = []
        for machine in ctx.store.list_machines():
            server = ctx.store.get_server(machine.server_id)
            if server.revoked_at is not None:
                continue
            uuid_matches = vm_uuid and server.inventory.get("host", {}).get("machine_uuid", "").lower() in forms
            if uuid_matches or (not vm_uuid and machine.id == known):
                candidates.append((server.last_heartbeat_at or now.replace(year=1970), machine, server))
        fresh = [
            (at, machine) for at, machine, server in candidates
            if health.heartbeat_age(server.last_heartbeat_at, now) <= 3 * self.env.heartbeat_interval
        ]
        if not fresh:
            where = "in the cloud" if self.side == "cloud" else "on-premises"
            raise Waiting(
                f"waiting for the agent of {item.name} {where} to register (VM uuid {vm_uuid or '?'})",
                delay=poll_delay(self.env),
            )
        machine = max(fresh, key=lambda pair: pair[0])[1]
        self.update(ctx, **{self.side: {"machine_id": machine.id}})
        ctx.progress(1.0, f"{item.name} {self.side}: agent {machine.server_id}")
        return {"machine_id": machine.id}


def onprem_site(env, store, item: ProtectedItemRecord) -> onprem_sites.OnpremSite:
    """The on-premises site a machine fails back to: the endpoint its reprotect chose, else where it came from."""
    return onprem_sites.site_for(env, store, item.details.get("onprem", {}), item.details.get(FAILBACK, {}).get("vcenter", ""))


def onprem_preflight(env, store, item: ProtectedItemRecord, wanted: str, route: dict, *, fresh: bool = False) -> dict:
    """The failback rules of DESIGN §1 (onprem.py); PreconditionFailed names the broken one and its fix.

    Run when a reprotect to on-premises is asked for, on what is known (so a
    refusal changes nothing), and again as the job's first step after claiming
    the machine, on the site as it is now (`fresh`).
    """
    site = onprem_sites.site_for(env, store, item.details.get("onprem", {}), route.get("vcenter", ""))
    master_target = store.get_server(route["master_target"])
    return site.preflight(item, wanted, master_target, route.get("datastore", ""), fresh=fresh)


def onprem_failback_rules(
    env, store, item: ProtectedItemRecord, wanted: str, master_target_id: str | None
) -> list[rules.Verdict]:
    """Every failback rule's verdict for the `local` provider, in order (`srctl doctor --machine` shows them all).

    `master_target_id` None: no master target is chosen yet, so the rule that
    needs one says so instead of guessing. (vSphere: `vsphere_rules.vsphere_failback_rules`.)
    """
    master_target = None
    if master_target_id:
        try:
            master_target = store.get_server(master_target_id)
        except errors.NotFound as exc:
            return [rules.Verdict("master target", "failed", exc.message, errors.PreconditionFailed(
                f"master target {master_target_id} of the failback route is not enrolled",
                hint="choose an enrolled master target (`srctl servers list`) with reprotect --master-target",
                code="master-target-not-found"))]
    return onprem_sites.local_failback_rules(env.local_sites().onprem, item, wanted, master_target)


class PreflightOnprem(ItemStep):
    """`onprem_preflight` again, on the site as it is now that the machine is this job's."""

    action = "preflight"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        return onprem_preflight(self.env, ctx.store, item, self.options.get("target", "original"),
                                item.details.get(FAILBACK, {}), fresh=True)


class PrepareOnpremTarget(ItemStep):
    """Name the on-premises disks the failback pairs write to: the original VM's, or a new VM's files."""

    action = "prepare target"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        preflight = ctx.outputs.get(f"{self.label}: preflight", {})
        master_target = ctx.store.get_server(item.details[FAILBACK]["master_target"])
        cloud_machine = ctx.store.get_machine(item.details["cloud"]["machine_id"])
        with onprem_site(self.env, ctx.store, item) as site:
            if preflight.get("target") == "original":
                vm_name = preflight["vm"]
                paths = site.original_targets(preflight, list(cloud_machine.disks), master_target)
                site.power_off(vm_name)
                site.before_overwrite(vm_name, ctx.job.id)
                targets = {disk: {"path": path, "delta": True} for disk, path in paths.items()}
            else:
                vm_name = self._new_name(site, item)
                made = item.details.get(FAILBACK, {}).get("new_vm", {})
                if made.get("name") != vm_name:  # recorded before it is made, so an undo finds it
                    self.update(ctx, failback={"new_vm": {"name": vm_name, "job": ctx.job.id}})
                paths = site.new_vm_targets(vm_name, preflight, list(cloud_machine.disks), master_target)
                targets = {disk: {"path": path, "delta": False} for disk, path in paths.items()}
        self.update(ctx, failback={"targets": targets, "vm": vm_name, "target": preflight.get("target", "new"),
                                   "preflight": preflight})
        return {"vm": vm_name, "targets": targets}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        """A new VM this job made goes again (the reprotect did not finish; the next one makes its own)."""
        made = item.details.get(FAILBACK, {}).get("new_vm", {})
        if made.get("job") == ctx.job.id and made.get("name"):
            with onprem_site(self.env, ctx.store, item) as site:
                site.discard_new_vm(made["name"])
            self.update(ctx, failback={"new_vm": {}})

    @staticmethod
    def _new_name(site: onprem_sites.OnpremSite, item: ProtectedItemRecord) -> str:
        existing = item.details.get(FAILBACK, {}).get("vm", "")
        if existing and item.details.get(FAILBACK, {}).get("target") != "original":
            return existing
        for candidate in (item.name, f"{item.name}-failback"):
            if not site.vm_exists(candidate):
                return candidate
        return f"{item.name}-failback-{item.id[-6:]}"


class RecoverOnprem(ItemStep):
    """Put every failback target back to the chosen point, in place (nothing to do for the latest).

    The pairs are paused; the master target writes the undo records newer than
    the point onto the disk itself (materialize.revert), so no second copy of the
    disk is made and the same works whatever the provider.
    """

    action = "recover disks"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        wanted = self.options.get("point", "latest")
        final = ctx.outputs.get(f"{self.label}: final point", {}).get("point", "")
        undone, points = 0, set()
        for pair in pairs_of(ctx.store, item, FAILBACK):
            point = "latest" if wanted in ("", "latest") else resolve_point(ctx, pair, wanted, self.options)
            if point == "latest":
                points.add(final or "latest")
                continue
            ctx.progress(0.5, f"putting {pair.disk_name} back to {point}")
            try:
                reply = replication.materialize_on_target(
                    ctx.store, self.env.master_target_credentials(), pair, point=point, in_place=True
                )
            except errors.PreconditionFailed as exc:
                if exc.code != "pair-not-paused":
                    raise
                # The pause reaches the master target with its next heartbeat.
                raise Waiting(f"waiting for the master target to pause {pair.disk_name}", delay=poll_delay(self.env)) from exc
            undone += reply.bytes_undone
            points.add(reply.tag_id or point)
        return {"point": ",".join(sorted(points)), "bytes_undone": undone}


class PowerOnOnprem(ItemStep):
    """Put recovered disks in place, define the VM when it is new, and power it on."""

    action = "power on"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        route = item.details.get(FAILBACK, {})
        name = route.get("vm", "")
        with onprem_site(self.env, ctx.store, item) as site:  # one vCenter login for the four calls
            if not site.vm_exists(name):
                site.define_vm(name, route.get("preflight", {}),
                               {disk: t["path"] for disk, t in route.get("targets", {}).items()})
            if not site.is_running(name):  # else an earlier run of this step started it already
                site.before_overwrite(name, ctx.job.id)
            vm = site.power_on(name)
        self.update(ctx, onprem={"vm": vm.vm, "vm_uuid": vm.vm_uuid, "provider": vm.provider, "vcenter": vm.vcenter})
        ctx.progress(1.0, f"VM {vm.vm} is on")
        return {"vm": vm.vm}


class ApplyNetwork(ItemStep):
    """Re-apply the static IP configuration recorded at protection time, through the on-premises agent.

    The agent writes the configuration for the guest's network system (see
    agents/source/netidentity/) and reports back. A failure does not undo the
    failback (the machine runs; its data is there): the step ends with the
    agent's reason, which the job and `failback-status` show, for a person to fix.
    """

    action = "apply network"
    TIMEOUT = 600.0

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        recorded = item.details.get("network") or {}
        if not recorded or not netidentity.from_dict(recorded).is_static:
            ctx.progress(1.0, "no static IP configuration was recorded: nothing to re-apply")
            return {"network": "dhcp"}
        order = item.details.get("network_order") or {}
        if order.get("job") != ctx.job.id:
            machine = ctx.store.get_machine(item.details["onprem"]["machine_id"])
            order = {
                "job": ctx.job.id,
                "order_id": f"net-{ctx.job.id[:8]}-{item.id[-8:]}",
                "server_id": machine.server_id,
                "identity": recorded,
                "status": "pending",
                "asked_at": self.env.clock().isoformat(),
            }
            self.update(ctx, network_order=order)
        if order["status"] == "pending":
            waited = (self.env.clock() - datetime.fromisoformat(order["asked_at"])).total_seconds()
            if waited > self.TIMEOUT:
                ctx.progress(1.0, f"the agent did not answer the network order in {waited:.0f} s; re-apply by hand")
                return {"network": "no answer"}
            raise Waiting(f"waiting for the agent to re-apply the network identity ({waited:.0f} s)", delay=poll_delay(self.env))
        if order["status"] == "ok":
            ctx.progress(1.0, f"static IP configuration re-applied: {order.get('message', '')}")
            return {"network": "ok", "files": order.get("files", [])}
        ctx.progress(1.0, f"static IP configuration NOT re-applied: {order.get('message', '')}; fix it by hand")
        return {"network": f"failed: {order.get('message', '')}"}
