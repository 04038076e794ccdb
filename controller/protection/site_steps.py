"""The steps that act on the sites' VMs: recover disks, create, power and delete VMs.

They drive the `local` provider (controller/providers/local/); vSphere and
Azure implement the same operations against their APIs. Disks are always
recovered by the pair's master target (`Materialize`), so the undo journal is
the one source of recovery points whatever the provider.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from siterecovery.common import errors, netidentity
from siterecovery.common.logging import get_logger
from siterecovery.controller import health, replication
from siterecovery.controller.jobs.engine import StepContext, Waiting
from siterecovery.controller.protection import onprem as onprem_sites
from siterecovery.controller.protection import rules
from siterecovery.controller.protection.steps import (
    FAILBACK,
    FORWARD,
    ItemStep,
    materialize,
    pairs_of,
    poll_delay,
    remove_stale,
    resolve_point,
)
from siterecovery.controller.store.base import ProtectedItemRecord

log = get_logger(__name__)


class RecoverToCloud(ItemStep):
    """Materialise the chosen point of every forward pair as the cloud VM's own disk files."""

    action = "recover disks"

    def __init__(self, *args: Any, test: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test = test

    def vm_name(self, item: ProtectedItemRecord) -> str:
        return f"{item.name}-test" if self.test else item.name

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = self.env.local_sites().cloud
        name = self.vm_name(item)
        if cloud.get_vm(name) is not None:
            raise errors.Conflict(
                f"the cloud already has a VM {name}",
                hint="an earlier failover left it: `srctl machine delete-cloud-vm` (or remove it), then try again",
                code="vm-exists",
            )
        pairs = pairs_of(ctx.store, item, FORWARD)
        if not pairs:
            raise errors.PreconditionFailed(f"{item.name} has no replicated disks", code="no-pairs")
        wanted = self.options.get("point", "latest")
        disks, points = {}, set()
        for index, pair in enumerate(pairs):
            point = self._point(ctx, item, pair, wanted)
            output = cloud.vm_dir(name) / f"{pair.disk_name}.img"
            remove_stale(output)  # left by an earlier run of this step that did not finish
            ctx.progress(index / len(pairs), f"recovering {pair.disk_name} at {point}")
            recovered = materialize(self.env, ctx, pair, point, output)
            disks[pair.disk_name] = recovered.path
            points.add(recovered.point)
        return {"disks": disks, "point": ",".join(sorted(points)) or wanted}

    def _point(self, ctx: StepContext, item: ProtectedItemRecord, pair, wanted: str) -> str:
        if wanted in ("", "latest"):
            final = item.details.get("final_point", {})
            if final.get("job") == ctx.job.id and any(
                p.tag_id == final.get("tag") for p in replication.points(ctx.store, pair)
            ):
                return "latest"
        return resolve_point(ctx, pair, wanted, self.options)

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        cloud = self.env.local_sites().cloud
        if cloud.get_vm(self.vm_name(item)) is None:  # disks only: the VM was never defined
            shutil.rmtree(cloud.vm_dir(self.vm_name(item)), ignore_errors=True)


class CreateCloudVm(ItemStep):
    """Define the cloud VM over the recovered disks and power it on (its agent starts)."""

    action = "create VM"

    def __init__(self, *args: Any, test: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test = test

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = self.env.local_sites().cloud
        recovered = ctx.outputs.get(f"{self.label}: recover disks", {})
        name = f"{item.name}-test" if self.test else item.name
        vm = cloud.define_vm(
            name,
            {disk: Path(path) for disk, path in recovered.get("disks", {}).items()},
            network="isolated" if self.test else "production",
        )
        vm = cloud.power_on(name, self.env.launch())
        if self.test:
            self.update(ctx, test={"vm": vm.name, "vm_uuid": vm.uuid, "point": recovered.get("point", "")})
        else:
            self.update(ctx, cloud={"provider": "local", "vm": vm.name, "vm_uuid": vm.uuid, "machine_id": ""})
        ctx.progress(1.0, f"VM {vm.name} is on in the {'isolated' if self.test else 'production'} network")
        return {"vm": vm.name, "point": recovered.get("point", "")}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        name = f"{item.name}-test" if self.test else item.name
        self.env.local_sites().cloud.delete_vm(name)


def retire_agents(ctx: StepContext, vm_uuid: str, now) -> list[str]:
    """Revoke the agents of a VM that is gone: their certificates die with it (`srctl servers list --all`)."""
    retired = []
    for server in ctx.store.list_servers(role="source"):
        if vm_uuid and server.revoked_at is None and server.inventory.get("host", {}).get("machine_uuid") == vm_uuid:
            ctx.store.revoke_server(server.id, now=now)
            retired.append(server.id)
    return retired


class DeleteTestVm(ItemStep):
    action = "delete test VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        test = item.details.get("test", {})
        if test.get("vm"):
            self.env.local_sites().cloud.delete_vm(test["vm"])
        retired = retire_agents(ctx, test.get("vm_uuid", ""), self.env.clock())
        self.update(ctx, test={"vm": "", "vm_uuid": "", "point": ""})
        return {"deleted": test.get("vm", ""), "retired_agents": retired}


class DeleteCloudVm(ItemStep):
    """Delete the cloud VM left behind by a failback (its disks go with it; the replicas stay)."""

    action = "delete cloud VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = item.details.get("cloud", {})
        if cloud.get("vm"):
            self.env.local_sites().cloud.delete_vm(cloud["vm"])
        retired = retire_agents(ctx, cloud.get("vm_uuid", ""), self.env.clock())
        self.update(ctx, cloud={"vm": "", "vm_uuid": "", "machine_id": ""})
        return {"deleted": cloud.get("vm", ""), "retired_agents": retired}


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
    """Power off the cloud VM (Azure: power off, then deallocate)."""

    action = "shut down cloud VM"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        name = item.details.get("cloud", {}).get("vm", "")
        if name:
            self.env.local_sites().cloud.power_off(name)
        return {"shut_down": name}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        name = ctx.output.get("shut_down", "")
        if name:
            self.env.local_sites().cloud.power_on(name, self.env.launch())


class FindAgent(ItemStep):
    """Wait until the agent of the VM on one side has registered and heartbeats; record its machine."""

    action = "find agent"

    def __init__(self, *args: Any, side: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.side = side  # "cloud" or "onprem"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        vm_uuid = item.details.get(self.side, {}).get("vm_uuid", "")
        known = item.details.get(self.side, {}).get("machine_id", "")
        now = self.env.clock()
        candidates = []
        for machine in ctx.store.list_machines():
            server = ctx.store.get_server(machine.server_id)
            if server.revoked_at is not None:
                continue
            uuid_matches = vm_uuid and server.inventory.get("host", {}).get("machine_uuid", "") == vm_uuid
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
        site = onprem_site(self.env, ctx.store, item)
        master_target = ctx.store.get_server(item.details[FAILBACK]["master_target"])
        cloud_machine = ctx.store.get_machine(item.details["cloud"]["machine_id"])
        if preflight.get("target") == "original":
            vm_name = preflight["vm"]
            paths = site.original_targets(preflight, list(cloud_machine.disks), master_target)
            site.power_off(vm_name)
            site.before_overwrite(vm_name, ctx.job.id)
            targets = {disk: {"path": path, "delta": True} for disk, path in paths.items()}
        else:
            vm_name = self._new_name(site, item)
            paths = site.new_vm_targets(vm_name, preflight, list(cloud_machine.disks), master_target)
            targets = {disk: {"path": path, "delta": False} for disk, path in paths.items()}
        self.update(ctx, failback={"targets": targets, "vm": vm_name, "target": preflight.get("target", "new"),
                                   "preflight": preflight})
        return {"vm": vm_name, "targets": targets}

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
        site = onprem_site(self.env, ctx.store, item)
        route = item.details.get(FAILBACK, {})
        name = route.get("vm", "")
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
