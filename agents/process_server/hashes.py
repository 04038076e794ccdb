"""ProcessServer.BlockHashes: a source agent asks for its pair's target block hashes; we ask the master target.

A source agent talks only to its process server, so the process server carries
a delta sync's questions to the master target that holds the target disk. For
an Azure pair (target kind azure-page-blob) this process server is the target
itself and answers from the page blob (blob_hashes.py). Before anything is
forwarded or read the request is checked as a Replicate stream is:

- the pair is assigned to this process server (else NOT_FOUND);
- the caller's certificate names the pair's source machine (else PERMISSION_DENIED);
- the range is 1 to 16384 whole blocks inside the disk (else INVALID_ARGUMENT).

Then one unary call to the pair's master target over mutual TLS (its
certificate must name `master_target_id`), with a deadline, carrying the
request's `applied_through_seq` (the master target answers `target-catching-up`
until it has applied the pair's frames through it). Its refusal comes
back unchanged (status, code and hint); a master target that cannot be reached
is UNAVAILABLE, which the source retries. The reply is checked for its shape
(16 bytes per block asked for) before it is passed on.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from siterecovery.common import blockhash, errors, pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.enrollment import AgentCredentials
from siterecovery.common.pb import dataplane_pb2_grpc
from siterecovery.common.pb import replication_pb2 as rpb

# The master target reads up to 1 GiB of its disk for one call.
MASTER_TARGET_TIMEOUT = 120.0


def block_hashes(
    request: rpb.BlockHashesRequest,
    *,
    caller: pki.Identity,
    assignment: rpb.PairAssignment | None,
    me: str,
    credentials: AgentCredentials | None,
    read_blob: Callable[[rpb.PairAssignment, rpb.BlockHashesRequest], rpb.BlockHashesReply],
) -> rpb.BlockHashesReply:
    """The target's answer for `request`, once the caller and the range are checked.

    The master target's, asked over mutual TLS; for an Azure pair this process
    server ends, `read_blob`'s (blob_hashes.py)."""
    if assignment is None or not me or assignment.process_server_id != me:
        raise errors.NotFound(
            f"pair {request.pair_id!r} is not assigned to process server {me}",
            hint="a pair just enabled reaches the process server with its next heartbeat",
            code="pair-not-assigned",
        )
    if caller.id != assignment.machine_id:
        raise errors.PermissionDenied(
            f"machine {caller.id} may not read the target of pair {request.pair_id}: it belongs to machine "
            f"{assignment.machine_id}",
            code="pair-not-yours",
        )
    blockhash.check_range(request.offset, request.block_count, assignment.disk_size_bytes)
    if assignment.target_kind == rpb.TARGET_KIND_AZURE_PAGE_BLOB:
        if assignment.master_target_id != me:
            raise errors.NotFound(
                f"pair {request.pair_id} is written into its page blob by {assignment.master_target_id}, "
                f"not by process server {me}",
                hint="the process server that ends an Azure pair answers for its blob; the source asks again",
                code="pair-not-assigned",
            )
        return read_blob(assignment, request)
    if credentials is None or not assignment.master_target_endpoint:
        raise errors.Unavailable(
            f"pair {request.pair_id}: the master target {assignment.master_target_id} has no data endpoint yet",
            hint="it reports one when it registers; the source asks again by itself",
            code="unreachable",
        )
    return _ask(assignment, credentials, request)


def _ask(a: rpb.PairAssignment, credentials: AgentCredentials, request: rpb.BlockHashesRequest) -> rpb.BlockHashesReply:
    channel = secure_channel(
        a.master_target_endpoint, credentials.channel_credentials(), target_name=pki.agent_dns_name(a.master_target_id)
    )
    try:
        reply = dataplane_pb2_grpc.MasterTargetStub(channel).BlockHashes(
            rpb.BlockHashesRequest(
                pair_id=a.pair_id, offset=request.offset, block_count=request.block_count,
                applied_through_seq=request.applied_through_seq,
            ),
            timeout=MASTER_TARGET_TIMEOUT,
        )
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc, target=a.master_target_endpoint) from exc
    finally:
        channel.close()
    blockhash.check_reply(reply, request)
    return reply
