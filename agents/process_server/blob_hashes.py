"""ProcessServer.BlockHashes for an Azure pair: the digests of the pair's page blob, read here.

For an azure-page-blob pair this process server is the end of the data path
(blob_forwarder.py writes the blob), so a delta sync's question for the
target's block hashes (reprotect to the cloud onto the blob an earlier
protection left) is answered here, not forwarded: the blob is read through
this process server's own storage credential (azure_storage.py, read again
for each call, as the forwarder's session does) and hashed with
common/blockhash.py exactly as a master target hashes its file
(agents/master_target/hashes.py), so the source compares like with like:

- one xxh3-128 digest per 64 KiB block of the *disk*, the last block at its
  real length; the blob's zero padding and VHD footer are never hashed, and
  `target_size_bytes` is the disk's size, not the blob's;
- a missing blob (or container) is a missing target: every block ABSENT,
  `present_blocks` 0, `target_exists` false (the source then sends every
  block that is not all zeros, and the forwarder creates the blob);
- a blob made for a disk of another size is refused (`target-size-mismatch`,
  with the fix), as a master target refuses a file of another size.

Reading: first the blob's valid page ranges inside the asked range (Get Page
Ranges, one listing per call; page-range *diffs* are not used: Azurite lacks
them, and there is no snapshot to diff against); blocks no valid page touches
read as zeros and are not downloaded, the others are downloaded in runs of at
most `RANGE_BYTES`. A call may ask for 16384 blocks (1 GiB of disk).

Consistency: the forwarder may apply frames while this reads (no lock is
taken), exactly as a master target applies while it hashes. Each byte is then
seen with a value it held at some moment before the reply, which is all the
delta sync's argument needs (agents/source/delta.py): the forwarder is the
blob's only writer and applies the pair's frames in seq order.

The gate: a request's `applied_through_seq` (a delta sync's INITIAL_STARTED
seq) is answered only once the blob holds every frame of the pair through it:
`applied_seq`, the seq the pair's forwarder has written through
(`BlobForwarder.state.applied_seq`: set after each frame's write is
acknowledged, so the blob holds it), is compared first, and a forwarder behind
it makes the answer UNAVAILABLE `target-catching-up`, which the source asks again,
as a master target does. `ProcessServerPairs._blob_hashes` (pairs.py) passes
its forwarder's (0 while none runs for the pair), after waiting up to 5 s for
it to reach the asked seq (the sync's start is usually a moment behind in the
spool); a caller that passes None gets no gate.

Errors: every Azure call goes through `errors.call` (retries, Retry-After); an
unreachable Azure is UNAVAILABLE and throttling RESOURCE_EXHAUSTED, which the
source retries with backoff; a refused credential names this process server's
credential file. Messages are redacted (an SDK error may quote a SAS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from siterecovery.common import blockhash, errors
from siterecovery.common.azure.errors import DEFAULT_RETRY, AzureRetryPolicy
from siterecovery.common.azure.pageblob import PageBlobDisk
from siterecovery.common.pb import replication_pb2 as rpb

from .azure_storage import SETTING, StorageCredentialFile, redacted, with_storage_hint

B = blockhash.BLOCK_BYTES
# The longest read of one Azure call (a whole number of blocks); a single GET for the SDK.
RANGE_BYTES = 16 * 1024 * 1024


def blob_block_hashes(
    assignment: rpb.PairAssignment,
    request: rpb.BlockHashesRequest,
    storage: StorageCredentialFile | None,
    *,
    applied_seq: int | None = None,
    policy: AzureRetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
    client_options: dict[str, Any] | None = None,
) -> rpb.BlockHashesReply:
    """The reply for a checked request (`blockhash.check_range`) of an Azure pair this process server ends.

    `applied_seq`: the seq the pair's forwarder has written into the blob through (the gate, module docstring)."""
    if applied_seq is not None:
        blockhash.check_applied(
            request, applied_seq, holder="the page blob holds",
            hint="the process server writes the pair's spooled frames into the blob by itself; the source asks again",
        )
    target = assignment.azure_blob
    if storage is None:
        raise errors.PreconditionFailed(
            f"pair {assignment.pair_id} is written into Azure page blob {target.blob_name}, but this process "
            "server has no Azure Storage credential to read it",
            hint=f"set {SETTING} in the process server's settings to a 0600 file holding the storage "
            "account's connection string, then restart it",
            code="azure-storage-not-configured",
        )
    try:
        container = storage.container(target.storage_account, target.container, **(client_options or {}))
        try:
            disk = PageBlobDisk.open_sized(
                container, target.blob_name, assignment.disk_size_bytes, policy=policy, sleep=sleep
            )
        except errors.Conflict as exc:
            raise size_mismatch(exc, assignment) from exc
        reply = rpb.BlockHashesReply(offset=request.offset, block_bytes=B)
        if disk is None:
            reply.digests = blockhash.ABSENT * request.block_count
            return reply
        reply.digests = blob_digests(disk, request.offset, request.block_count)
    except errors.SiteRecoveryError as exc:
        raise redacted(with_storage_hint(exc, storage)) from exc
    reply.present_blocks = request.block_count
    reply.target_exists, reply.target_size_bytes = True, assignment.disk_size_bytes
    return reply


def size_mismatch(exc: errors.Conflict, assignment: rpb.PairAssignment) -> errors.SiteRecoveryError:
    """A blob made for a disk of another size, as a delta pair's refusal (`target-size-mismatch`).

    Any other Conflict is returned unchanged."""
    if exc.code != "azure-blob-mismatch":
        return exc
    size = assignment.disk_size_bytes
    return errors.PreconditionFailed(
        f"pair {assignment.pair_id} needs a page blob made for a {size}-byte disk: {exc.message}",
        hint=f"a delta sync compares the existing blob with the source block by block, so the blob must hold a "
        f"disk of {size} bytes: check that the target path names this disk's blob, or disable the pair and "
        "enable a full sync onto a new blob (another --target-path)",
        code="target-size-mismatch",
    )


def blob_digests(disk: PageBlobDisk, offset: int, block_count: int) -> bytes:
    """Packed digests of `block_count` blocks of the disk blob from `offset` (a checked range)."""
    end = min(offset + block_count * B, disk.disk_size)
    first = offset // B
    holding = _blocks_with_data(disk, offset, end)
    out: list[bytes] = []
    block = first
    last = blockhash.blocks_of(end)
    while block < last:
        start = block * B
        if block not in holding:
            run_end = block
            while run_end < last and run_end not in holding:
                run_end += 1
            out.append(blockhash.zero_digests(start, min(run_end * B, end)))
        else:
            run_end = block
            while run_end < last and run_end in holding and (run_end - block) * B < RANGE_BYTES:
                run_end += 1
            stop = min(run_end * B, end)
            out.append(blockhash.block_digests(disk.read(start, stop - start)))
        block = run_end
    return b"".join(out)


def _blocks_with_data(disk: PageBlobDisk, start: int, end: int) -> set[int]:
    """Blocks of [start, end) that a valid (written, not cleared) page of the blob touches."""
    holding: set[int] = set()
    for page_start, page_end in disk.valid_ranges(start, end - start):
        lo, hi = max(page_start, start), min(page_end, end)
        if lo < hi:
            holding.update(range(lo // B, (hi - 1) // B + 1))
    return holding
