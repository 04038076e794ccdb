"""Replication pairs: creating them, telling agents about them, and what their reports add up to.

The controller holds the desired state (the `pairs` rows) and every agent of a
pair converges on it: each registration and heartbeat response carries the
complete list of the agent's pairs (`assignments_for`). Agents report their view
of each pair with every heartbeat (`record_reports`); `view` combines the three
reports into what `srctl replication status` shows: state, sync progress, RPO,
backlog at the source and in the spool, throughput.

RPO is the age of the oldest write not yet applied at the target, as of the
reports: for the source and the process server, the time of its report less
the `oldest_pending_captured_at` it reported; the larger of the two. Counting
from the report, not from now, is what a heartbeat can know: from now, a
steady write load read 0 to 10 s high by when in the 10 s heartbeat interval
one looked (a sawtooth of the heartbeat, not of replication). A stalled
pipeline still shows: each report's oldest pending write is older. A report
older than `STALE_INTERVALS` heartbeats counts from now (its agent is silent;
the write it named may still be pending, and the RPO grows by the second).
With nothing pending anywhere it is zero, as long as both reported recently;
when one of them is silent and reported nothing pending the RPO is unknown,
because writes may be piling up where we cannot see them.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import PurePosixPath

import grpc

from siterecovery.common import errors, pki
from siterecovery.common.azure.site import AzureSite
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import admin_pb2, common_pb2, dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller.convert import from_dict, timestamp, to_dict
from siterecovery.controller.store.base import (
    BARRIER_ABORTED,
    BARRIER_COMMITTED,
    BARRIER_WAIT,
    AzureSiteRecord,
    MachineRecord,
    PairRecord,
    PairReport,
    ServerRecord,
    Store,
    TagRequestRecord,
)

DEFAULT_POLICY = {
    "crash_consistent_interval_seconds": 300,
    "app_consistent_interval_seconds": 3600,
    "retention_window_seconds": 86400,
    "rpo_threshold_seconds": 900,
}
DEFAULT_SCAN_INTERVAL_SECONDS = 300
MIN_SCAN_INTERVAL_SECONDS = 10
# Stored in the pair's policy document beside the RecoveryPolicy fields.
SCAN_INTERVAL_KEY = "scan_interval_seconds"
STALE_INTERVALS = 3
TAG_REQUEST_LIFETIME = timedelta(minutes=10)
# A multi-VM barrier: sources hold writes at cut_at, which leaves every source
# time to hear of it (two heartbeats and a second); if they do not all hold
# within BARRIER_TIMEOUT after it, the point is abandoned and writes go on.
BARRIER_LEAD_HEARTBEATS = 2
BARRIER_TIMEOUT = timedelta(seconds=15)
MAX_PAIRS_PER_REPORT = 4096
# `views` of more pairs than this reads every pair's reports in one query.
FEW_PAIRS = 8
# PairRecord.target_kind values (store/base.py PAIR_TARGET_KINDS).
TARGET_MT, TARGET_AZURE = "master-target", "azure-page-blob"
TARGET_KINDS = {TARGET_MT: rpb.TARGET_KIND_MASTER_TARGET, TARGET_AZURE: rpb.TARGET_KIND_AZURE_PAGE_BLOB}
# Page blobs hold whole 512-byte pages.
PAGE = 512

MODES = {rpb.REPLICATION_MODE_NBD: "nbd", rpb.REPLICATION_MODE_SCAN: "scan"}
MODE_VALUES = {v: k for k, v in MODES.items()}
SYNC_KINDS = {rpb.SYNC_KIND_FULL: "full", rpb.SYNC_KIND_DELTA: "delta"}
SYNC_KIND_VALUES = {v: k for k, v in SYNC_KINDS.items()}
MAX_PATH = 4096
# Azure's limit on a blob name.
MAX_BLOB_NAME = 1024
DESIRED = {rpb.PAIR_DESIRED_STATE_REPLICATING: "replicating", rpb.PAIR_DESIRED_STATE_PAUSED: "paused"}
DESIRED_VALUES = {v: k for k, v in DESIRED.items()}
KINDS = {
    rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT: "crash-consistent",
    rpb.RECOVERY_POINT_KIND_APP_CONSISTENT: "app-consistent",
    rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT: "multi-vm-consistent",
}
KIND_VALUES = {v: k for k, v in KINDS.items()}
LATEST_OF_KIND = {
    "latest-crash-consistent": None,  # any point: every point is at least crash-consistent
    "latest-app-consistent": rpb.RECOVERY_POINT_KIND_APP_CONSISTENT,
    "latest-multi-vm-consistent": rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT,
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROLE_PROTO = {pki.SOURCE: "source", pki.PROCESS_SERVER: "process-server", pki.MASTER_TARGET: "master-target"}


# -- finding things by what users type ---------------------------------------------


def resolve_machine(store: Store, ref: str) -> MachineRecord:
    """A machine by id, else by host name (which must then be unambiguous).

    A machine whose source agent was removed (its certificate revoked) is no
    machine of this site any more (`ListMachines` leaves it out): its name
    does not count, so the same machine enrolled again (say, after a failback)
    is found by its name alone. Its id still names it."""
    if not ref:
        raise errors.InvalidInput("no machine given", hint="name it by host name or id (`srctl machines list`)")
    try:
        return store.get_machine(ref)
    except errors.NotFound:
        pass
    named = [m for m in store.list_machines() if m.hostname == ref]
    removed = set(store.revoked_server_ids()) if named else set()
    found = [m for m in named if m.server_id not in removed]
    if len(found) == 1:
        return found[0]
    if found:
        raise errors.Conflict(
            f"{len(found)} machines are called {ref!r}",
            hint="name it by id: " + ", ".join(m.id for m in found),
            code="machine-ambiguous",
        )
    if named:
        raise errors.NotFound(
            f"the machine called {ref!r} was removed (its source agent's certificate is revoked)",
            hint="enroll its source agent again (a new identity); `srctl servers list --all` shows removed servers",
            code="machine-not-found",
        )
    raise errors.NotFound(
        f"no machine is called {ref!r}",
        hint="`srctl machines list` shows the machines whose source agent registered",
        code="machine-not-found",
    )


def resolve_server(store: Store, ref: str, role: str) -> ServerRecord:
    """A server of `role` by id or host name; with no name, the only one there is."""
    candidates = [s for s in store.list_servers(role=role) if s.revoked_at is None]
    what = role.replace("-", " ")
    if not ref:
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise errors.PreconditionFailed(
                f"no {what} is enrolled",
                hint=f"install and enroll a {what} first (see docs/architecture.md)",
                code=f"no-{role}",
            )
        raise errors.InvalidInput(
            f"{len(candidates)} {what}s are enrolled; say which one",
            hint="one of: " + ", ".join(f"{s.hostname} ({s.id})" for s in candidates),
            code=f"{role}-ambiguous",
        )
    found = [s for s in candidates if ref in (s.id, s.hostname)]
    if len(found) == 1:
        return found[0]
    if found:
        raise errors.Conflict(
            f"{len(found)} {what}s are called {ref!r}",
            hint="name it by id: " + ", ".join(s.id for s in found),
            code=f"{role}-ambiguous",
        )
    raise errors.NotFound(
        f"no {what} is called {ref!r}", hint="`srctl servers list` shows them", code=f"{role}-not-found"
    )


def directories(server: ServerRecord, kind: int) -> list[dict]:
    name = common_pb2.DirectoryKind.Name(kind)
    return [d for d in server.inventory.get("directories", []) if d.get("kind") == name]


def _check_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value) or value in (".", ".."):
        raise errors.InvalidInput(
            f"{what} {value!r} cannot name a file",
            hint="use letters, digits, '.', '_' and '-' (at most 128), not starting with '.' or '-'",
            code="name-invalid",
        )
    return value


def _target_file(value: str, datastores: list[dict], chosen: dict | None) -> tuple[str, dict]:
    """An existing disk file named for a pair: its path and the datastore holding it.

    Relative: inside the chosen datastore (or the first). Absolute: inside any
    datastore the master target reports (the original disk of a failback lies
    where it lies, whichever datastore new files go to). No `..`. The master
    target checks again with symbolic links resolved (paths.py).
    """
    names = ", ".join(d.get("path", "") for d in datastores)
    if "\0" in value or len(value) > MAX_PATH:
        raise errors.InvalidInput(f"target path {value[:200]!r} is not a file path", code="path-invalid")
    path = PurePosixPath(value)
    if ".." in path.parts:
        raise errors.InvalidInput(
            f"target path {value} contains '..'", hint=f"give a plain path inside {names}", code="path-traversal"
        )
    if not path.is_absolute():
        path = PurePosixPath((chosen or datastores[0])["path"]) / path
    holding = [
        d for d in datastores
        if path != PurePosixPath(d["path"]) and path.is_relative_to(PurePosixPath(d["path"]))
    ]
    if not holding:
        raise errors.InvalidInput(
            f"target path {path} lies outside the master target's datastores",
            hint=f"name a disk file inside {names} (absolute, or relative to the datastore)",
            code="path-outside",
        )
    return str(path), max(holding, key=lambda d: len(PurePosixPath(d["path"]).parts))


# -- creating pairs ------------------------------------------------------------------


def policy_from(message: rpb.RecoveryPolicy | None) -> dict:
    policy = dict(DEFAULT_POLICY)
    if message is not None:
        for key in DEFAULT_POLICY:
            value = getattr(message, key)
            if value:
                policy[key] = value
    if not 60 <= policy["crash_consistent_interval_seconds"] <= 86400:
        raise errors.InvalidInput("the crash-consistent interval must be 60 s to 24 h", code="policy-invalid")
    if policy["app_consistent_interval_seconds"] < 300:
        raise errors.InvalidInput("the app-consistent interval must be at least 5 min", code="policy-invalid")
    if not 3600 <= policy["retention_window_seconds"] <= 30 * 86400:
        raise errors.InvalidInput("the retention window must be 1 h to 30 days", code="policy-invalid")
    return policy


def recovery_policy(pair: PairRecord) -> rpb.RecoveryPolicy:
    """The pair's policy as the agents see it (the stored policy also holds the scan interval)."""
    return rpb.RecoveryPolicy(**{k: v for k, v in pair.policy.items() if k in DEFAULT_POLICY})


def scan_interval_from(seconds: int) -> int:
    seconds = seconds or DEFAULT_SCAN_INTERVAL_SECONDS
    if not MIN_SCAN_INTERVAL_SECONDS <= seconds <= 86400:
        raise errors.InvalidInput(
            f"the scan interval must be {MIN_SCAN_INTERVAL_SECONDS} s to 24 h, not {seconds} s", code="policy-invalid"
        )
    return seconds


def enable(
    store: Store,
    request: admin_pb2.EnableReplicationRequest,
    *,
    now: datetime,
) -> list[PairRecord]:
    """Create one pair per chosen disk; every check passes before anything is stored.

    A delta pair (`sync_kind` DELTA: failback to the original disk, reprotect
    onto an existing replica) compares its target file, which already holds an
    older copy, with the source and sends only the blocks that differ. It needs
    nbd mode. Its file is `target_path` (one disk only) or the default layout
    (so disabling a pair and enabling it again with DELTA reuses its replica); a
    file that does not exist yet is created empty by the master target, and the
    sync then sends every block that is not all zeros. The datastore's free space
    is not checked for a delta pair: its file is mostly there already, and a
    datastore that fills up pauses the pair (`datastore-full`).

    With `request.azure_site` the pairs are forward protection to Azure
    (`target_kind` azure-page-blob): the process server writes each disk into
    a page blob of the site's storage account (`azure_target`), and is also the
    pair's `master_target_id` - it is the end of the data path and reports the
    pair's applied seq and recovery points, as a master target would. Such a
    pair may be a delta pair too (reprotect to the cloud onto the blob an
    earlier protection left): its blob is `target_path` (one disk only; the
    blob's URL as a pair of the site stored it, or a blob name inside the
    site's container: `azure_blob_name`) or the default layout. A blob that
    does not exist yet is created by the process server; one of another size
    puts the pair in error there (`target-size-mismatch`). Full and delta
    pairs store the same target options and URL.
    """
    machine = resolve_machine(store, request.machine)
    source = store.get_server(machine.server_id)
    if source.revoked_at is not None:
        raise errors.PreconditionFailed(f"the source agent of {machine.hostname} is revoked", code="server-revoked")
    azure = bool(request.azure_site)
    if azure and (request.master_target or request.datastore):
        raise errors.InvalidInput(
            "a pair to an Azure site has no master target and no datastore",
            hint="leave out --master-target and --datastore with --azure-site",
            code="azure-target-conflict",
        )
    site = azure_site(store, request.azure_site) if azure else None
    process_server = resolve_server(store, request.process_server, pki.PROCESS_SERVER)
    master_target = process_server if azure else resolve_server(store, request.master_target, pki.MASTER_TARGET)
    for server in (process_server, master_target):
        if not server.inventory.get("data_endpoint"):
            raise errors.PreconditionFailed(
                f"{server.hostname} ({server.id}) has not registered its data endpoint yet",
                hint="wait until `srctl servers list` shows it healthy",
                code="server-not-registered",
            )
    mode = MODES.get(request.mode or rpb.REPLICATION_MODE_NBD)
    if mode is None:
        raise errors.InvalidInput(f"unknown replication mode {request.mode}", code="mode-invalid")
    sync_kind = SYNC_KINDS.get(request.sync_kind or rpb.SYNC_KIND_FULL)
    if sync_kind is None:
        raise errors.InvalidInput(
            f"unknown sync kind {request.sync_kind}", hint="use full or delta", code="sync-kind-invalid"
        )
    if sync_kind == "delta" and mode != "nbd":
        raise errors.InvalidInput(
            "a delta sync needs nbd mode",
            hint="enable the pair in nbd mode (the source agent fronts the disk), or use a full sync in scan mode",
            code="sync-kind-invalid",
        )
    policy = policy_from(request.policy if request.HasField("policy") else None)
    policy[SCAN_INTERVAL_KEY] = scan_interval_from(request.scan_interval_seconds)
    group = request.group
    if group:
        _check_name(group, "group")

    datastore: dict = {}
    retention: list[dict] = []
    target_path = named_blob = ""
    if not azure:
        datastores = directories(master_target, common_pb2.DIRECTORY_KIND_DATASTORE)
        retention = directories(master_target, common_pb2.DIRECTORY_KIND_RETENTION)
        if not datastores or not retention:
            raise errors.PreconditionFailed(
                f"master target {master_target.hostname} reports no datastore or no retention directory",
                hint="configure datastore_dirs and retention_dir on the master target and restart it",
                code="master-target-directories",
            )
        named: dict | None = None
        if request.datastore:
            chosen = [d for d in datastores if d.get("path") == request.datastore]
            if not chosen:
                raise errors.NotFound(
                    f"master target {master_target.hostname} has no datastore {request.datastore!r}",
                    hint="its datastores: " + ", ".join(d.get("path", "") for d in datastores),
                    code="datastore-not-found",
                )
            named = chosen[0]
        datastore = named or datastores[0]
        if request.target_path:
            target_path, datastore = _target_file(request.target_path, datastores, named)
    elif request.target_path and site is not None:
        named_blob = azure_blob_name(request.target_path, AzureSite(**site.settings))

    disks = {d.get("name") or d.get("identity"): d for d in machine.disks}
    names = list(request.disks) or sorted(disks)
    if not names:
        raise errors.PreconditionFailed(f"{machine.hostname} reports no disks", code="no-disks")
    unknown = [n for n in names if n not in disks]
    if unknown:
        raise errors.NotFound(
            f"{machine.hostname} has no disk {', '.join(map(repr, unknown))}",
            hint="its disks: " + ", ".join(sorted(disks)),
            code="disk-not-found",
        )
    if (target_path or named_blob) and len(names) != 1:
        raise errors.InvalidInput(
            f"a target path names one disk {'blob' if named_blob else 'file'}, but {len(names)} disks were chosen",
            hint="choose the disk it belongs to with --disk", code="target-path-one-disk",
        )
    existing = {p.disk_identity for p in store.list_pairs(machine_id=machine.id)}
    already = [n for n in names if disks[n].get("identity") in existing]
    if already:
        raise errors.Conflict(
            f"disk {', '.join(already)} of {machine.hostname} is already replicated",
            hint="`srctl replication status` shows it",
            code="pair-exists",
        )
    needed = sum(int(disks[n].get("size_bytes", 0)) for n in names) if sync_kind == "full" else 0
    free = int(datastore.get("free_bytes", 0))
    if not azure and needed > free:
        raise errors.PreconditionFailed(
            f"datastore {datastore.get('path')} on {master_target.hostname} has {free} bytes free; "
            f"the disks need {needed}",
            hint="free space there, or choose another datastore with --datastore",
            code="datastore-too-small",
        )

    host_dir = _check_name(f"{machine.hostname}-{machine.id[:8]}", "machine directory")
    in_use = {p.target_path: p for p in store.list_pairs() if p.master_target_id == master_target.id}
    created = []
    for name in names:
        disk = disks[name]
        size = int(disk.get("size_bytes", 0))
        if size <= 0:
            raise errors.PreconditionFailed(f"disk {name} reports no size", code="disk-size-unknown")
        disk_file = _check_name(name, "disk name")
        pair_id = f"pair-{uuid.uuid4().hex[:16]}"
        if site is not None:
            path, options = azure_target(store, site, named_blob or f"{host_dir}/{disk_file}.vhd", disk_file, size)
            journal_dir, target_kind = "", TARGET_AZURE
        else:
            path = target_path or str(PurePosixPath(datastore["path"]) / host_dir / f"{disk_file}.img")
            other = in_use.get(path)
            if other is not None:
                raise errors.Conflict(
                    f"target disk {path} on {master_target.hostname} is already written by pair {other.id}",
                    hint="disable that pair first (`srctl replication disable`), or choose another target path",
                    code="target-in-use",
                )
            journal_dir, target_kind, options = str(PurePosixPath(retention[0]["path"]) / pair_id), TARGET_MT, {}
        created.append(
            PairRecord(
                id=pair_id,
                machine_id=machine.id,
                source_server_id=source.id,
                disk_name=name,
                disk_identity=disk.get("identity", name),
                disk_size_bytes=size,
                mode=mode,
                process_server_id=process_server.id,
                master_target_id=master_target.id,
                target_path=path,
                journal_dir=journal_dir,
                created_at=now,
                updated_at=now,
                policy=policy,
                group_id=group,
                sync_kind=sync_kind,
                target_kind=target_kind,
                target_options=options,
            )
        )
    return [store.create_pair(p) for p in created]


def azure_site(store: Store, ref: str) -> AzureSiteRecord:
    _check_name(ref, "Azure site")  # before the store sees it: names and ids are safe names
    try:
        return store.get_azure_site(ref)
    except errors.NotFound:
        raise errors.NotFound(
            f"there is no Azure site {ref!r}",
            hint="`srctl azure list` shows the sites; `srctl azure add` adds one",
            code="azure-site-not-found",
        ) from None


def azure_blob_name(value: str, site: AzureSite) -> str:
    """The blob an Azure pair's `target_path` names, inside the site's container. Checks, stores nothing.

    Two forms: the blob's URL exactly as a pair of the site stores it in its
    `target_path` (`<account URL>/<container>/<blob name>`: the account and the
    container must be the site's), or a blob name inside the site's container.
    Either way the name passes the default layout's checks: path segments of
    letters, digits, '.', '_' and '-' (not starting with '.' or '-'), no `..`,
    no empty segment, ending in `.vhd`. A value with a query (`?`, perhaps a
    SAS) is refused without quoting the query.
    """
    prefix = f"{site.account_url.rstrip('/')}/{site.container}/"
    shown = value.split("?", 1)[0].split("#", 1)[0][:300]
    if "?" in value or "#" in value:
        raise errors.InvalidInput(
            f"target path {shown}?… has a query or fragment; a blob is named without one",
            hint=f"give the blob's URL without '?…' (never a SAS), or its name inside container {site.container}",
            code="azure-blob-name-invalid",
        )
    if "://" in value:
        if not value.startswith(prefix):
            raise errors.InvalidInput(
                f"target path {shown} is not a blob of Azure site storage account {site.storage_account}, "
                f"container {site.container}",
                hint=f"name a blob of the site: a URL starting with {prefix}, or a blob name inside the container "
                "(a pair's blob stays in its site's container)",
                code="azure-blob-outside",
            )
        name = value[len(prefix):]
    else:
        name = value
    if "\0" in name or len(name) > MAX_BLOB_NAME:
        raise errors.InvalidInput(
            f"blob name {shown!r} is not a blob name",
            hint=f"at most {MAX_BLOB_NAME} characters of letters, digits, '.', '_', '-' and '/'",
            code="azure-blob-name-invalid",
        )
    parts = name.split("/")
    if ".." in parts:
        raise errors.InvalidInput(
            f"blob name {shown} contains '..'",
            hint=f"give a plain blob name inside container {site.container}, such as <host>-<id>/<disk>.vhd",
            code="path-traversal",
        )
    if not all(_SAFE_NAME.match(part) for part in parts) or not name.endswith(".vhd"):
        raise errors.InvalidInput(
            f"blob name {shown!r} cannot name a disk's page blob",
            hint="use '/'-separated parts of letters, digits, '.', '_' and '-' (at most 128 each, none empty, "
            "not starting with '.' or '-'), ending in .vhd, as <host>-<id>/<disk>.vhd",
            code="azure-blob-name-invalid",
        )
    return name


def azure_target(store: Store, record: AzureSiteRecord, blob_name: str, disk: str, size: int) -> tuple[str, dict]:
    """The page blob of one disk: (its URL, the pair's target_options). Checks, stores nothing.

    `blob_name` is the default `<host>-<machine id[:8]>/<disk>.vhd` (both parts
    are safe file names already, so safe blob names too) or the one a target
    path named (`azure_blob_name`), in the site's storage account and
    container. Full and delta pairs store the same shape. A blob another pair
    writes is refused.
    """
    if size % PAGE:
        raise errors.PreconditionFailed(
            f"disk {disk} has {size} bytes, not a whole number of {PAGE}-byte sectors; a page blob cannot hold it",
            hint="replicate it to a master target instead",
            code="azure-disk-size",
        )
    site = AzureSite(**record.settings)
    options = {
        "azure_site_id": record.id,
        "azure_site": record.name,
        "storage_account": site.storage_account,
        "container": site.container,
        "blob_name": blob_name,
    }
    where = (site.storage_account, site.container, blob_name)
    for pair in store.list_pairs():
        theirs = pair.target_options
        if pair.target_kind == TARGET_AZURE and (
            theirs.get("storage_account"), theirs.get("container"), theirs.get("blob_name")
        ) == where:
            raise errors.Conflict(
                f"pair {pair.id} already writes blob {blob_name} in container {site.container}",
                hint="`srctl replication status` shows it; disable that pair first "
                "(`srctl replication disable`), or name another blob with --target-path",
                code="pair-exists",
            )
    return f"{site.account_url.rstrip('/')}/{site.container}/{blob_name}", options


# -- telling agents -----------------------------------------------------------------


def assignment(endpoints: Mapping[str, str], pair: PairRecord) -> rpb.PairAssignment:
    """The pair as its agents are told it; `endpoints` maps server ids to their data endpoints."""
    out = rpb.PairAssignment(
        pair_id=pair.id,
        machine_id=pair.source_server_id,
        disk_name=pair.disk_name,
        disk_identity=pair.disk_identity,
        disk_size_bytes=pair.disk_size_bytes,
        mode=MODE_VALUES[pair.mode],
        process_server_id=pair.process_server_id,
        process_server_endpoint=endpoints.get(pair.process_server_id, ""),
        master_target_id=pair.master_target_id,
        master_target_endpoint=endpoints.get(pair.master_target_id, ""),
        target_path=pair.target_path,
        journal_dir=pair.journal_dir,
        policy=recovery_policy(pair),
        desired_state=DESIRED_VALUES[pair.desired_state],
        group_id=pair.group_id,
        scan_interval_seconds=int(pair.policy.get(SCAN_INTERVAL_KEY, DEFAULT_SCAN_INTERVAL_SECONDS)),
        sync_kind=SYNC_KIND_VALUES.get(pair.sync_kind, rpb.SYNC_KIND_FULL),
        target_kind=TARGET_KINDS[pair.target_kind],
    )
    if pair.target_kind == TARGET_AZURE:
        options = pair.target_options
        out.azure_blob.CopyFrom(
            rpb.AzureBlobTarget(
                site=options.get("azure_site", ""),
                storage_account=options.get("storage_account", ""),
                container=options.get("container", ""),
                blob_name=options.get("blob_name", ""),
            )
        )
    return out


def is_azure(pair: PairRecord) -> bool:
    """Forward protection to an Azure page blob: the process server is the end of the path."""
    return pair.target_kind == TARGET_AZURE


def assignments_for(store: Store, server_id: str) -> list[rpb.PairAssignment]:
    pairs = store.list_pairs(server_id=server_id)
    if not pairs:
        return []
    # Only the servers these pairs name: reading every server's row here made each
    # heartbeat of a replicating agent cost as much as the whole fleet.
    named = {p.process_server_id for p in pairs} | {p.master_target_id for p in pairs}
    endpoints = {}
    for named_id in sorted(i for i in named if i):
        with contextlib.suppress(errors.NotFound):
            endpoints[named_id] = data_endpoint(store.get_server(named_id))
    return [assignment(endpoints, p) for p in pairs]


def data_endpoint(server: ServerRecord) -> str:
    endpoint = server.inventory.get("data_endpoint", "")
    return endpoint if isinstance(endpoint, str) else ""


def orders_for(
    store: Store, server_id: str, *, now: datetime
) -> tuple[list[rpb.PairAssignment], list[rpb.TagRequest]]:
    """What a heartbeat response tells an agent: its pairs, and the tags its sources are to insert.

    An agent in no pair is the source of none, so has no tag requests: one query, not two.
    """
    assignments = assignments_for(store, server_id)
    if not assignments:
        return [], []
    return assignments, tag_requests_for(store, server_id, now=now)


def tag_requests_for(store: Store, server_id: str, *, now: datetime) -> list[rpb.TagRequest]:
    return [tag_request(r) for r in store.tag_requests(source_server_id=server_id, now=now) if r.outcome != BARRIER_ABORTED]


def tag_request(record: TagRequestRecord) -> rpb.TagRequest:
    return rpb.TagRequest(
        pair_id=record.pair_id,
        tag_id=record.tag_id,
        kind=KIND_VALUES[record.kind],
        group_id=record.group_id,
        cut_at=timestamp(record.cut_at),
    )


BARRIER_OUTCOMES = {
    BARRIER_WAIT: rpb.BARRIER_OUTCOME_WAIT,
    BARRIER_COMMITTED: rpb.BARRIER_OUTCOME_COMMIT,
    BARRIER_ABORTED: rpb.BARRIER_OUTCOME_ABORT,
}


def hold_barrier(store: Store, identity: pki.Identity, tag_id: str, *, now: datetime) -> tuple[int, str]:
    """A source holds writes for `tag_id`: COMMIT once all hold, ABORT if too late, else WAIT."""
    if not tag_id or len(tag_id) > 255:
        raise errors.InvalidInput("no barrier tag id given", code="barrier-invalid")
    try:
        outcome = store.hold_barrier(tag_id, identity.id, now=now)
    except errors.NotFound:
        return rpb.BARRIER_OUTCOME_ABORT, "the barrier expired or was never asked for"
    reason = "not every machine of the group held its writes in time" if outcome == BARRIER_ABORTED else ""
    return BARRIER_OUTCOMES[outcome], reason


def record_reports(
    store: Store, identity: pki.Identity, statuses: Sequence[rpb.PairStatus], *, now: datetime
) -> None:
    """Keep each agent's latest report; a master target's points settle tag requests."""
    if len(statuses) > MAX_PAIRS_PER_REPORT:
        raise errors.InvalidInput("heartbeat reports too many pairs", code="heartbeat-invalid")
    role = _ROLE_PROTO.get(identity.role)
    if role is None or not statuses:
        return
    store.record_pair_reports(identity.id, role, {s.pair_id: to_dict(s) for s in statuses}, now=now)
    with_points = [s for s in statuses if s.points]
    if not with_points:
        return
    if identity.role == pki.PROCESS_SERVER:
        # The end of an Azure pair's path: its points count, a spool's do not.
        ends = {p.id for p in store.list_pairs(server_id=identity.id) if is_azure(p) and p.process_server_id == identity.id}
        with_points = [s for s in with_points if s.pair_id in ends]
    elif identity.role != pki.MASTER_TARGET:
        return
    for status in with_points:
        store.remove_tag_requests(status.pair_id, [p.tag_id for p in status.points], now=now)


# -- what users see -------------------------------------------------------------------


def _status(report: PairReport | None, *, newest_point_only: bool = False) -> rpb.PairStatus | None:
    """The report as a message; `newest_point_only` leaves out all but its newest recovery
    point (a view needs only the newest and the count, and parsing a day of points per
    pair made `replication status` and a metrics scrape of many pairs take seconds)."""
    if report is None:
        return None
    data = report.status
    if newest_point_only and len(data.get("points", ())) > 1:
        data = {**data, "points": data["points"][-1:]}
    return from_dict(data, rpb.PairStatus())


def view(
    pair: PairRecord,
    reports: Sequence[PairReport],
    *,
    hostname: str,
    heartbeat_interval: float,
    now: datetime,
) -> admin_pb2.PairView:
    by_role = {r.role: r for r in reports}
    end = by_role.get(_end_role(pair))
    source, spool, target = (
        _status(by_role.get("source")), _status(by_role.get("process-server")), _status(end, newest_point_only=True)
    )
    out = admin_pb2.PairView(
        pair_id=pair.id,
        machine_id=pair.machine_id,
        machine_hostname=hostname,
        disk_name=pair.disk_name,
        disk_size_bytes=pair.disk_size_bytes,
        mode=MODE_VALUES[pair.mode],
        process_server_id=pair.process_server_id,
        master_target_id=pair.master_target_id,
        target_path=pair.target_path,
        desired_state=DESIRED_VALUES[pair.desired_state],
        policy=recovery_policy(pair),
        group=pair.group_id,
        created_at=timestamp(pair.created_at),
        sync_kind=SYNC_KIND_VALUES.get(pair.sync_kind, rpb.SYNC_KIND_FULL),
    )
    if source is not None:
        out.sync_done_bytes = source.sync_done_bytes
        out.sync_total_bytes = source.sync_total_bytes or pair.disk_size_bytes
        out.source_backlog_bytes = source.backlog_bytes
        out.source_backlog_frames = source.backlog_frames
        out.source_seq = source.last_seq
        out.throughput_bytes_per_second = source.throughput_bytes_per_second
        out.source_bytes_sent = source.bytes_sent
        out.sync_compared_bytes = source.sync_compared_bytes
        out.sync_differing_bytes = source.sync_differing_bytes
        out.sync_hash_bytes = source.sync_hash_bytes
        out.sync_sent_bytes = source.sync_sent_bytes
    if spool is not None:
        out.spool_backlog_bytes = spool.backlog_bytes
        out.spool_backlog_frames = spool.backlog_frames
        out.spooled_seq = spool.last_seq
    if target is not None:
        # A master target's last_seq is what it applied; the process server at the
        # end of an Azure pair reports what it spooled as last_seq, what it wrote
        # into the blob as acked_seq.
        out.applied_seq = target.acked_seq if is_azure(pair) else target.last_seq
        out.recovery_points = len(end.status.get("points", ())) if end is not None else 0
        out.journal_bytes = target.journal_bytes
        out.applied_bytes_total = target.applied_bytes_total
        out.open_views.extend(target.views)
        if target.points:
            out.latest_point_at.CopyFrom(target.points[-1].captured_at)

    out.state, out.reason, out.reason_code = _state(pair, source, spool, target)
    if out.state == rpb.PAIR_STATE_INITIAL_SYNC and out.sync_total_bytes:
        out.sync_progress = min(1.0, out.sync_done_bytes / out.sync_total_bytes)
    elif out.state != rpb.PAIR_STATE_INITIAL_SYNC and source is not None:
        out.sync_progress = 1.0

    stale = timedelta(seconds=STALE_INTERVALS * heartbeat_interval)

    def fresh(role: str) -> bool:
        return by_role.get(role) is not None and now - by_role[role].reported_at <= stale

    lags = [
        ((by_role[role].reported_at if fresh(role) else now)
         - status.oldest_pending_captured_at.ToDatetime(tzinfo=now.tzinfo)).total_seconds()
        for role, status in (("source", source), ("process-server", spool))
        if status is not None and status.HasField("oldest_pending_captured_at")
    ]
    if lags:
        out.rpo_known = True
        out.rpo_seconds = max(0.0, *lags)
    elif fresh("source") and fresh("process-server"):
        out.rpo_known = True
        out.rpo_seconds = 0.0
    return out


def _end_role(pair: PairRecord) -> str:
    """Whose report holds the pair's applied seq and points."""
    return "process-server" if is_azure(pair) else "master-target"


def _state(
    pair: PairRecord,
    source: rpb.PairStatus | None,
    spool: rpb.PairStatus | None,
    target: rpb.PairStatus | None,
) -> tuple[int, str, str]:
    if pair.desired_state == "paused":
        return rpb.PAIR_STATE_PAUSED, "paused by an administrator", "paused"
    hops = [("source agent", source), ("process server", spool)]
    if not is_azure(pair):  # for an Azure pair the process server is the target too
        hops.append(("master target", target))
    troubled = [
        (role, status)
        for role, status in hops
        if status is not None and status.state in (rpb.PAIR_STATE_ERROR, rpb.PAIR_STATE_PAUSED)
    ]
    # An agent that paused the pair (say the master target: retention-full) is the
    # cause; the process server's error repeating that refusal is only its echo.
    paused_codes = {s.reason_code for _, s in troubled if s.state == rpb.PAIR_STATE_PAUSED}
    for state in (rpb.PAIR_STATE_ERROR, rpb.PAIR_STATE_PAUSED):
        for role, status in troubled:
            if status.state == state and not (state == rpb.PAIR_STATE_ERROR and status.reason_code in paused_codes):
                return status.state, f"{role}: {status.reason}", status.reason_code
    if source is None:
        return rpb.PAIR_STATE_INITIAL_SYNC, "waiting for the source agent to report", "waiting-for-source"
    if source.state == rpb.PAIR_STATE_INITIAL_SYNC:
        # Why it syncs when that is not the first sync (a resync, a catch-up), or what holds it up.
        return rpb.PAIR_STATE_INITIAL_SYNC, f"source agent: {source.reason}" if source.reason else "", source.reason_code
    # The source's "done" says what it sent, not what the target holds: a pair is in sync only
    # once the end that writes the target disk says so (a master target that has not heard of
    # the pair yet, say because it has not reached the configuration server since the pair
    # was created, holds nothing a failover could recover).
    end = target if not is_azure(pair) else spool
    if end is None:
        role = "process server" if is_azure(pair) else "master target"
        return rpb.PAIR_STATE_INITIAL_SYNC, f"waiting for the {role} to report", "waiting-for-target"
    if end.state == rpb.PAIR_STATE_INITIAL_SYNC:
        return rpb.PAIR_STATE_INITIAL_SYNC, "", ""
    return rpb.PAIR_STATE_REPLICATING, "", ""


def views(store: Store, pairs: Sequence[PairRecord], *, heartbeat_interval: float, now: datetime) -> list[admin_pb2.PairView]:
    """Views of `pairs`: a few pairs read their own reports, more read every report at once."""
    hostnames = {m.id: m.hostname for m in store.list_machines()}
    if len(pairs) <= FEW_PAIRS:
        found = [r for p in pairs for r in store.pair_reports(p.id)]
    else:
        found = store.pair_reports()
    reports: dict[str, list[PairReport]] = {}
    for report in found:
        reports.setdefault(report.pair_id, []).append(report)
    return [
        view(
            p,
            reports.get(p.id, []),
            hostname=hostnames.get(p.machine_id, ""),
            heartbeat_interval=heartbeat_interval,
            now=now,
        )
        for p in pairs
    ]


# -- recovery points -------------------------------------------------------------------


def pairs_of(store: Store, machine_ref: str, disk: str = "") -> list[PairRecord]:
    machine = resolve_machine(store, machine_ref)
    pairs = store.list_pairs(machine_id=machine.id)
    if disk:
        pairs = [p for p in pairs if p.disk_name == disk]
    if not pairs:
        raise errors.NotFound(
            f"{machine.hostname} has no replicated disk" + (f" named {disk!r}" if disk else ""),
            hint="`srctl replication enable` starts replicating it",
            code="pair-not-found",
        )
    return pairs


def end_status(store: Store, pair: PairRecord) -> rpb.PairStatus | None:
    """The last report of the pair's end: its master target, or the process server of an Azure pair."""
    role = _end_role(pair)
    return _status(next(
        (r for r in store.pair_reports(pair.id) if r.role == role and r.server_id == pair.master_target_id), None
    ))


def points(store: Store, pair: PairRecord) -> list[rpb.RecoveryPoint]:
    """The pair's points as its end reports them: the master target, or the process
    server for an Azure pair (blob snapshots), oldest first."""
    status = end_status(store, pair)
    return list(status.points) if status is not None else []


def request_point(
    store: Store, *, machine: str, group: str, kind: int, now: datetime, heartbeat_interval: float = 10.0
) -> tuple[str, list[PairRecord]]:
    """Ask the sources for one tag with the same id in every pair of a machine or group.

    For a group the tag is a multi-VM barrier (see replication.proto, TagRequest).
    """
    if bool(machine) == bool(group):
        raise errors.InvalidInput("name either a machine or a group", code="point-target")
    if group:
        pairs = [p for p in store.list_pairs() if p.group_id == group]
        if not pairs:
            raise errors.NotFound(f"no replicated machine is in group {group!r}", code="group-not-found")
        kind = rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT
    else:
        pairs = pairs_of(store, machine)
        kind = kind or rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT
        if kind not in (rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT, rpb.RECOVERY_POINT_KIND_APP_CONSISTENT):
            raise errors.InvalidInput(
                "a single machine takes crash- or app-consistent points",
                hint="name a group for a multi-VM-consistent point",
                code="point-kind",
            )
    tag_id = f"od-{uuid.uuid4().hex[:20]}"
    cut_at, expires_at = None, now + TAG_REQUEST_LIFETIME
    if kind == rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT:
        cut_at = now + timedelta(seconds=BARRIER_LEAD_HEARTBEATS * heartbeat_interval + 1)
        expires_at = cut_at + BARRIER_TIMEOUT
    store.add_tag_requests(
        [
            TagRequestRecord(
                pair_id=p.id,
                tag_id=tag_id,
                kind=KINDS[kind],
                created_at=now,
                expires_at=expires_at,
                group_id=group,
                cut_at=cut_at,
            )
            for p in pairs
        ]
    )
    return tag_id, pairs


def choose_point(available: Sequence[rpb.RecoveryPoint], wanted: str) -> rpb.RecoveryPoint | None:
    """The point `wanted` names: a tag id, or latest[-KIND]. None means 'latest' (the disk as it is)."""
    if wanted in ("", "latest"):
        return None
    if wanted in LATEST_OF_KIND:
        kind = LATEST_OF_KIND[wanted]
        for point in reversed(available):
            if kind is None or point.kind == kind:
                return point
        raise errors.NotFound(
            f"there is no {wanted.removeprefix('latest-')} recovery point",
            hint="`srctl recovery-points list` shows the points there are",
            code="point-not-found",
        )
    for point in available:
        if point.tag_id == wanted:
            return point
    raise errors.NotFound(
        f"no recovery point {wanted!r}",
        hint="`srctl recovery-points list MACHINE` shows the points there are",
        code="point-not-found",
    )


def materialize_on_target(
    store: Store,
    credentials: grpc.ChannelCredentials,
    pair: PairRecord,
    *,
    point: str,
    output_path: str = "",
    in_place: bool = False,
    timeout: float = 3600,
) -> rpb.MaterializeReply:
    """Ask the pair's master target to materialise `point` (a tag id or "latest") at `output_path`
    (or, `in_place`, to put the paused pair's disk itself back to it)."""
    request = rpb.MaterializeRequest(pair_id=pair.id, point=point, output_path=output_path, in_place=in_place)
    return _master_target_call(store, credentials, pair, "Materialize", request, timeout)


def _master_target_call(
    store: Store, credentials: grpc.ChannelCredentials, pair: PairRecord, method: str, request, timeout: float
):
    """Call `method` of the pair's master target (Azure pairs have none: point-in-azure)."""
    if is_azure(pair):
        raise errors.PreconditionFailed(
            f"disk {pair.disk_name} replicates to Azure page blob {pair.target_path}; its recovery points are "
            "snapshots of that blob, not files on a master target",
            hint="`srctl recovery-points list` shows them; a failover to Azure copies the chosen snapshot",
            code="point-in-azure",
        )
    master_target = store.get_server(pair.master_target_id)
    endpoint = master_target.inventory.get("data_endpoint", "")
    with secure_channel(endpoint, credentials, target_name=pki.agent_dns_name(master_target.id)) as channel:
        try:
            return getattr(dataplane_pb2_grpc.MasterTargetStub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, target=endpoint) from exc


def open_view_on_target(
    store: Store, credentials: grpc.ChannelCredentials, pair: PairRecord, *, point: str, timeout: float = 600
) -> rpb.ViewReply:
    """Ask the pair's master target for a read-only NBD view of the disk at `point` (a tag id or "latest")."""
    return _master_target_call(store, credentials, pair, "OpenView",
                               rpb.OpenViewRequest(pair_id=pair.id, point=point), timeout)


def close_view_on_target(
    store: Store, credentials: grpc.ChannelCredentials, pair: PairRecord, *, view_id: str, timeout: float = 60
) -> rpb.CloseViewReply:
    """Close a view of the pair's disk (every one when `view_id` is empty)."""
    return _master_target_call(store, credentials, pair, "CloseView",
                               rpb.CloseViewRequest(pair_id=pair.id, view_id=view_id), timeout)
