"""The steps of the protection workflows, one protected machine at a time.

Every step names its machine (`item_id`) and reads where the machine stands
from the store each time it runs, so it can run again after a crash, a lost
lease or a restart of the configuration server and find its own earlier work:
pairs that exist are reused, a VM that is defined is not defined again, a point
that was asked for is waited for rather than asked for twice.

Compensation: the first step of a machine (`Claim`) moved it into its workflow's
busy state with the job's id; compensating it moves it back to where it
started. A machine whose workflow finished (`Finish` ran) is never undone by a
later failure of the same job (a recovery plan's next machine): in a disaster a
failed-over machine stays failed over, and the plan can be run again for the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from siterecovery.common import errors
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller import health, replication
from siterecovery.controller.jobs.engine import Step, StepContext, Waiting
from siterecovery.controller.protection import lifecycle
from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.store.base import PairRecord, ProtectedItemRecord, Store

log = get_logger(__name__)

FORWARD = "forward"
FAILBACK = "failback"
BOTH = "both"  # RemovePairs: the pairs of either direction
POLL = 2.0


def poll_delay(env: Environment) -> float:
    """How long a step that waits for what agents report (a sync, a point, a registration,
    a network order's result) waits before it looks again: one heartbeat interval, since
    nothing they report arrives sooner, and at most POLL. In production (10 s heartbeats)
    that is POLL; with the tests' short heartbeats a workflow no longer idles for seconds
    after what it waits for has arrived."""
    return min(POLL, env.heartbeat_interval)


# --- reading and changing a protected machine ------------------------------------------


def change(store: Store, item_id: str, now: Any, mutate) -> ProtectedItemRecord:
    """Apply `mutate(item) -> dict of changes` with compare-and-set, re-reading on a race."""
    for _ in range(50):
        item = store.get_protected_item(item_id)
        changes = mutate(item)
        if not changes:
            return item
        updated = store.update_protected_item(item.id, expected_version=item.version, now=now, **changes)
        if updated is not None:
            return updated
    raise errors.Unavailable(f"protected machine {item_id} keeps changing", code="item-busy")


def with_details(item: ProtectedItemRecord, **parts: Any) -> dict:
    details = dict(item.details)
    for key, value in parts.items():
        if isinstance(value, dict) and isinstance(details.get(key), dict):
            details[key] = {**details[key], **value}
        else:
            details[key] = value
    return details


def pairs_of(store: Store, item: ProtectedItemRecord, direction: str) -> list[PairRecord]:
    wanted = set(item.details.get("pairs", {}).get(direction, []))
    return [p for p in store.list_pairs() if p.id in wanted]


# --- the base ---------------------------------------------------------------------------


class ItemStep(Step):
    """A step of one machine's workflow. Subclasses set `action` and implement `run`."""

    action = ""

    def __init__(self, env: Environment, workflow: str, item_id: str, label: str, options: dict) -> None:
        self.env = env
        self.workflow = workflow
        self.move = lifecycle.move(workflow)
        self.item_id = item_id
        self.label = label
        self.options = options
        self.name = f"{label}: {self.action}"

    def execute(self, ctx: StepContext) -> dict | None:
        item = ctx.store.get_protected_item(self.item_id)
        if item.details.get("job") != ctx.job.id and self.action != "claim":
            raise errors.Conflict(
                f"{item.name} is now handled by job {item.details.get('job')}",
                hint="`srctl jobs show` that job", code="item-taken",
            )
        return self.run(ctx, item)

    def compensate(self, ctx: StepContext) -> None:
        try:
            item = ctx.store.get_protected_item(self.item_id)
        except errors.NotFound:
            return
        if item.details.get("job") != ctx.job.id or item.state == self.move.done:
            return  # never ours, or finished: it stays where its workflow took it
        self.undo(ctx, item)

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict | None:
        raise NotImplementedError

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        """Undo this step's effect on a machine whose workflow did not finish. Default: nothing."""

    def update(self, ctx: StepContext, **parts: Any) -> ProtectedItemRecord:
        return change(ctx.store, self.item_id, self.env.clock(), lambda item: {"details": with_details(item, **parts)})


class Claim(ItemStep):
    """Move the machine into the workflow's busy state, recording this job as its owner."""

    action = "claim"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        if item.details.get("job") == ctx.job.id and item.state in (self.move.busy, self.move.done):
            return {"from": item.details.get("started_from", "")}
        if self.workflow == "protect":
            if item.state != lifecycle.PROTECTING or item.details.get("job") not in ("", None, ctx.job.id):
                raise errors.Conflict(f"{item.name} is being protected by another job", code="item-taken")
        else:
            lifecycle.check_can_start(self.workflow, item.name, item.state)
        started_from = item.state
        updated = ctx.store.update_protected_item(
            item.id,
            expected_version=item.version,
            now=self.env.clock(),
            state=self.move.busy,
            details=with_details(item, job=ctx.job.id, started_from=started_from, workflow=self.workflow),
        )
        if updated is None:
            raise errors.Unavailable(f"{item.name} changed while this job started", code="item-busy")
        ctx.progress(1.0, f"{item.name}: {started_from} → {self.move.busy}")
        return {"from": started_from}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        if self.workflow == "protect":
            for pair in pairs_of(ctx.store, item, FORWARD):
                ctx.store.delete_pair(pair.id)
            ctx.store.remove_protected_item(item.id)
            return
        back = item.details.get("started_from") or next(iter(self.move.start))
        change(ctx.store, item.id, self.env.clock(), lambda current: {"state": back})


class Finish(ItemStep):
    """Move the machine into the workflow's done state (and its group, for a reprotect)."""

    action = "finish"

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        group_id = None
        if self.workflow in ("reprotect-to-onprem", "reprotect-to-cloud"):
            group_id = _group_for(ctx.store, item, to_twin=self.workflow == "reprotect-to-onprem")
        mine = {n: o for n, o in ctx.outputs.items() if n.startswith(self.label + ": ")}
        record = {
            "workflow": self.workflow,
            "job": ctx.job.id,
            "at": self.env.clock().isoformat(),
            "seconds": round((self.env.clock() - ctx.job.created_at).total_seconds(), 3),
            "bytes_moved": sum(int(o.get("bytes_moved", 0)) for o in mine.values()),
            # The point the disks were recovered at; else the first one a step named (a final point).
            "point": mine.get(f"{self.label}: recover disks", {}).get("point")
            or next((o["point"] for o in mine.values() if o.get("point")), ""),
        }
        history = [*list(item.details.get("history", []))[-19:], record]
        changes: dict[str, Any] = {"state": self.move.done, "details": with_details(item, history=history)}
        if group_id:
            changes["group_id"] = group_id
        if item.state != self.move.done:
            updated = ctx.store.update_protected_item(
                item.id, expected_version=item.version, now=self.env.clock(), **changes
            )
            if updated is None:
                raise errors.Unavailable(f"{item.name} changed meanwhile", code="item-busy")
        ctx.progress(1.0, f"{item.name} is {self.move.done}")
        return {"state": self.move.done}


class Forget(ItemStep):
    """The last step of `unprotect`: the machine is no protected machine any more.

    Its pairs are gone already (RemovePairs); the replicas, journals and any
    cloud VM stay where they are, and the step's output names them. Running it
    again after a crash finds the record gone and is done.
    """

    action = "forget"

    def execute(self, ctx: StepContext) -> dict | None:
        try:
            return super().execute(ctx)
        except errors.NotFound:  # removed by this step before a restart
            ctx.progress(1.0, f"{self.label} is no longer protected")
            return {"removed": True}

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        cloud = item.details.get("cloud", {})
        kept = {
            "replicas": dict(cloud.get("replicas", {})),
            "cloud_vm": cloud.get("vm", ""),
        }
        ctx.store.remove_protected_item(item.id)
        stays = [f"replica of {disk}: {path}" for disk, path in sorted(kept["replicas"].items())]
        if kept["cloud_vm"]:
            stays.append(f"cloud VM {kept['cloud_vm']}")
        ctx.progress(1.0, f"{item.name} is no longer protected" + ("; kept " + "; ".join(stays) if stays else ""))
        return {"removed": True, **kept}


def _group_for(store: Store, item: ProtectedItemRecord, *, to_twin: bool) -> str:
    current = store.get_protection_group(item.group_id)
    if to_twin:
        if current.failback_of:
            return current.id
        twins = [g for g in store.list_protection_groups() if g.failback_of == current.id]
        if not twins:
            raise errors.PreconditionFailed(f"group {current.name} has no failback twin", code="no-failback-group")
        return twins[0].id
    return current.failback_of or current.id


# --- pairs ------------------------------------------------------------------------------


class CreatePairs(ItemStep):
    """Create the machine's pairs for one direction (or find the ones an earlier run created)."""

    action = "create pairs"

    def __init__(self, *args: Any, direction: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direction = direction

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        route = item.details.get(self.direction, {})
        source_machine = (
            item.details.get("onprem", {}).get("machine_id")
            if self.direction == FORWARD
            else item.details.get("cloud", {}).get("machine_id")
        )
        if not source_machine:
            raise errors.PreconditionFailed(f"{item.name} has no running agent to replicate from", code="no-agent")
        existing = [p for p in ctx.store.list_pairs(machine_id=source_machine)]
        mine = [p for p in existing if p.id in item.details.get("pairs", {}).get(self.direction, [])]
        if mine:
            return {"pairs": [p.id for p in mine]}
        if existing:
            raise errors.Conflict(
                f"the disks of {item.name} are already replicated elsewhere",
                hint="`srctl replication status` shows the pairs; disable them first",
                code="pair-exists",
            )
        # The pairs belong to the group the machine is entering (its policy, its multi-VM points):
        # the _Failback twin for a reprotect to on-premises, the primary again for one to the cloud.
        group_id = item.group_id
        if self.workflow in ("reprotect-to-onprem", "reprotect-to-cloud"):
            group_id = _group_for(ctx.store, item, to_twin=self.workflow == "reprotect-to-onprem")
        group = ctx.store.get_protection_group(group_id)
        targets: dict = route.get("targets", {})
        if self.direction == FORWARD and not targets:
            # Back to the cloud after a failback: onto the replicas the first protection
            # made, comparing blocks, so only what changed since travels.
            targets = {disk: {"path": path, "delta": True}
                       for disk, path in item.details.get("cloud", {}).get("replicas", {}).items()}
        created: list[PairRecord] = []
        machine = ctx.store.get_machine(source_machine)
        disks = [d.get("name") for d in machine.disks]
        for disk in disks:
            request = admin_pb2.EnableReplicationRequest(
                machine=source_machine,
                disks=[disk],
                process_server=route.get("process_server", ""),
                master_target=route.get("master_target", ""),
                datastore=route.get("datastore", ""),
                # Forward to Azure: page blobs of the site's storage account (the replica blob
                # of each disk, named by the first protection, is `target_path` for a delta).
                azure_site=route.get("azure_site", ""),
                mode=rpb.REPLICATION_MODE_NBD,
                group=group.name,
                policy=rpb.RecoveryPolicy(**{k: v for k, v in group.policy.items() if k in replication.DEFAULT_POLICY}),
            )
            target = targets.get(disk)
            if target:
                request.target_path = target["path"]
                request.sync_kind = rpb.SYNC_KIND_DELTA if target.get("delta") else rpb.SYNC_KIND_FULL
            created += replication.enable(ctx.store, request, now=self.env.clock())
        ids = [p.id for p in created]
        if self.direction == FORWARD:
            self.update(ctx, pairs={FORWARD: ids}, cloud={"replicas": {p.disk_name: p.target_path for p in created}})
        else:
            self.update(ctx, pairs={self.direction: ids})
        ctx.progress(1.0, f"{len(ids)} pair(s) {self.direction}: " + ", ".join(f"{p.disk_name} → {p.target_path}" for p in created))
        return {"pairs": ids}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        for pair in pairs_of(ctx.store, item, self.direction):
            ctx.store.delete_pair(pair.id)
        self.update(ctx, pairs={self.direction: []})


class Sync(ItemStep):
    """Wait until every pair of the direction finished its first sync; report the bytes it moved."""

    action = "initial sync"

    def __init__(self, *args: Any, direction: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direction = direction

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        pairs = pairs_of(ctx.store, item, self.direction)
        if not pairs:
            raise errors.PreconditionFailed(f"{item.name} has no {self.direction} pairs", code="no-pairs")
        views = replication.views(ctx.store, pairs, heartbeat_interval=self.env.heartbeat_interval, now=self.env.clock())
        done = sum(v.sync_done_bytes for v in views)
        total = sum(v.sync_total_bytes or v.disk_size_bytes for v in views)
        waiting = [v for v in views if v.state != rpb.PAIR_STATE_REPLICATING]
        if waiting:
            reasons = "; ".join(f"{v.disk_name}: {v.reason}" for v in waiting if v.reason)
            raise Waiting(
                f"initial sync {done * 100 // max(total, 1)} % ({done} of {total} bytes)" + (f" — {reasons}" if reasons else ""),
                delay=poll_delay(self.env),
                progress=min(done / max(total, 1), 0.99),
            )
        moved = sum(v.applied_bytes_total for v in views)
        ctx.progress(1.0, f"in sync; {moved} bytes moved for {sum(v.disk_size_bytes for v in views)} bytes of disk")
        return {"bytes_moved": moved}


class RemovePairs(ItemStep):
    """Delete the machine's pairs of one direction (BOTH: either): the agents forget them; target files stay."""

    action = "remove pairs"

    def __init__(self, *args: Any, direction: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directions = (FORWARD, FAILBACK) if direction == BOTH else (direction,)

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        removed = []
        for direction in self.directions:
            for pair in pairs_of(ctx.store, item, direction):
                ctx.store.delete_pair(pair.id)
                removed.append(pair.id)
        self.update(ctx, pairs={direction: [] for direction in self.directions})
        return {"removed": removed}


class PausePairs(ItemStep):
    """Pause the direction's pairs: the master target accepts nothing more, so its disks hold still."""

    action = "pause pairs"

    def __init__(self, *args: Any, direction: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direction = direction

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        for pair in pairs_of(ctx.store, item, self.direction):
            if pair.desired_state != "paused":
                ctx.store.set_pair_desired_state(pair.id, "paused", now=self.env.clock())
        return {}

    def undo(self, ctx: StepContext, item: ProtectedItemRecord) -> None:
        for pair in pairs_of(ctx.store, item, self.direction):
            ctx.store.set_pair_desired_state(pair.id, "replicating", now=self.env.clock())


class FinalPoint(ItemStep):
    """Take one more crash-consistent point on a running source and wait for it at the target.

    Best effort, as an unplanned failover must be: when the source's agent is
    silent (before the point is asked for, or it falls silent while the point
    is awaited — the site going down), or the point does not arrive within the
    timeout, the workflow goes on with what the target holds and says so.
    """

    action = "final point"

    def __init__(self, *args: Any, direction: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direction = direction

    def run(self, ctx: StepContext, item: ProtectedItemRecord) -> dict:
        pairs = pairs_of(ctx.store, item, self.direction)
        if not pairs:
            return {"point": ""}
        now = self.env.clock()
        source = ctx.store.get_server(pairs[0].source_server_id)
        silent = health.heartbeat_age(source.last_heartbeat_at, now) > 3 * self.env.heartbeat_interval
        asked = item.details.get("final_point", {})
        if asked.get("job") != ctx.job.id:
            if silent:
                held = self._drain(ctx, item, pairs, now)
                ctx.progress(1.0, "the source is silent: no final point; the target's latest data is used" + held)
                return {"point": ""}
            tag_id, _ = replication.request_point(
                ctx.store, machine=pairs[0].machine_id, group="", kind=rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT,
                now=now, heartbeat_interval=self.env.heartbeat_interval,
            )
            self.update(ctx, final_point={"job": ctx.job.id, "tag": tag_id, "asked_at": now.isoformat()})
            asked = {"tag": tag_id, "asked_at": now.isoformat()}
        tag = asked["tag"]
        if all(any(p.tag_id == tag for p in replication.points(ctx.store, pair)) for pair in pairs):
            ctx.progress(1.0, f"final point {tag} is at the target")
            return {"point": tag}
        if silent:  # it died after we asked (the site going down): the point will not come
            held = self._drain(ctx, item, pairs, now)
            ctx.progress(1.0, f"the source went silent before final point {tag} arrived; the target's latest "
                              "data is used" + held)
            return {"point": ""}
        waited = (now - datetime.fromisoformat(asked["asked_at"])).total_seconds()
        if waited > self.env.final_point_timeout:
            ctx.progress(1.0, f"final point {tag} did not arrive in {waited:.0f} s; the target's latest data is used")
            return {"point": ""}
        raise Waiting(f"waiting for the final point {tag} to reach the target ({waited:.0f} s)", delay=poll_delay(self.env))

    def _drain(self, ctx: StepContext, item: ProtectedItemRecord, pairs: list[PairRecord], now: datetime) -> str:
        """With the source gone, let the process server pass on what its spool holds before the pairs
        pause: those writes were acknowledged to the source, and "latest" must hold them. Returns ""
        once nothing is held, or why something stays behind (the process server is silent too, or the
        timeout passed); raises Waiting meanwhile."""
        views = replication.views(ctx.store, pairs, heartbeat_interval=self.env.heartbeat_interval, now=now)
        held = sum(v.spool_backlog_frames for v in views)
        if not held:
            return ""
        server = ctx.store.get_server(pairs[0].process_server_id)
        if health.heartbeat_age(server.last_heartbeat_at, now) > 3 * self.env.heartbeat_interval:
            return f"; the process server is silent too, and {held} write(s) it held are not in it"
        draining = item.details.get("draining", {})
        if draining.get("job") != ctx.job.id:
            draining = {"job": ctx.job.id, "since": now.isoformat()}
            self.update(ctx, draining=draining)
        waited = (now - datetime.fromisoformat(draining["since"])).total_seconds()
        if waited > self.env.final_point_timeout:
            return f"; {held} write(s) the process server still held after {waited:.0f} s are not in it"
        raise Waiting(f"the source is silent; waiting for the process server to pass on the {held} write(s) "
                      f"it holds ({waited:.0f} s)", delay=poll_delay(self.env))


# --- helpers for recovering disks -----------------------------------------------------------


MULTI_VM = "latest-multi-vm-consistent"


def resolve_point(ctx: StepContext, pair: PairRecord, wanted: str, options: dict | None = None) -> str:
    """The tag id `wanted` names for this pair, or "latest".

    The latest multi-VM-consistent point is the one pinned for the pair's group
    when the job was asked for (`common_multi_vm_points`), so every machine of the
    group recovers at the same cut even if a newer one reaches some pairs meanwhile.
    """
    pinned = (options or {}).get("multi_vm_points", {})
    if wanted == MULTI_VM and pair.group_id in pinned:
        return pinned[pair.group_id]
    chosen = replication.choose_point(replication.points(ctx.store, pair), wanted or "latest")
    return chosen.tag_id if chosen is not None else "latest"


def common_multi_vm_points(points_by_pair: list[tuple[PairRecord, list[rpb.RecoveryPoint]]]) -> dict[str, str]:
    """Per pair group, the newest multi-VM-consistent tag every pair of the group holds.

    PreconditionFailed names a group whose pairs have none in common (a barrier
    some pair has not received yet, or the group never took one).
    """
    by_group: dict[str, list[list[rpb.RecoveryPoint]]] = {}
    for pair, points in points_by_pair:
        mvc = [p for p in points if p.kind == rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT]
        by_group.setdefault(pair.group_id, []).append(mvc)
    chosen: dict[str, str] = {}
    for group, lists in sorted(by_group.items()):
        common = set.intersection(*(set(p.tag_id for p in points) for points in lists))
        newest = next((p.tag_id for p in reversed(lists[0]) if p.tag_id in common), None)
        if newest is None:
            raise errors.PreconditionFailed(
                f"the disks of group {group or '(none)'} have no multi-VM-consistent point in common",
                hint=f"take one with `srctl recovery-points create --group {group}`, wait until every "
                "pair holds it, then retry (or choose another point)",
                code="no-common-multi-vm-point",
            )
        chosen[group] = newest
    return chosen


@dataclass(frozen=True)
class Recovered:
    disk: str
    path: str
    point: str
    seq: int


def materialize(env: Environment, ctx: StepContext, pair: PairRecord, point: str, output: Path) -> Recovered:
    reply = replication.materialize_on_target(
        ctx.store, env.master_target_credentials(), pair, point=point, output_path=str(output)
    )
    return Recovered(pair.disk_name, reply.path, reply.tag_id or point, reply.seq)


def remove_stale(path: Path) -> None:
    """A partial file left by a materialisation that died with its master target."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

