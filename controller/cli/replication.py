"""srctl replication … and srctl recovery-points …"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from siterecovery.common import errors
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller.cli import completion, output
from siterecovery.controller.cli.output import Format, OutputOption
from siterecovery.controller.cli.session import call

replication_app = typer.Typer(
    help="Replicate machines' disks to a master target or to Azure page blobs, and watch it.", no_args_is_help=True
)
points_app = typer.Typer(help="Recovery points: list, take on demand, materialise, view.", no_args_is_help=True)

MODES = {"nbd": rpb.REPLICATION_MODE_NBD, "scan": rpb.REPLICATION_MODE_SCAN}
SYNC_KINDS = {"full": rpb.SYNC_KIND_FULL, "delta": rpb.SYNC_KIND_DELTA}
KINDS = {
    "crash-consistent": rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT,
    "app-consistent": rpb.RECOVERY_POINT_KIND_APP_CONSISTENT,
}
WAIT_POLL_SECONDS = 0.5


def _label(enum_type, value: int, prefix: str) -> str:
    return output.enum_label(enum_type.Name(value), prefix)


def _state_text(p: admin_pb2.PairView) -> str:
    state = _label(rpb.PairState, p.state, "PAIR_STATE_")
    if p.state == rpb.PAIR_STATE_INITIAL_SYNC:
        state += f" {p.sync_progress:.0%}"
    return state


def _sync_text(p: admin_pb2.PairView) -> str:
    """How the first sync runs and what it moved: "full, 1.0 GiB sent", "delta: 3.0 MiB of 40 GiB differ"."""
    if p.sync_kind != rpb.SYNC_KIND_DELTA:  # (a scan pair's first pass reports no bytes here)
        return f"full, {output.human_bytes(p.sync_sent_bytes)} sent" if p.sync_sent_bytes else "full"
    return (
        f"delta: {output.human_bytes(p.sync_differing_bytes)} of {output.human_bytes(p.sync_compared_bytes)} "
        f"differ, {output.human_bytes(p.sync_sent_bytes)} sent"
    )


def _pair_json(p: admin_pb2.PairView) -> dict:
    data = output.message_dict(p)
    data["state"] = _label(rpb.PairState, p.state, "PAIR_STATE_")
    data["desired_state"] = _label(rpb.PairDesiredState, p.desired_state, "PAIR_DESIRED_STATE_")
    data["mode"] = _label(rpb.ReplicationMode, p.mode, "REPLICATION_MODE_")
    data["sync_kind"] = "delta" if p.sync_kind == rpb.SYNC_KIND_DELTA else "full"
    data["rpo_seconds"] = p.rpo_seconds if p.rpo_known else None
    return data


def _print_pairs(pairs, output_format: Format) -> None:
    if output_format is not Format.table:
        output.emit(output_format, [_pair_json(p) for p in pairs])
        return
    output.print_table(
        "Replication",
        ["PAIR", "MACHINE", "DISK", "MODE", "STATE", "SYNC", "RPO", "SOURCE BACKLOG", "SPOOL BACKLOG", "THROUGHPUT",
         "POINTS", "REASON"],
        [
            [
                p.pair_id,
                p.machine_hostname or p.machine_id,
                f"{p.disk_name} ({output.human_bytes(p.disk_size_bytes)})",
                _label(rpb.ReplicationMode, p.mode, "REPLICATION_MODE_"),
                _state_text(p),
                _sync_text(p),
                output.age(p.rpo_seconds) if p.rpo_known else "unknown",
                output.human_bytes(p.source_backlog_bytes),
                output.human_bytes(p.spool_backlog_bytes),
                output.human_bytes(p.throughput_bytes_per_second) + "/s",
                p.recovery_points,
                p.reason or "-",
            ]
            for p in pairs
        ],
    )
    _print_open_views(pairs)


def _print_open_views(pairs) -> None:
    """A line per open point view: an administrator's test mount, forgotten, keeps the
    master target's undo journal from being pruned back to its point."""
    views = [(p, v) for p in pairs for v in p.open_views]
    if not views:
        return
    now = time.time()
    output.console.print("Open point views (each keeps its pair's undo journal back to its point; close it when done):")
    for p, v in views:
        machine = p.machine_hostname or p.machine_id
        opened = v.opened_at.seconds + v.opened_at.nanos / 1e9
        output.console.print(
            f"  {machine} {p.disk_name}: {v.view_id} at point {v.tag_id or 'latest'} (seq {v.seq}), "
            f"open {output.age(max(0.0, now - opened))}; close it with "
            f"`srctl recovery-points close-view {machine} --disk {p.disk_name} --view {v.view_id}`",
            soft_wrap=True,
        )


@replication_app.command("enable")
def enable(
    machine: Annotated[str, typer.Argument(help="host name or id of the machine", autocompletion=completion.machines)],
    disk: Annotated[list[str] | None, typer.Option("--disk", help="a disk to replicate (repeatable); default: all")] = None,
    process_server: Annotated[str, typer.Option(help="id or host name; default: the only one")] = "",
    master_target: Annotated[str, typer.Option(help="id or host name; default: the only one")] = "",
    datastore: Annotated[str, typer.Option(help="a datastore directory of the master target; default: its first")] = "",
    azure_site: Annotated[
        str, typer.Option(help="protect to this Azure site: the process server writes each disk into a page blob")
    ] = "",
    mode: Annotated[str, typer.Option(help="nbd (the source agent fronts the disk) or scan (periodic hash compare)")] = "nbd",
    group: Annotated[str, typer.Option(help="replication group for multi-VM-consistent points")] = "",
    crash_interval: Annotated[int, typer.Option(help="seconds between crash-consistent points")] = 0,
    app_interval: Annotated[int, typer.Option(help="seconds between app-consistent points")] = 0,
    retention: Annotated[int, typer.Option(help="seconds of recovery points to keep")] = 0,
    scan_interval: Annotated[int, typer.Option(help="scan mode: seconds between hash passes (default 300)")] = 0,
    sync: Annotated[str, typer.Option(
        help="full (copy every block) or delta (the target disk or page blob already holds an older copy: "
        "only the 64 KiB blocks that differ travel; nbd mode)")] = "full",
    target_path: Annotated[str, typer.Option(
        help="the target disk file (one disk): absolute, or relative to the datastore; "
        "default: <datastore>/<host>-<id>/<disk>.img. With --azure-site: the page blob, as the URL an "
        "earlier pair of the site showed (srctl replication status -o json) or a blob name in the site's "
        "container; default: <host>-<id>/<disk>.vhd")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait for the initial sync to finish")] = False,
    output_format: OutputOption = Format.table,
) -> None:
    """Start replicating a machine's disks: initial sync (full or delta), then every change."""
    if mode not in MODES:
        raise errors.InvalidInput(f"unknown mode {mode!r}", hint="use nbd or scan")
    if sync not in SYNC_KINDS:
        raise errors.InvalidInput(f"unknown sync kind {sync!r}", hint="use full or delta")
    response = call(
        "EnableReplication",
        admin_pb2.EnableReplicationRequest(
            machine=machine,
            disks=disk or [],
            process_server=process_server,
            master_target=master_target,
            datastore=datastore,
            azure_site=azure_site,
            mode=MODES[mode],
            group=group,
            policy=rpb.RecoveryPolicy(
                crash_consistent_interval_seconds=crash_interval,
                app_consistent_interval_seconds=app_interval,
                retention_window_seconds=retention,
            ),
            scan_interval_seconds=scan_interval,
            sync_kind=SYNC_KINDS[sync],
            target_path=target_path,
        ),
    )
    if wait:
        _wait_synced(machine, [p.pair_id for p in response.pairs], output_format)
        return
    _print_pairs(response.pairs, output_format)


def _wait_synced(machine: str, pair_ids: list[str], output_format: Format) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%  {task.fields[state]}"),
        disable=output_format is not Format.table,
    ) as bars:
        tasks: dict[str, int] = {}
        while True:
            pairs = [p for p in call("ListPairs", admin_pb2.ListPairsRequest(machine=machine)).pairs if p.pair_id in pair_ids]
            for p in pairs:
                if p.pair_id not in tasks:
                    tasks[p.pair_id] = bars.add_task(f"{p.disk_name}", total=1.0, state="")
                bars.update(tasks[p.pair_id], completed=p.sync_progress, state=_state_text(p))
            failed = [p for p in pairs if p.state == rpb.PAIR_STATE_ERROR]
            if failed:
                raise errors.PreconditionFailed(
                    f"replication of {failed[0].disk_name} failed: {failed[0].reason}", code=failed[0].reason_code or "pair-error"
                )
            if pairs and all(p.state == rpb.PAIR_STATE_REPLICATING for p in pairs):
                break
            time.sleep(WAIT_POLL_SECONDS)
    _print_pairs(pairs, output_format)


@replication_app.command("status")
def status(
    machine: Annotated[str, typer.Argument(help="host name or id; default: every machine")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Per pair: state (initial sync %, replicating, paused, error and why), RPO, backlogs, throughput."""
    _print_pairs(call("ListPairs", admin_pb2.ListPairsRequest(machine=machine)).pairs, output_format)


def _set_state(pair_id: str, state: int, output_format: Format) -> None:
    _print_pairs([call("SetPairState", admin_pb2.SetPairStateRequest(pair_id=pair_id, desired_state=state))], output_format)


@replication_app.command("pause")
def pause(pair_id: str, output_format: OutputOption = Format.table) -> None:
    """Stop shipping a pair's changes; the source keeps recording them."""
    _set_state(pair_id, rpb.PAIR_DESIRED_STATE_PAUSED, output_format)


@replication_app.command("resume")
def resume(pair_id: str, output_format: OutputOption = Format.table) -> None:
    """Ship a paused pair's changes again, from where it stopped."""
    _set_state(pair_id, rpb.PAIR_DESIRED_STATE_REPLICATING, output_format)


@replication_app.command("disable")
def disable(
    machine: str,
    disk: Annotated[list[str] | None, typer.Option("--disk", help="a disk (repeatable); default: all")] = None,
    output_format: OutputOption = Format.table,
) -> None:
    """Stop replicating. The target disk and its journal stay on the master target."""
    response = call("DisableReplication", admin_pb2.DisableReplicationRequest(machine=machine, disks=disk or []))
    if output_format is not Format.table:
        output.emit(output_format, [_pair_json(p) for p in response.pairs])
    else:
        for p in response.pairs:
            output.console.print(f"stopped replicating {p.disk_name} of {p.machine_hostname}; target kept at {p.target_path}")


# -- recovery points ------------------------------------------------------------------


def _point_row(v: admin_pb2.RecoveryPointView) -> list:
    p = v.point
    return [
        output.when(p.captured_at),
        v.disk_name,
        _label(rpb.RecoveryPointKind, p.kind, "RECOVERY_POINT_KIND_"),
        p.tag_id,
        output.human_bytes(p.journal_bytes_back),
        ("on demand " if p.on_demand else "") + p.note,
    ]


@points_app.command("list")
def points_list(
    machine: str,
    disk: Annotated[str, typer.Option(help="only this disk")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Recovery points, oldest first, with the journal bytes a rollback to each must read."""
    response = call("ListRecoveryPoints", admin_pb2.ListRecoveryPointsRequest(machine=machine, disk=disk))
    if output_format is not Format.table:
        rows = []
        for v in response.points:
            data = output.message_dict(v)
            data["point"]["kind"] = _label(rpb.RecoveryPointKind, v.point.kind, "RECOVERY_POINT_KIND_")
            rows.append(data)
        output.emit(output_format, rows)
        return
    output.print_table(
        f"Recovery points of {machine}", ["TIME", "DISK", "KIND", "TAG", "JOURNAL BACK", "NOTE"],
        [_point_row(v) for v in response.points],
    )


@points_app.command("create")
def points_create(
    machine: Annotated[str, typer.Argument(help="host name or id; or use --group")] = "",
    group: Annotated[str, typer.Option(help="every machine of this group gets the same multi-VM-consistent point")] = "",
    kind: Annotated[str, typer.Option(help="crash-consistent or app-consistent (runs the freeze/thaw scripts)")] = "crash-consistent",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the master target holds the point")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 120.0,
    output_format: OutputOption = Format.table,
) -> None:
    """Take a recovery point now."""
    if kind not in KINDS:
        raise errors.InvalidInput(f"unknown kind {kind!r}", hint="use crash-consistent or app-consistent")
    response = call(
        "CreateRecoveryPoint", admin_pb2.CreateRecoveryPointRequest(machine=machine, group=group, kind=KINDS[kind])
    )
    if not wait:
        if output_format is not Format.table:
            output.emit(output_format, {"tag_id": response.tag_id, "pair_ids": list(response.pair_ids)})
        else:
            output.console.print(f"asked for recovery point {response.tag_id}")
        return
    deadline = time.monotonic() + timeout
    machines = [machine] if machine else None
    while True:
        found = _points_with_tag(response, machines)
        if found is not None:
            break
        if time.monotonic() > deadline:
            raise errors.Unavailable(
                f"recovery point {response.tag_id} did not reach the master target within {timeout:.0f} s",
                hint="`srctl replication status` shows whether the pair is replicating; the point arrives once it is",
                code="point-timeout",
            )
        time.sleep(WAIT_POLL_SECONDS)
    if output_format is not Format.table:
        output.emit(output_format, [output.message_dict(v) for v in found])
    else:
        output.print_table(
            f"Recovery point {response.tag_id}", ["TIME", "DISK", "KIND", "TAG", "JOURNAL BACK", "NOTE"],
            [_point_row(v) for v in found],
        )


def _points_with_tag(response: admin_pb2.CreateRecoveryPointResponse, machines: list[str] | None):
    if machines is None:
        pairs = call("ListPairs", admin_pb2.ListPairsRequest()).pairs
        machines = sorted({p.machine_id for p in pairs if p.pair_id in response.pair_ids})
    found = []
    for m in machines:
        for v in call("ListRecoveryPoints", admin_pb2.ListRecoveryPointsRequest(machine=m)).points:
            if v.point.tag_id == response.tag_id and v.pair_id in response.pair_ids:
                found.append(v)
    return found if len({v.pair_id for v in found}) == len(response.pair_ids) else None


@points_app.command("materialize")
def points_materialize(
    machine: str,
    point: Annotated[str, typer.Option(help="a tag, latest, latest-crash-consistent, latest-app-consistent or latest-multi-vm-consistent")] = "latest",
    disk: Annotated[str, typer.Option(help="the disk, when the machine has several")] = "",
    output_path: Annotated[str, typer.Option("--output-path", help="file to write on the master target; default: beside the target disk")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Produce a target disk exactly as the source disk was at a recovery point."""
    response = call(
        "MaterializePoint",
        admin_pb2.MaterializePointRequest(machine=machine, disk=disk, point=point, output_path=output_path),
        timeout=3600,
    )
    r = response.result
    if output_format is not Format.table:
        output.emit(output_format, output.message_dict(response))
        return
    how = f"copied, {output.human_bytes(r.bytes_undone)} rolled back" if r.copied else "the target disk as it is, no copy"
    output.console.print(f"{r.path}  (point {r.tag_id or 'latest'}, seq {r.seq}; {how}) on master target {response.master_target_id}")


@points_app.command("open-view")
def points_open_view(
    machine: str,
    point: Annotated[str, typer.Option(help="a tag, latest, latest-crash-consistent, latest-app-consistent or latest-multi-vm-consistent")] = "latest",
    disk: Annotated[str, typer.Option(help="the disk, when the machine has several")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Serve a disk as it was at a recovery point as a read-only NBD export on its master target (no copy).

    Replication goes on meanwhile; the view keeps showing the point until `close-view`
    (or a restart of the master target)."""
    response = call(
        "OpenPointView",
        admin_pb2.OpenPointViewRequest(machine=machine, disk=disk, point=point),
        timeout=600,
    )
    v = response.view
    if output_format is not Format.table:
        output.emit(output_format, output.message_dict(response))
        return
    output.console.print(
        f"{v.nbd_uri}  (point {v.tag_id or 'latest'}, seq {v.seq}, {output.human_bytes(v.size_bytes)}; "
        f"{output.human_bytes(v.journal_bytes_read)} of undo journal read, {v.journal_records} records; "
        f"opened in {v.open_seconds:.2f} s) "
        f"on master target {response.master_target_id}; close it with "
        f"`srctl recovery-points close-view {machine} --view {v.view_id}`"
    )


@points_app.command("close-view")
def points_close_view(
    machine: str,
    view: Annotated[str, typer.Option(help="the view id open-view printed; empty: every view of the disk")] = "",
    disk: Annotated[str, typer.Option(help="the disk, when the machine has several")] = "",
    output_format: OutputOption = Format.table,
) -> None:
    """Close a point view (its NBD export goes away; the journal it kept may be pruned again)."""
    response = call(
        "ClosePointView",
        admin_pb2.ClosePointViewRequest(machine=machine, disk=disk, view_id=view),
        timeout=120,
    )
    if output_format is not Format.table:
        output.emit(output_format, output.message_dict(response))
        return
    closed = list(response.closed_view_ids)
    output.console.print(f"closed {len(closed)} view(s) of pair {response.pair_id}" + (": " + ", ".join(closed) if closed else ""))
