"""A replicated disk as one Azure page blob (forward protection's target disk).

Layout of the blob `<container>/<name>` (one blob per protected disk):

    [0, disk_size)                 the disk, byte for byte
    [disk_size, virtual_size)      zeros (virtual_size = disk_size rounded up to 1 MiB)
    [virtual_size, +512)           a fixed-VHD footer (vhd.py), so that Azure can
                                   import the blob, or a snapshot of it, as a managed disk

Blob metadata: `sr_disk_size` (bytes) and `sr_format` ("vhd-fixed-1").

Page blobs take writes of whole 512-byte pages only, at most 4 MiB per Put
Page. `write(offset, data)` accepts any range inside the disk: a write whose
ends are not on a page boundary is widened by reading the edge pages and
merging (read-modify-write), then sent in pieces of at most 4 MiB; a piece
that is all zeros is sent as Clear Pages instead, which stores nothing.
`zero(offset, length)` clears the aligned middle and rewrites the edges.

**One writer per blob.** Read-modify-write of an edge page is not atomic
against another writer of the same page; the process server runs one
forwarder per pair and so one writer per blob. Two replicas of the process
server must not forward the same pair at once (the pair's assignment names
one process server).

**What a crash leaves behind.** Every Put Page is atomic and durable once
acknowledged; a write cut short leaves some of its pieces written and some
not. The forwarder releases frames from its spool only after `write` returns,
so after a crash it resends them, and each write sets its whole range to fixed
contents: applying the resent frames in order yields exactly the disk at the
last resent frame. Creating the blob is idempotent (`open_or_create` finds an
existing blob, checks its size and rewrites the footer).

Every call goes through `errors.call`, so throttling and transient failures are
retried under the policy and anything else surfaces as our own error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient

from siterecovery.common import errors
from siterecovery.common.azure import vhd
from siterecovery.common.azure.errors import DEFAULT_RETRY, AzureRetryPolicy, call

PAGE = 512
MAX_PUT = 4 * 1024 * 1024
FORMAT = "vhd-fixed-1"
META_SIZE = "sr_disk_size"
META_FORMAT = "sr_format"
_ZERO_PUT = memoryview(bytes(MAX_PUT))


def blob_size(disk_size: int) -> int:
    """Size of the page blob that holds a disk of `disk_size` bytes."""
    return vhd.virtual_size(disk_size) + vhd.FOOTER_SIZE


class PageBlobDisk:
    """Writes and reads one disk stored as a page blob (layout in the module docstring)."""

    def __init__(
        self,
        container: ContainerClient,
        name: str,
        disk_size: int,
        *,
        snapshot: str | None = None,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.container = container
        self.name = name
        self.snapshot = snapshot
        self.blob: BlobClient = container.get_blob_client(name, snapshot=snapshot)
        self.disk_size = disk_size
        self.policy = policy
        self._sleep = sleep

    # --- creating and opening ---

    @classmethod
    def open_or_create(
        cls,
        container: ContainerClient,
        name: str,
        disk_size: int,
        *,
        metadata: dict[str, str] | None = None,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> PageBlobDisk:
        """The disk blob `name`, created (zero-filled, with its footer) when missing.

        An existing blob must have been made for a disk of the same size;
        otherwise Conflict, and nothing is changed.
        """
        if disk_size <= 0 or disk_size % PAGE:
            raise errors.InvalidInput(
                f"disk size {disk_size} is not a positive multiple of {PAGE} bytes", code="azure-disk-size"
            )
        disk = cls(container, name, disk_size, policy=policy, sleep=sleep)
        blob = disk.blob
        size = blob_size(disk_size)
        meta = {**(metadata or {}), META_SIZE: str(disk_size), META_FORMAT: FORMAT}

        def create() -> bool:
            try:
                blob.create_page_blob(size, metadata=meta, match_condition=MatchConditions.IfMissing)
                return True
            except ResourceExistsError:
                return False

        created = disk._call(f"create page blob {name}", create)
        if not created:
            disk._check_made_for(disk._call(f"read page blob {name}", blob.get_blob_properties))
        disk._write_footer(name)
        return disk

    @classmethod
    def open_sized(
        cls,
        container: ContainerClient,
        name: str,
        disk_size: int,
        *,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> PageBlobDisk | None:
        """The existing disk blob `name`, made for a disk of `disk_size` bytes; None when there is none.

        Only reads (no footer is written, nothing is created): for a reader
        such as the process server's BlockHashes. A missing container counts
        as a missing blob. A blob of another size or type is refused as by
        `open_or_create` (Conflict, `azure-blob-mismatch`).
        """
        disk = cls(container, name, disk_size, policy=policy, sleep=sleep)
        try:
            props = disk._call(f"read page blob {name}", disk.blob.get_blob_properties)
        except errors.NotFound:
            return None
        disk._check_made_for(props)
        return disk

    def _check_made_for(self, props: Any) -> None:
        """Conflict unless the blob with properties `props` was made for a disk of this size."""
        size = blob_size(self.disk_size)
        recorded = (props.metadata or {}).get(META_SIZE)
        if props.blob_type != "PageBlob" or props.size != size or recorded not in (None, str(self.disk_size)):
            raise errors.Conflict(
                f"blob {self.name} already exists as a {props.blob_type} of {props.size} bytes "
                f"(disk size {recorded}); a disk of {self.disk_size} bytes needs a page blob of {size} bytes",
                hint="the blob belongs to another disk or an older protection: delete it or pick another name",
                code="azure-blob-mismatch",
            )

    @classmethod
    def open(
        cls,
        container: ContainerClient,
        name: str,
        *,
        policy: AzureRetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> PageBlobDisk:
        """An existing disk blob (NotFound when there is none)."""
        probe = cls(container, name, 0, policy=policy, sleep=sleep)
        props = probe._call(f"read page blob {name}", probe.blob.get_blob_properties)
        try:
            disk_size = int((props.metadata or {})[META_SIZE])
        except (KeyError, ValueError):
            raise errors.Integrity(
                f"blob {name} has no valid {META_SIZE} metadata; it was not written by siterecovery",
                hint="pick the blob of a protected disk",
                code="azure-blob-mismatch",
            ) from None
        return cls(container, name, disk_size, policy=policy, sleep=sleep)

    def _write_footer(self, name: str) -> None:
        size = vhd.virtual_size(self.disk_size)
        unique = uuid.uuid5(uuid.NAMESPACE_URL, f"siterecovery:{self.container.container_name}/{name}")
        data = vhd.footer(size, unique, datetime.now(UTC))
        self._call(f"write the VHD footer of {name}", lambda: self.blob.upload_page(data, offset=size, length=len(data)))

    # --- I/O ---

    def _call(self, what: str, fn: Callable[[], object]) -> object:
        return call(what, fn, self.policy, sleep=self._sleep)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise errors.InvalidInput(
                f"range {offset}+{length} lies outside the disk ({self.disk_size} bytes)", code="azure-range"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the disk (zeros where nothing was written)."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        return self._call(  # type: ignore[return-value]
            f"read {length} bytes at {offset} of {self.name}",
            lambda: self.blob.download_blob(offset=offset, length=length).readall(),
        )

    def valid_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The blob's valid (written, not cleared) page ranges that meet [offset, offset + length).

        As (start, end) byte offsets, end exclusive, in order; a page outside
        every range reads as zeros. `offset` and `length` are whole pages. One
        Get Page Ranges listing (not a diff: Azurite has no page-range diffs).
        """
        self._check_range(offset, length)
        if length == 0:
            return []

        def listing() -> list[tuple[int, int]]:
            found = self.blob.list_page_ranges(offset=offset, length=length)
            return [(r.start, r.end + 1) for r in found if not r.cleared]  # Azure's ends are inclusive

        return self._call(f"list the page ranges of {length} bytes at {offset} of {self.name}", listing)  # type: ignore[return-value]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`; any alignment, any length inside the disk."""
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        if not data:
            return
        start, end = offset, offset + len(data)
        aligned_start, aligned_end = start - start % PAGE, -(-end // PAGE) * PAGE
        if aligned_start == start and aligned_end == end:
            self._put_aligned(start, data)
            return
        buffer = bytearray(aligned_end - aligned_start)
        head = self._edges(aligned_start, aligned_end, start, end)
        for page_offset, page in head.items():
            buffer[page_offset - aligned_start : page_offset - aligned_start + PAGE] = page
        buffer[start - aligned_start : end - aligned_start] = data
        self._put_aligned(aligned_start, memoryview(buffer))

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros; whole pages are cleared (they then store nothing)."""
        self._check_range(offset, length)
        if length == 0:
            return
        start, end = offset, offset + length
        inner_start, inner_end = -(-start // PAGE) * PAGE, end - end % PAGE
        if inner_start >= inner_end:  # inside one page, or across one boundary: plain writes
            self.write(start, bytes(length))
            return
        if start < inner_start:
            self.write(start, bytes(inner_start - start))
        self._clear(inner_start, inner_end - inner_start)
        if inner_end < end:
            self.write(inner_end, bytes(end - inner_end))

    def _edges(self, aligned_start: int, aligned_end: int, start: int, end: int) -> dict[int, bytes]:
        """Current contents of the (one or two) pages a write only partly covers."""
        pages = set()
        if start % PAGE:
            pages.add(aligned_start)
        if end % PAGE:
            pages.add(aligned_end - PAGE)
        out = {}
        for page_offset in sorted(pages):
            # The last page of the disk may extend into the padding; the blob has it.
            out[page_offset] = self._call(
                f"read page {page_offset} of {self.name}",
                lambda p=page_offset: self.blob.download_blob(offset=p, length=PAGE).readall(),
            )
        return out

    def _put_aligned(self, offset: int, data: memoryview) -> None:
        for piece_start in range(0, len(data), MAX_PUT):
            piece = data[piece_start : piece_start + MAX_PUT]
            at = offset + piece_start
            if piece == _ZERO_PUT[: len(piece)]:
                self._clear(at, len(piece))
                continue
            body = bytes(piece)
            self._call(
                f"write {len(body)} bytes at {at} of {self.name}",
                lambda b=body, o=at: self.blob.upload_page(b, offset=o, length=len(b)),
            )

    def _clear(self, offset: int, length: int) -> None:
        self._call(
            f"clear {length} bytes at {offset} of {self.name}",
            lambda: self.blob.clear_page(offset=offset, length=length),
        )

    def delete(self) -> bool:
        """Delete the blob and its snapshots; False when it was already gone."""

        def gone() -> bool:
            try:
                self.blob.delete_blob(delete_snapshots="include")
                return True
            except ResourceNotFoundError:
                return False

        return self._call(f"delete blob {self.name}", gone)  # type: ignore[return-value]
