"""Hostile input against every RPC that takes input (issue 8, point 2).

Each RPC of common/authz.RPC_ROLES that takes input gets random messages built
from its descriptor (tests/fuzz/hostile.py) sent with the certificate of a role
allowed to call it, over mutual TLS, to real daemons. For every example:

- the status is OK only where the RPC may legitimately accept such input, and
  otherwise one of the refusals allowed for that RPC (never UNKNOWN, INTERNAL,
  UNAVAILABLE from a crash, ...), with details that say what was wrong;
- a refused call wrote nothing, and an accepted read wrote nothing: the store
  (every table but the columns agents' heartbeats rewrite) and every file in the
  master target's datastore and retention directories and the process server's
  spool are the same before and after;
- the daemon still answers a health check.

Then targeted cases random input does not reach: frames with valid checksums
past the end of the disk, oversized messages, `../` and absolute paths in disk,
datastore and output names, a replayed enrollment, expired and revoked
certificates.

Test order matters (module-scoped site): the data-plane fuzzing stops the
source agent and then the process server, so that no real stream competes with
the fuzzed ones; enrollment fuzzing runs last because wrong proofs lock
127.0.0.1 out of enrollment (RESOURCE_EXHAUSTED, an allowed refusal).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import example, given, settings
from hypothesis import strategies as st

from siterecovery.common import authz, frames, pki
from siterecovery.common.grpcserver import MAX_MESSAGE_BYTES
from siterecovery.common.pb import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    dataplane_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)
from siterecovery.common.pb import protection_pb2 as ppb
from siterecovery.common.pb import replication_pb2 as rpb

from ..integration.conftest import wait_for
from . import hostile
from .conftest import FuzzSite, enroll_request

pytestmark = pytest.mark.fuzz
settings.load_profile("fuzz")

C = grpc.StatusCode
OK = C.OK


@dataclass(frozen=True)
class Rpc:
    """How to fuzz one RPC: where, as whom, with what, and which answers are right."""

    method: str
    request: type
    port: str
    role: str
    # Refusals that are the right answer to some hostile input of this RPC.
    refusals: frozenset[C]
    # None: OK is never right. "read": OK is right and wrote nothing. "write": OK may write.
    ok: str | None = None
    kind: str = "unary_unary"
    overrides: Callable[[FuzzSite], dict] = lambda fuzz: {}
    strategy: Callable[[FuzzSite], st.SearchStrategy] | None = None


BAD = frozenset({C.INVALID_ARGUMENT})
LOOKUP = frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND})


def _ids(fuzz: FuzzSite) -> dict:
    agents = fuzz.site.agents
    return {
        "machine": fuzz.site.machine,
        "ps": agents["process-server"].state["agent_id"],
        "mt": agents["master-target"].state["agent_id"],
    }


def _not_paused(fuzz):
    # Pausing the real pair would change what the data-plane tests below see.
    return {"desired_state": st.one_of(
        st.just(rpb.PAIR_DESIRED_STATE_REPLICATING), st.integers(-(2**31), 2**31 - 1).filter(lambda v: v != 2)
    )}


def _disable(fuzz: FuzzSite):
    # Never a request that would really disable the site's pair: a hostile machine, or
    # the real machine with disks it does not have (checked before anything is deleted).
    disks = st.lists(hostile.TEXT.filter(lambda d: d != "disk0"), min_size=1, max_size=3)
    return st.one_of(
        hostile.message(admin_pb2.DisableReplicationRequest),
        st.builds(lambda d: admin_pb2.DisableReplicationRequest(machine=fuzz.site.machine, disks=d), disks),
    )


def _create_point(fuzz: FuzzSite):
    # A valid point on the real machine would start a tag through the data path while
    # digests are compared: only kinds a single machine cannot take go with it.
    bad_kinds = st.integers(-(2**31), 2**31 - 1).filter(lambda k: k not in (0, 1, 2))
    return st.one_of(
        hostile.message(admin_pb2.CreateRecoveryPointRequest),
        st.builds(lambda k: admin_pb2.CreateRecoveryPointRequest(machine=fuzz.site.machine, kind=k), bad_kinds),
    )


def _valid_csr() -> bytes:
    return pki.build_csr(pki.generate_key(), common_name="fuzz", sans=[])


CONTROL_PLANE = [
    # Reads: any input is answered, possibly with an empty list, and nothing is written.
    Rpc("/siterecovery.v1.Admin/ListServers", admin_pb2.ListServersRequest, "config-server", pki.ADMIN, BAD, "read"),
    Rpc("/siterecovery.v1.Admin/ListOperators", admin_pb2.ListOperatorsRequest, "config-server", pki.ADMIN, BAD, "read"),
    Rpc("/siterecovery.v1.Admin/ListJobs", admin_pb2.ListJobsRequest, "config-server", pki.ADMIN, BAD, "read"),
    Rpc("/siterecovery.v1.Admin/GetJob", admin_pb2.GetJobRequest, "config-server", pki.ADMIN, LOOKUP, "read"),
    Rpc("/siterecovery.v1.Admin/WatchJob", admin_pb2.GetJobRequest, "config-server", pki.ADMIN, LOOKUP, "read",
        kind="unary_stream"),
    Rpc("/siterecovery.v1.Admin/ListPairs", admin_pb2.ListPairsRequest, "config-server", pki.ADMIN, LOOKUP, "read",
        overrides=lambda f: {"machine": hostile.mixed(f.site.machine)}),
    Rpc("/siterecovery.v1.Admin/ListRecoveryPoints", admin_pb2.ListRecoveryPointsRequest, "config-server", pki.ADMIN,
        LOOKUP, "read", overrides=lambda f: {"machine": hostile.mixed(f.site.machine), "disk": hostile.mixed("disk0")}),
    Rpc("/siterecovery.v1.Admin/GetVcenterInventory", admin_pb2.GetVcenterInventoryRequest, "config-server",
        pki.ADMIN, LOOKUP, "read"),
    # srctl doctor: names only (a control character or a long one is refused); a machine that
    # does not exist is a failed check in the answer, not an error.
    Rpc("/siterecovery.v1.Admin/Diagnose", admin_pb2.DiagnoseRequest, "config-server", pki.ADMIN, BAD, "read",
        overrides=lambda f: {"machine": hostile.mixed(f.site.machine)}),
    # A backup reads the store; a short passphrase is refused.
    Rpc("/siterecovery.v1.Admin/CreateBackup", admin_pb2.CreateBackupRequest, "config-server", pki.ADMIN, BAD, "read",
        kind="unary_stream"),
    # Changes. NOT_FOUND: the named thing does not exist; FAILED_PRECONDITION: it exists
    # but cannot be changed now (a server still in use); ABORTED: a conflict with what exists.
    Rpc("/siterecovery.v1.Admin/RemoveServer", admin_pb2.RemoveServerRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION}),
        overrides=lambda f: {"server": hostile.mixed(*_ids(f).values())}),
    Rpc("/siterecovery.v1.Admin/AddOperator", admin_pb2.AddOperatorRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.ABORTED}), "write",
        overrides=lambda f: {"csr_der": hostile.mixed(_valid_csr(), base=hostile.BYTES)}),
    Rpc("/siterecovery.v1.Admin/RemoveOperator", admin_pb2.RemoveOperatorRequest, "config-server", pki.ADMIN,
        LOOKUP, "write"),
    Rpc("/siterecovery.v1.Admin/EnableReplication", admin_pb2.EnableReplicationRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}),
        overrides=lambda f: {
            "machine": hostile.mixed(f.site.machine), "disks": st.lists(hostile.mixed("disk0"), max_size=3),
            "process_server": hostile.mixed(_ids(f)["ps"], ""), "master_target": hostile.mixed(_ids(f)["mt"], ""),
            "datastore": hostile.mixed(str(f.datastore), f"{f.datastore}/../..", f"{f.datastore}/x", ""),
        }),
    Rpc("/siterecovery.v1.Admin/SetPairState", admin_pb2.SetPairStateRequest, "config-server", pki.ADMIN, LOOKUP,
        "write", overrides=lambda f: {"pair_id": hostile.mixed(f.pair["pair_id"]), **_not_paused(f)}),
    Rpc("/siterecovery.v1.Admin/DisableReplication", admin_pb2.DisableReplicationRequest, "config-server", pki.ADMIN,
        LOOKUP, strategy=_disable),
    Rpc("/siterecovery.v1.Admin/CreateRecoveryPoint", admin_pb2.CreateRecoveryPointRequest, "config-server",
        pki.ADMIN, LOOKUP, strategy=_create_point),
    # The configuration server asks the master target; its refusals come back unchanged.
    # OK: "latest" names the target disk itself, nothing is copied.
    Rpc("/siterecovery.v1.Admin/MaterializePoint", admin_pb2.MaterializePointRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}), "read",
        overrides=lambda f: {
            "machine": hostile.mixed(f.site.machine), "disk": hostile.mixed("disk0", ""),
            "point": hostile.mixed("latest", "", f.tag_id),
            "output_path": hostile.mixed(f"{f.datastore}/../escape.img", f"{f.datastore}", "/etc/cron.d/x", ""),
        }),
    # A view is opened (or closed) in the master target's memory: nothing is written.
    Rpc("/siterecovery.v1.Admin/OpenPointView", admin_pb2.OpenPointViewRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}), "read",
        overrides=lambda f: {
            "machine": hostile.mixed(f.site.machine), "disk": hostile.mixed("disk0", ""),
            "point": hostile.mixed("latest", "", f.tag_id),
        }),
    Rpc("/siterecovery.v1.Admin/ClosePointView", admin_pb2.ClosePointViewRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION}), "read",
        overrides=lambda f: {
            "machine": hostile.mixed(f.site.machine), "disk": hostile.mixed("disk0", ""),
            "view_id": hostile.mixed("", "view-0123456789abcdef01234567"),
        }),
    # The master target's own view RPCs (admin only), asked directly.
    Rpc("/siterecovery.v1.MasterTarget/OpenView", rpb.OpenViewRequest, "master-target", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}), "read",
        overrides=lambda f: {"pair_id": hostile.mixed(f.pair["pair_id"]), "point": hostile.mixed("latest", "", f.tag_id)}),
    Rpc("/siterecovery.v1.MasterTarget/CloseView", rpb.CloseViewRequest, "master-target", pki.ADMIN,
        LOOKUP, "read",
        overrides=lambda f: {"pair_id": hostile.mixed(f.pair["pair_id"]),
                             "view_id": hostile.mixed("", "view-0123456789abcdef01234567")}),
    # UNAVAILABLE / UNAUTHENTICATED / PERMISSION_DENIED: a well-formed endpoint was tried and
    # did not answer, or refused the login; that is what the caller must be told.
    Rpc("/siterecovery.v1.Admin/AddVcenter", admin_pb2.AddVcenterRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.UNAVAILABLE, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.ABORTED}),
        overrides=lambda f: {"host": hostile.mixed("127.0.0.1", "")}),
    Rpc("/siterecovery.v1.Admin/UpdateVcenterCredentials", admin_pb2.UpdateVcenterCredentialsRequest,
        "config-server", pki.ADMIN, LOOKUP),
    Rpc("/siterecovery.v1.Admin/RemoveVcenter", admin_pb2.RemoveVcenterRequest, "config-server", pki.ADMIN, LOOKUP),
    Rpc("/siterecovery.v1.Admin/DiscoverVcenter", admin_pb2.DiscoverVcenterRequest, "config-server", pki.ADMIN, LOOKUP),
    # Azure sites: adding one contacts nothing (OK may write); the rest name a site that
    # does not exist here, or are refused for their values. A deployment never gets as
    # far as a job: the sites it names do not exist.
    Rpc("/siterecovery.v1.Admin/AddAzureSite", admin_pb2.AddAzureSiteRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.ABORTED}), "write"),
    Rpc("/siterecovery.v1.Admin/UpdateAzureSiteCredentials", admin_pb2.UpdateAzureSiteCredentialsRequest,
        "config-server", pki.ADMIN, LOOKUP),
    Rpc("/siterecovery.v1.Admin/RemoveAzureSite", admin_pb2.RemoveAzureSiteRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION})),
    Rpc("/siterecovery.v1.Admin/DeployAzureProcessServer", admin_pb2.DeployAzureProcessServerRequest,
        "config-server", pki.ADMIN, frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION})),
    # Protection: groups may be created (OK writes); everything else names a machine,
    # group, plan or job that does not exist here, or is refused for its values. The
    # site's machine replicates outside a group, so protecting it is refused (ABORTED).
    Rpc("/siterecovery.v1.Protection/CreateProtectionGroup", ppb.CreateProtectionGroupRequest, "config-server",
        pki.ADMIN, frozenset({C.INVALID_ARGUMENT, C.ABORTED}), "write"),
    Rpc("/siterecovery.v1.Protection/RemoveProtectionGroup", ppb.RemoveProtectionGroupRequest, "config-server",
        pki.ADMIN, frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.ABORTED})),
    Rpc("/siterecovery.v1.Protection/ProtectMachine", ppb.ProtectMachineRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}),
        overrides=lambda f: {"machine": hostile.mixed(f.site.machine)}),
    Rpc("/siterecovery.v1.Protection/StartWorkflow", ppb.StartWorkflowRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION}),
        overrides=lambda f: {"machine": hostile.mixed(f.site.machine)}),
    Rpc("/siterecovery.v1.Protection/GetProtectedMachine", ppb.GetProtectedMachineRequest, "config-server",
        pki.ADMIN, LOOKUP, "read", overrides=lambda f: {"machine": hostile.mixed(f.site.machine)}),
    Rpc("/siterecovery.v1.Protection/SaveRecoveryPlan", ppb.SaveRecoveryPlanRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.ABORTED})),
    Rpc("/siterecovery.v1.Protection/RemoveRecoveryPlan", ppb.RemoveRecoveryPlanRequest, "config-server",
        pki.ADMIN, LOOKUP),
    Rpc("/siterecovery.v1.Protection/StartPlanWorkflow", ppb.StartPlanWorkflowRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION})),
    Rpc("/siterecovery.v1.Protection/ResumeJob", admin_pb2.GetJobRequest, "config-server", pki.ADMIN,
        frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION})),
    # Agents (as the suite's own enrolled source agent): what an agent reports about itself
    # is accepted when well-formed (and then written), refused when not.
    Rpc("/siterecovery.v1.AgentControl/Register", agent_pb2.RegisterRequest, "config-server", "fuzz-source", BAD,
        "write"),
    Rpc("/siterecovery.v1.AgentControl/Heartbeat", agent_pb2.HeartbeatRequest, "config-server", "fuzz-source", BAD,
        "write"),
    # An unknown barrier is answered ABORT (the source resumes writes), writing nothing.
    Rpc("/siterecovery.v1.AgentControl/HoldBarrier", agent_pb2.HoldBarrierRequest, "config-server", "fuzz-source",
        LOOKUP, "read", overrides=lambda f: {"tag_id": hostile.mixed(f.tag_id)}),
]


DISK = 8 * 1024 * 1024  # the fuzz site's disk (conftest.py)


def _hashes_request(fuzz: FuzzSite) -> dict:
    # The real pair, and ranges at and around the edges of its 8 MiB disk (128 blocks).
    return {
        "pair_id": hostile.mixed(fuzz.pair["pair_id"]),
        "offset": st.one_of(st.sampled_from([0, 65536, DISK - 65536, DISK, DISK + 65536, 1, 2**63, 2**64 - 65536]),
                            st.integers(0, 2**64 - 1)),
        "block_count": st.one_of(st.sampled_from([0, 1, 2, 128, 129, 16384, 16385, 2**32 - 1]),
                                 st.integers(0, 2**32 - 1)),
        "applied_through_seq": st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    }


# Unary data-plane RPCs, fuzzed like the control plane (before the data-plane tests below stop
# the source agent and the process server). A delta sync's block hashes are a read: OK writes nothing;
# an `applied_through_seq` past what the target has applied is UNAVAILABLE (`target-catching-up`).
HASHES_REFUSALS = LOOKUP | {C.UNAVAILABLE}
DATA_PLANE = [
    Rpc("/siterecovery.v1.ProcessServer/BlockHashes", rpb.BlockHashesRequest, "process-server", pki.SOURCE,
        HASHES_REFUSALS, "read", overrides=_hashes_request),
    Rpc("/siterecovery.v1.MasterTarget/BlockHashes", rpb.BlockHashesRequest, "master-target", pki.PROCESS_SERVER,
        HASHES_REFUSALS, "read", overrides=_hashes_request),
]

# RPCs without input fields (nothing to fuzz): ListMachines, GetPassphrase,
# RotatePassphrase, ListVcenters, Probe, and the standard health and reflection services.
NO_INPUT = {
    "/siterecovery.v1.Admin/ListMachines", "/siterecovery.v1.Admin/GetPassphrase",
    "/siterecovery.v1.Admin/RotatePassphrase", "/siterecovery.v1.Admin/ListVcenters",
    "/siterecovery.v1.Admin/ListAzureSites",
    "/siterecovery.v1.Protection/ListProtectionGroups", "/siterecovery.v1.Protection/ListProtectedMachines",
    "/siterecovery.v1.Protection/ListRecoveryPlans",
    "/siterecovery.v1.ProcessServer/Probe", "/siterecovery.v1.MasterTarget/Probe",
}
# Fuzzed by their own tests below (data plane, enrollment).
OWN_TESTS = {
    "/siterecovery.v1.ProcessServer/Replicate", "/siterecovery.v1.MasterTarget/Apply",
    "/siterecovery.v1.MasterTarget/Materialize", "/siterecovery.v1.Enrollment/Enroll",
}


REGRESSIONS = {
    "/siterecovery.v1.AgentControl/Heartbeat": agent_pb2.HeartbeatRequest(
        pairs=[rpb.PairStatus(oldest_pending_captured_at={"seconds": -(2**63)})]
    ),
}


def test_every_rpc_with_input_is_fuzzed():
    ours = {m for m in authz.RPC_ROLES if m.startswith("/siterecovery.")}
    covered = {r.method for r in CONTROL_PLANE + DATA_PLANE} | NO_INPUT | OWN_TESTS
    assert ours == covered, f"not fuzzed: {sorted(ours - covered)}; unknown: {sorted(covered - ours)}"
    for rpc in CONTROL_PLANE + DATA_PLANE:
        role = pki.SOURCE if rpc.role == "fuzz-source" else rpc.role
        assert authz.allowed(rpc.method, role), rpc.method


# -- calling and checking -------------------------------------------------------------


def call(channel: grpc.Channel, method: str, kind: str, request, timeout: float = 30) -> tuple[C, str]:
    serialize = type(request).SerializeToString if not isinstance(request, list) else type(request[0]).SerializeToString
    try:
        if kind == "unary_unary":
            channel.unary_unary(method, request_serializer=serialize)(request, timeout=timeout)
        elif kind == "unary_stream":
            for _ in channel.unary_stream(method, request_serializer=serialize)(request, timeout=timeout):
                pass
        else:
            for _ in channel.stream_stream(method, request_serializer=serialize)(iter(request), timeout=timeout):
                pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def check(fuzz: FuzzSite, port: str, channel: grpc.Channel, rpc_method: str, kind: str, request,
          refusals: frozenset[C], ok: str | None) -> tuple[C, str]:
    before = fuzz.digest()
    code, details = call(channel, rpc_method, kind, request)
    after = fuzz.digest()
    assert fuzz.healthy(port), f"{port} stopped answering after {rpc_method}"
    shown = repr(request)[:600]
    if code == OK:
        assert ok is not None, f"{rpc_method} accepted hostile input: {shown}"
        if ok == "read":
            assert after == before, f"{rpc_method} answered OK but wrote something: {shown}"
        return code, details
    assert code in refusals, f"{rpc_method} answered {code.name} ({details!r}) to {shown}"
    assert details.strip() and details != code.name, f"{rpc_method}: {code.name} without a message"
    assert "internal error" not in details, details
    assert after[0] == before[0], f"{rpc_method} refused ({code.name}: {details}) but changed the store: {shown}"
    assert after[1] == before[1], f"{rpc_method} refused ({code.name}: {details}) but wrote files: {shown}"
    return code, details


# -- targeted: names with ../ and absolute paths (before the random fuzzing) -----------------


def test_replayed_enrollment_is_refused(fuzz_site):
    request, _key = enroll_request(fuzz_site.site, hostname="replayed")
    stub = enrollment_pb2_grpc.EnrollmentStub(fuzz_site.channel("config-server", pki.ENROLLEE))
    first = stub.Enroll(request, timeout=10)
    assert first.agent_id
    code, details = check(fuzz_site, "config-server", fuzz_site.channel("config-server", pki.ENROLLEE),
                          "/siterecovery.v1.Enrollment/Enroll", "unary_unary", request,
                          frozenset({C.UNAUTHENTICATED}), None)
    assert "replay" in details
    # A fresh request (new nonce, new key) still enrolls: the agent's own retry path.
    again, _ = enroll_request(fuzz_site.site, hostname="replayed")
    second = stub.Enroll(again, timeout=10)
    assert second.agent_id != first.agent_id
    # Both are retired again so that the rest of the suite sees the site it expects.
    admin = admin_pb2_grpc.AdminStub(fuzz_site.channel("config-server", pki.ADMIN))
    for agent_id in (first.agent_id, second.agent_id):
        admin.RemoveServer(admin_pb2.RemoveServerRequest(server=agent_id), timeout=10)


@pytest.mark.parametrize("datastore", ["../", "../../etc", "/etc", "/", "{ds}/../..", "{ds}/../x", "{ds}/sub"])
def test_enable_replication_refuses_paths_as_datastore(fuzz_site, datastore):
    request = admin_pb2.EnableReplicationRequest(
        machine=fuzz_site.site.machine, disks=["disk0"], datastore=datastore.format(ds=fuzz_site.datastore)
    )
    _code, details = check(fuzz_site, "config-server", fuzz_site.channel("config-server", pki.ADMIN),
                           "/siterecovery.v1.Admin/EnableReplication", "unary_unary", request,
                           frozenset({C.NOT_FOUND, C.INVALID_ARGUMENT}), None)
    assert "datastore" in details


@pytest.mark.parametrize("disk", ["../disk0", "../../etc/passwd", "/etc/passwd", "disk0/..", "disk0\x00"])
def test_enable_replication_refuses_paths_as_disk(fuzz_site, disk):
    request = admin_pb2.EnableReplicationRequest(machine=fuzz_site.site.machine, disks=[disk])
    _code, details = check(fuzz_site, "config-server", fuzz_site.channel("config-server", pki.ADMIN),
                           "/siterecovery.v1.Admin/EnableReplication", "unary_unary", request,
                           frozenset({C.NOT_FOUND, C.INVALID_ARGUMENT}), None)
    assert "disk" in details


@pytest.mark.parametrize("output", ["../x.img", "/etc/x.img", "{ds}/../x.img", "{ds}/a/../../x.img", "{ds}",
                                    "x\x00.img", "{retention}/x.img"])
def test_materialize_refuses_paths_outside_the_datastore(fuzz_site, output):
    request = rpb.MaterializeRequest(
        pair_id=fuzz_site.pair["pair_id"], point=fuzz_site.tag_id,
        output_path=output.format(ds=fuzz_site.datastore, retention=fuzz_site.retention),
    )
    _code, details = check(fuzz_site, "master-target", fuzz_site.channel("master-target", pki.ADMIN),
                           "/siterecovery.v1.MasterTarget/Materialize", "unary_unary", request, BAD, None)
    assert "output_path" in details


# -- the control plane, fuzzed -------------------------------------------------------------


@pytest.mark.parametrize("rpc", CONTROL_PLANE, ids=[r.method.rsplit(".", 1)[1] for r in CONTROL_PLANE])
def test_fuzz_control_plane(fuzz_site, rpc):
    strategy = rpc.strategy(fuzz_site) if rpc.strategy else hostile.message(rpc.request, rpc.overrides(fuzz_site))
    channel = fuzz_site.channel(rpc.port, rpc.role)
    seen: dict[str, int] = {}

    @settings(max_examples=30)
    @given(request=strategy)
    # Regressions the fuzzing found (each was INTERNAL): a timestamp outside years 1-9999.
    @example(request=REGRESSIONS.get(rpc.method, rpc.request()))
    def fuzz(request):
        code, _ = check(fuzz_site, rpc.port, channel, rpc.method, rpc.kind, request, rpc.refusals, rpc.ok)
        seen[code.name] = seen.get(code.name, 0) + 1

    fuzz()
    print(rpc.method, seen)


# -- block hashes (delta sync): fuzzed, and ranges past the disk refused ---------------------------


@pytest.mark.parametrize("rpc", DATA_PLANE, ids=[r.method.split("/")[1].rsplit(".", 1)[1] for r in DATA_PLANE])
def test_fuzz_block_hashes(fuzz_site, rpc):
    test_fuzz_control_plane(fuzz_site, rpc)


@pytest.mark.parametrize("rpc", DATA_PLANE, ids=[r.method.split("/")[1].rsplit(".", 1)[1] for r in DATA_PLANE])
@pytest.mark.parametrize(("offset", "count"), [
    (0, 0), (0, 16385), (0, 129), (1, 1), (65535, 1), (DISK, 1), (DISK - 65536, 2), (2**64 - 65536, 1),
    (2**63, 16384), (2**64 - 1, 2**32 - 1),
])
def test_block_hashes_refuse_ranges_outside_the_disk(fuzz_site, rpc, offset, count):
    request = rpb.BlockHashesRequest(pair_id=fuzz_site.pair["pair_id"], offset=offset, block_count=count)
    _code, details = check(fuzz_site, rpc.port, fuzz_site.channel(rpc.port, rpc.role), rpc.method, "unary_unary",
                           request, BAD, None)
    assert "block" in details or "offset" in details, details


# -- oversized messages, expired and revoked certificates --------------------------------------


def _raw_channel(fuzz: FuzzSite, port: str, role: str) -> grpc.Channel:
    """A channel whose own send limit is off, so the server's limit is what is tested."""
    key, cert = fuzz.credentials[role]
    creds = grpc.ssl_channel_credentials(root_certificates=fuzz.ca.cert_pem, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(
        f"127.0.0.1:{fuzz.ports[port]}", creds,
        options=[("grpc.ssl_target_name_override", fuzz.names[port]), ("grpc.max_send_message_length", -1)],
    )


@pytest.mark.parametrize(("port", "role", "method", "kind", "build"), [
    ("config-server", pki.ADMIN, "/siterecovery.v1.Admin/AddVcenter", "unary_unary",
     lambda size: admin_pb2.AddVcenterRequest(name="big", host="127.0.0.1", password="p" * size)),
    ("config-server", "fuzz-source", "/siterecovery.v1.AgentControl/Heartbeat", "unary_unary",
     lambda size: agent_pb2.HeartbeatRequest(problems=[{"message": "m" * size}])),
    ("master-target", pki.ADMIN, "/siterecovery.v1.MasterTarget/Materialize", "unary_unary",
     lambda size: rpb.MaterializeRequest(pair_id="p", output_path="/" * size)),
    ("process-server", pki.SOURCE, "/siterecovery.v1.ProcessServer/Replicate", "stream_stream",
     lambda size: [rpb.ReplicationMessage(frame=rpb.Frame(seq=1, write=rpb.DataBlock(offset=0, length=size, data=b"\0" * size)))]),
])
def test_oversized_messages_are_refused(fuzz_site, port, role, method, kind, build):
    size = MAX_MESSAGE_BYTES + 1024
    with _raw_channel(fuzz_site, port, role) as channel:
        code, details = check(fuzz_site, port, channel, method, kind, build(size),
                              frozenset({C.RESOURCE_EXHAUSTED}), None)
    assert "larger than max" in details or "message" in details.lower()


def _backdated(ca: pki.CertificateAuthority, identity: pki.Identity) -> tuple[bytes, bytes]:
    """A certificate our CA signed, for `identity`, that expired yesterday (built by hand:
    the CA refuses to issue one)."""
    key = pki.generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, identity.id)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca._key, hashes.SHA256())
    )
    return pki.private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("port", ["config-server", "process-server", "master-target"])
def test_expired_certificate_is_refused(fuzz_site, port):
    key_cert = _backdated(fuzz_site.ca, pki.Identity(id="expired-admin", role=pki.ADMIN))
    with fuzz_site.channel(port, pki.ADMIN, key_cert=key_cert) as channel:
        # Refused in the TLS handshake, before any RPC: the client sees the connection fail.
        before = fuzz_site.digest()
        code, _ = call(channel, "/grpc.health.v1.Health/Check", "unary_unary",
                       __import__("grpc_health.v1.health_pb2", fromlist=["x"]).HealthCheckRequest(), timeout=10)
        assert code == C.UNAVAILABLE
        assert fuzz_site.digest() == before
    assert fuzz_site.healthy(port)


def test_revoked_certificates_are_refused(fuzz_site):
    # An agent, enrolled and then removed with `srctl servers remove`.
    request, key_pem = enroll_request(fuzz_site.site, hostname="to-be-revoked")
    reply = enrollment_pb2_grpc.EnrollmentStub(fuzz_site.channel("config-server", pki.ENROLLEE)).Enroll(request, timeout=10)
    admin = admin_pb2_grpc.AdminStub(fuzz_site.channel("config-server", pki.ADMIN))
    admin.RemoveServer(admin_pb2.RemoveServerRequest(server=reply.agent_id), timeout=10)
    revoked = (key_pem, reply.certificate_pem)
    with fuzz_site.channel("config-server", pki.SOURCE, key_cert=revoked) as channel:
        code, details = check(fuzz_site, "config-server", channel, "/siterecovery.v1.AgentControl/Register",
                              "unary_unary", agent_pb2.RegisterRequest(inventory={"host": {"hostname": "x"}}),
                              frozenset({C.UNAUTHENTICATED}), None)
        assert "revoked" in details
    # The master target learns it with its next heartbeat and refuses it too.
    with fuzz_site.channel("master-target", pki.SOURCE, key_cert=revoked) as channel:
        wait_for(lambda: call(channel, "/siterecovery.v1.MasterTarget/Probe", "unary_unary",
                              __import__("siterecovery.common.pb.dataplane_pb2", fromlist=["x"]).ProbeRequest())[0]
                 == C.UNAUTHENTICATED, what="the master target to refuse the revoked certificate")
    # An operator, added and then removed with `srctl user remove`.
    out = fuzz_site.site.root / "op-revoked"
    assert fuzz_site.site.srctl("user", "add", "revoked-op", "--role", "admin", "--out", str(out)).returncode == 0
    op = ((out / "client.key").read_bytes(), (out / "client.crt").read_bytes())
    admin.RemoveOperator(admin_pb2.RemoveOperatorRequest(name="revoked-op"), timeout=10)
    with fuzz_site.channel("config-server", pki.ADMIN, key_cert=op) as channel:
        code, details = check(fuzz_site, "config-server", channel, "/siterecovery.v1.Admin/RemoveServer",
                              "unary_unary", admin_pb2.RemoveServerRequest(server=fuzz_site.pair["process_server_id"]),
                              frozenset({C.UNAUTHENTICATED}), None)
        assert "revoked" in details


# -- the data plane ------------------------------------------------------------------------

FRAME_REFUSALS = frozenset({C.INVALID_ARGUMENT, C.DATA_LOSS, C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION})
U64 = 2**64 - 1


def _frame_strategy(fuzz: FuzzSite) -> st.SearchStrategy:
    near_end = st.sampled_from([DISK - 1, DISK, DISK + 1, DISK - 4096, U64, U64 - 4095, 2**63, 2**63 - 1])
    block = st.fixed_dictionaries({}, optional={
        "offset": st.one_of(near_end, st.integers(0, U64)), "length": st.one_of(st.sampled_from([DISK - 1, DISK, DISK + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)),
        "data": hostile.BYTES,
    })
    return hostile.message(rpb.Frame, {"write": block, "zero": block.map(lambda b: {k: v for k, v in b.items() if k != "data"})})


def _stream(fuzz: FuzzSite) -> st.SearchStrategy:
    pair_id = fuzz.pair["pair_id"]
    opening = st.one_of(
        st.just(rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id=pair_id, disk_size_bytes=DISK))),
        hostile.message(rpb.ReplicationMessage, {"pair_id": hostile.mixed(pair_id), "disk_size_bytes": st.sampled_from([DISK, 0, U64])}),
    )
    frames_ = st.lists(st.one_of(
        _frame_strategy(fuzz).map(lambda f: rpb.ReplicationMessage(frame=f)),
        hostile.message(rpb.ReplicationMessage),
    ), max_size=4)
    return st.builds(lambda o, f: [o, *f], opening, frames_)


def _valid_frames(pair_id: str, seq: int) -> list[rpb.Frame]:
    """Frames with correct checksums that reach past the end of the 8 MiB disk."""
    return [
        frames.write_frame(pair_id, seq, DISK - 4096 + 1, b"\xab" * 4096),
        frames.write_frame(pair_id, seq, DISK, b"\xab"),
        frames.write_frame(pair_id, seq, U64 - 4095, b"\xab" * 4096),
        frames.write_frame(pair_id, seq, U64, b"\xab"),
        frames.zero_frame(pair_id, seq, DISK - 1, 2),
        frames.zero_frame(pair_id, seq, 0, U64),
        frames.zero_frame(pair_id, seq, U64, U64),
    ]


def _fuzz_stream(fuzz: FuzzSite, port: str, role: str, method: str, max_examples: int = 30) -> None:
    channel = fuzz.channel(port, role)

    @settings(max_examples=max_examples)
    @given(messages=_stream(fuzz))
    def run(messages):
        # OK: the stream held nothing worth writing (no frames, or only ones already held).
        check(fuzz, port, channel, method, "stream_stream", messages, FRAME_REFUSALS, "read")

    run()


def _past_the_end(fuzz: FuzzSite, port: str, role: str, method: str) -> None:
    pair_id = fuzz.pair["pair_id"]
    for frame in _valid_frames(pair_id, seq=10**9):
        messages = [rpb.ReplicationMessage(open=rpb.StreamOpen(pair_id=pair_id, disk_size_bytes=DISK)),
                    rpb.ReplicationMessage(frame=frame)]
        _code, details = check(fuzz, port, fuzz.channel(port, role), method, "stream_stream", messages, BAD, None)
        assert "past the end" in details, details


def test_replicate_refuses_frames_past_the_end_of_the_disk(fuzz_site):
    fuzz_site.stop("source-agent")  # no real stream competes for the pair from here on
    _past_the_end(fuzz_site, "process-server", pki.SOURCE, "/siterecovery.v1.ProcessServer/Replicate")


def test_fuzz_replicate(fuzz_site):
    _fuzz_stream(fuzz_site, "process-server", pki.SOURCE, "/siterecovery.v1.ProcessServer/Replicate")


def test_apply_refuses_frames_past_the_end_of_the_disk(fuzz_site):
    fuzz_site.stop("process-server")  # its forwarder would compete for the pair's apply stream
    _past_the_end(fuzz_site, "master-target", pki.PROCESS_SERVER, "/siterecovery.v1.MasterTarget/Apply")


def test_fuzz_apply(fuzz_site):
    _fuzz_stream(fuzz_site, "master-target", pki.PROCESS_SERVER, "/siterecovery.v1.MasterTarget/Apply")


def test_fuzz_materialize(fuzz_site):
    channel = fuzz_site.channel("master-target", pki.ADMIN)
    ds = fuzz_site.datastore
    strategy = hostile.message(rpb.MaterializeRequest, {
        "pair_id": hostile.mixed(fuzz_site.pair["pair_id"]),
        "point": hostile.mixed("latest", "", fuzz_site.tag_id),
        "output_path": hostile.mixed(f"{ds}/../x.img", f"{ds}/a/../../x.img", str(ds), f"{fuzz_site.retention}/x.img",
                                     fuzz_site.pair["target_path"], "/etc/x.img", "relative.img"),
    })

    @settings(max_examples=40)
    @given(request=strategy)
    @example(request=rpb.MaterializeRequest(pair_id=fuzz_site.pair["pair_id"], point=fuzz_site.tag_id,
                                            output_path=fuzz_site.pair["target_path"]))
    # In place on a pair that replicates: refused (pair-not-paused), the disk untouched.
    @example(request=rpb.MaterializeRequest(pair_id=fuzz_site.pair["pair_id"], point=fuzz_site.tag_id, in_place=True))
    def run(request):
        # OK only for "latest" (the disk itself, nothing copied); ABORTED: the output exists.
        check(fuzz_site, "master-target", channel, "/siterecovery.v1.MasterTarget/Materialize", "unary_unary",
              request, frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}), "read")

    run()


# -- enrollment, last: wrong proofs lock this host out (RESOURCE_EXHAUSTED) ------------------


def test_fuzz_enroll(fuzz_site):
    channel = fuzz_site.channel("config-server", pki.ENROLLEE)
    strategy = hostile.message(enrollment_pb2.EnrollRequest, {
        "csr_der": hostile.mixed(_valid_csr(), base=hostile.BYTES),
        "client_nonce": st.one_of(st.binary(min_size=32, max_size=32), hostile.BYTES),
    })

    @settings(max_examples=40)
    @given(request=strategy)
    def run(request):
        check(fuzz_site, "config-server", channel, "/siterecovery.v1.Enrollment/Enroll", "unary_unary", request,
              frozenset({C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED}), None)

    run()


def test_admin_stub_still_works(fuzz_site):
    """After everything above, the configuration server still serves its operators."""
    reply = admin_pb2_grpc.AdminStub(fuzz_site.channel("config-server", pki.ADMIN)).ListServers(
        admin_pb2.ListServersRequest(), timeout=10
    )
    assert reply.servers
    assert dataplane_pb2_grpc  # the data-plane stubs import cleanly (used via raw method names above)
