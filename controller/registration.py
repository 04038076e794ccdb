"""The `register-server` job: what the configuration server checks about a new server.

Created when a server registers for the first time (as Azure Site Recovery
records a "Register" job). Its steps only read, so there is nothing to
compensate:

1. check-inventory — the registration is in the store and is usable: a source
   agent reports at least one disk of non-zero size; a master target reports a
   datastore and a retention directory; a process server its spool.
2. probe-data-endpoint — for a process server or master target, the
   configuration server dials the data endpoint the agent advertised, over
   mutual TLS, and checks that the agent that answers is the one that
   registered. A wrong `advertise` setting is the usual cause of a failure,
   and the message says so.
"""

from __future__ import annotations

import grpc

from siterecovery.common import errors, pki
from siterecovery.common.channels import RPC_TIMEOUT, secure_channel
from siterecovery.common.pb import dataplane_pb2, dataplane_pb2_grpc
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, StepContext
from siterecovery.controller.store.base import ServerRecord

KIND = "register-server"


def _server(ctx: StepContext) -> ServerRecord:
    return ctx.store.get_server(ctx.params["server_id"])


def check_inventory(ctx: StepContext) -> dict:
    server = _server(ctx)
    inventory = server.inventory
    kinds = {d.get("kind") for d in inventory.get("directories", [])}
    problem = ""
    if server.role == pki.SOURCE:
        disks = inventory.get("disks", [])
        if not disks:
            problem = "the source agent reports no disks; list them under [[disks]] in its config"
        elif any(int(d.get("size_bytes", 0)) == 0 for d in disks):
            problem = "a disk reports a size of 0 bytes; check the disk paths in the source agent's config"
        ctx.progress(1.0, f"{len(disks)} disk(s)")
        result = {"disks": len(disks)}
    elif server.role == pki.MASTER_TARGET:
        if not {"DIRECTORY_KIND_DATASTORE", "DIRECTORY_KIND_RETENTION"} <= kinds:
            problem = "the master target reports no datastore or no retention directory"
        result = {"directories": len(kinds)}
    else:
        if "DIRECTORY_KIND_SPOOL" not in kinds:
            problem = "the process server reports no spool directory"
        result = {"directories": len(kinds)}
    if problem:
        raise errors.PreconditionFailed(f"{server.role} {server.hostname}: {problem}", code="inventory-incomplete")
    return result


def probe_step(client_credentials: grpc.ChannelCredentials) -> FunctionStep:
    def probe(ctx: StepContext) -> dict:
        server = _server(ctx)
        if server.role not in (pki.PROCESS_SERVER, pki.MASTER_TARGET):
            ctx.progress(1.0, "no data port to probe")
            return {"probed": False}
        endpoint = server.inventory.get("data_endpoint", "")
        ctx.progress(0.5, f"dialling {endpoint}")
        stub_class = (
            dataplane_pb2_grpc.ProcessServerStub
            if server.role == pki.PROCESS_SERVER
            else dataplane_pb2_grpc.MasterTargetStub
        )
        with secure_channel(endpoint, client_credentials, target_name=pki.agent_dns_name(server.id)) as channel:
            try:
                reply = stub_class(channel).Probe(dataplane_pb2.ProbeRequest(), timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc, target=endpoint)
                if isinstance(error, errors.Unavailable):
                    raise errors.Unavailable(
                        f"the configuration server cannot reach {server.role} {server.hostname} "
                        f"at its advertised data endpoint {endpoint}: {exc.details()}",
                        hint="set `advertise` in the agent's config to a name or address this "
                        "server can reach, and open the port",
                        code="data-endpoint-unreachable",
                    ) from exc
                raise error from exc
        if reply.server_id != server.id:
            raise errors.Integrity(
                f"{endpoint} is served by agent {reply.server_id}, not by {server.id}",
                hint="two agents advertise the same endpoint; fix `advertise` in their configs",
                code="data-endpoint-mismatch",
            )
        ctx.progress(1.0, f"{endpoint} answers over mutual TLS")
        return {"probed": True, "endpoint": endpoint}

    return FunctionStep("probe-data-endpoint", probe)


def register_server_kind(client_credentials: grpc.ChannelCredentials) -> JobKind:
    return JobKind(KIND, [FunctionStep("check-inventory", check_inventory), probe_step(client_credentials)])


def target_of(server: ServerRecord) -> str:
    return f"{server.role} {server.hostname} ({server.id[:8]})"
