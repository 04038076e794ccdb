"""Recovery points of a page-blob disk: blob snapshots with metadata.

When the tag of a recovery point arrives in a pair's stream, the forwarder
has written every frame before it (writes are durable once acknowledged), so
a snapshot of the blob taken then is the disk at that point. `create_point`
takes that snapshot with metadata:

    sr_tag_id       the tag's id (unique per pair; what a failover names)
    sr_kind         crash-consistent | app-consistent | multi-vm-consistent
    sr_captured_at  when the source captured it, ISO 8601 UTC
    sr_disk_size    the disk's size in bytes

plus whatever `extra` metadata the caller adds (the process server adds
`sr_pair_id`, `sr_seq`, …), returned in `BlobPoint.extra`.

A snapshot is immutable and keeps the VHD footer, so Azure can import it (via
`copy_to_blob`) as a managed disk. `list_points` lists the blob's snapshots
with their metadata (one List Blobs call; no page-range diffs, which the
emulator does not implement and we do not need). A crash after the snapshot
but before its caller recorded it is harmless: `create_point` first looks for
a snapshot with the same tag id and returns it instead of taking another.
Retention prunes with `delete_point`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient

from siterecovery.common import errors
from siterecovery.common.azure.errors import DEFAULT_RETRY, AzureRetryPolicy, call
from siterecovery.common.azure.pageblob import META_SIZE, PageBlobDisk

KINDS = ("crash-consistent", "app-consistent", "multi-vm-consistent")
META_TAG, META_KIND, META_CAPTURED = "sr_tag_id", "sr_kind", "sr_captured_at"


@dataclass(frozen=True)
class BlobPoint:
    """One recovery point of one disk blob."""

    blob_name: str
    snapshot: str  # the snapshot's timestamp id, as Azure names it
    tag_id: str
    kind: str
    captured_at: datetime
    disk_size: int
    # The snapshot's other metadata (what `create_point` was given as `extra`).
    extra: Mapping[str, str] = field(default_factory=dict)


_CORE = frozenset({META_TAG, META_KIND, META_CAPTURED, META_SIZE})


def _point(blob_name: str, snapshot: str, metadata: Mapping[str, str]) -> BlobPoint | None:
    try:
        return BlobPoint(
            blob_name=blob_name,
            snapshot=snapshot,
            tag_id=metadata[META_TAG],
            kind=metadata[META_KIND],
            captured_at=datetime.fromisoformat(metadata[META_CAPTURED]),
            disk_size=int(metadata[META_SIZE]),
            # (an empty value may come back as None)
            extra={k: v or "" for k, v in metadata.items() if k not in _CORE},
        )
    except (KeyError, ValueError):
        return None  # a snapshot someone else took: not a recovery point of ours


def list_points(
    container: ContainerClient,
    blob_name: str,
    *,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> list[BlobPoint]:
    """The blob's recovery points, oldest capture first."""

    def listing() -> list[BlobPoint]:
        found = []
        for item in container.list_blobs(name_starts_with=blob_name, include=["snapshots", "metadata"]):
            if item.name != blob_name or not item.snapshot:
                continue
            point = _point(blob_name, item.snapshot, item.metadata or {})
            if point is not None:
                found.append(point)
        return found

    points = call(f"list the recovery points of {blob_name}", listing, policy, sleep=sleep)
    return sorted(points, key=lambda p: (p.captured_at, p.snapshot))


def create_point(
    disk: PageBlobDisk,
    tag_id: str,
    kind: str,
    captured_at: datetime,
    *,
    extra: Mapping[str, str] | None = None,
    existing: list[BlobPoint] | None = None,
) -> BlobPoint:
    """Snapshot the disk as the recovery point `tag_id`; returns the existing one if taken before.

    `extra`: more metadata (names and values ASCII, names valid C# identifiers,
    as Azure requires). `existing`: the blob's points when the caller knows
    them already (saves a listing; it must be current, or a point may be taken twice).
    """
    if kind not in KINDS:
        raise errors.InvalidInput(f"unknown recovery point kind {kind!r}; one of {', '.join(KINDS)}")
    if not tag_id or not tag_id.isascii():
        raise errors.InvalidInput(f"tag id {tag_id!r} must be non-empty ASCII", code="azure-tag")
    if captured_at.tzinfo is None:
        raise errors.InvalidInput("captured_at must carry a time zone", code="azure-tag")
    if disk.snapshot is not None:
        raise errors.InvalidInput("a recovery point cannot be taken of a recovery point", code="azure-tag")
    name = disk.name
    if existing is None:
        existing = list_points(disk.container, name, policy=disk.policy, sleep=disk._sleep)
    for point in existing:
        if point.tag_id == tag_id:
            return point
    metadata = {
        **(extra or {}),
        META_TAG: tag_id,
        META_KIND: kind,
        META_CAPTURED: captured_at.astimezone(UTC).isoformat(),
        META_SIZE: str(disk.disk_size),
    }
    result = call(
        f"snapshot {name} as recovery point {tag_id}",
        lambda: disk.blob.create_snapshot(metadata=metadata),
        disk.policy,
        sleep=disk._sleep,
    )
    point = _point(name, result["snapshot"], metadata)
    assert point is not None
    return point


def open_point(container: ContainerClient, point: BlobPoint, **kwargs: object) -> PageBlobDisk:
    """The disk as it was at `point` (read-only: a snapshot refuses writes)."""
    return PageBlobDisk(container, point.blob_name, point.disk_size, snapshot=point.snapshot, **kwargs)  # type: ignore[arg-type]


def delete_point(
    container: ContainerClient,
    point: BlobPoint,
    *,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Delete one recovery point; False when it was already gone."""
    blob = container.get_blob_client(point.blob_name, snapshot=point.snapshot)

    def delete() -> bool:
        try:
            blob.delete_blob()
            return True
        except ResourceNotFoundError:
            return False

    return call(f"delete recovery point {point.tag_id} of {point.blob_name}", delete, policy, sleep=sleep)


def copy_to_blob(
    container: ContainerClient,
    point: BlobPoint,
    dest_name: str,
    *,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Copy a point into a blob of its own (same account) for a managed-disk import; returns its URL.

    Idempotent: an existing `dest_name` copied from the same snapshot is kept.
    The copy is server-side and may finish later; `copy_status` says when.
    """
    source = container.get_blob_client(point.blob_name, snapshot=point.snapshot).url
    dest = container.get_blob_client(dest_name)

    def start() -> None:
        try:
            props = dest.get_blob_properties()
        except ResourceNotFoundError:
            props = None
        if props is not None:
            if props.copy.source and props.copy.source == source:
                return
            raise errors.Conflict(
                f"blob {dest_name} already exists and is not a copy of point {point.tag_id}",
                hint="delete it, or pick another name for the failover disk",
                code="azure-blob-mismatch",
            )
        dest.start_copy_from_url(source)

    call(f"copy point {point.tag_id} of {point.blob_name} to {dest_name}", start, policy, sleep=sleep)
    return dest.url


def copy_status(
    container: ContainerClient,
    dest_name: str,
    *,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """'pending', 'success', 'aborted' or 'failed' for a copy started by `copy_to_blob`."""
    return copy_progress(container, dest_name, policy=policy, sleep=sleep)[0]


def copy_progress(
    container: ContainerClient,
    dest_name: str,
    *,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, int, int, str]:
    """(status, bytes copied, bytes in all, Azure's reason when it failed) of a `copy_to_blob` copy."""
    dest = container.get_blob_client(dest_name)
    props = call(f"read blob {dest_name}", dest.get_blob_properties, policy, sleep=sleep)
    status = str(props.copy.status or "success")
    copied = total = props.size or 0
    if props.copy.progress and "/" in props.copy.progress:
        done, _, whole = props.copy.progress.partition("/")
        try:
            copied, total = int(done), int(whole)
        except ValueError:
            pass
    return status, copied, total, str(props.copy.status_description or "")


def delete_blob(container: ContainerClient, name: str) -> None:
    """Delete a blob and its snapshots (an unfinished copy is aborted by the delete); nothing to do when
    it is gone."""

    def delete() -> None:
        try:
            container.get_blob_client(name).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            pass

    call(f"delete blob {name}", delete)
