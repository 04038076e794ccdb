"""Who may call what: one table for every RPC on every port.

The caller's role comes from its certificate (see common/pki.py). Anything not
in the table is refused, so a new RPC is unreachable until it is added here.
"""

from __future__ import annotations

from siterecovery.common import pki

AGENTS = frozenset({pki.SOURCE, pki.PROCESS_SERVER, pki.MASTER_TARGET})
OPERATORS = frozenset({pki.ADMIN, pki.READER})
ANYONE_ENROLLED = AGENTS | OPERATORS

# Full method name → roles allowed to call it.
RPC_ROLES: dict[str, frozenset[str]] = {
    # Configuration server, :443
    "/siterecovery.v1.Enrollment/Enroll": frozenset({pki.ENROLLEE}),
    "/siterecovery.v1.AgentControl/Register": AGENTS,
    "/siterecovery.v1.AgentControl/Heartbeat": AGENTS,
    "/siterecovery.v1.AgentControl/HoldBarrier": frozenset({pki.SOURCE}),
    "/siterecovery.v1.Admin/ListServers": OPERATORS,
    "/siterecovery.v1.Admin/RemoveServer": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/AddOperator": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListOperators": OPERATORS,
    "/siterecovery.v1.Admin/RemoveOperator": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/CreateBackup": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListMachines": OPERATORS,
    "/siterecovery.v1.Admin/ListJobs": OPERATORS,
    "/siterecovery.v1.Admin/GetJob": OPERATORS,
    "/siterecovery.v1.Admin/WatchJob": OPERATORS,
    "/siterecovery.v1.Admin/GetPassphrase": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/RotatePassphrase": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/EnableReplication": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListPairs": OPERATORS,
    "/siterecovery.v1.Admin/SetPairState": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/DisableReplication": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListRecoveryPoints": OPERATORS,
    "/siterecovery.v1.Admin/CreateRecoveryPoint": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/MaterializePoint": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/OpenPointView": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ClosePointView": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/AddVcenter": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListVcenters": OPERATORS,
    "/siterecovery.v1.Admin/UpdateVcenterCredentials": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/RemoveVcenter": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/DiscoverVcenter": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/GetVcenterInventory": OPERATORS,
    "/siterecovery.v1.Admin/AddAzureSite": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/ListAzureSites": OPERATORS,
    "/siterecovery.v1.Admin/UpdateAzureSiteCredentials": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/RemoveAzureSite": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Admin/DeployAzureProcessServer": frozenset({pki.ADMIN}),
    # srctl doctor: reads only, so a reader may run it too.
    "/siterecovery.v1.Admin/Diagnose": OPERATORS,
    "/siterecovery.v1.Protection/CreateProtectionGroup": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/ListProtectionGroups": OPERATORS,
    "/siterecovery.v1.Protection/RemoveProtectionGroup": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/ProtectMachine": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/StartWorkflow": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/ListProtectedMachines": OPERATORS,
    "/siterecovery.v1.Protection/GetProtectedMachine": OPERATORS,
    "/siterecovery.v1.Protection/SaveRecoveryPlan": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/ListRecoveryPlans": OPERATORS,
    "/siterecovery.v1.Protection/RemoveRecoveryPlan": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/StartPlanWorkflow": frozenset({pki.ADMIN}),
    "/siterecovery.v1.Protection/ResumeJob": frozenset({pki.ADMIN}),
    # Process server, :9443
    "/siterecovery.v1.ProcessServer/Probe": frozenset({pki.SOURCE, pki.ADMIN}),
    "/siterecovery.v1.ProcessServer/Replicate": frozenset({pki.SOURCE}),
    # A delta sync: the pair's source agent only (the process server checks ownership).
    "/siterecovery.v1.ProcessServer/BlockHashes": frozenset({pki.SOURCE}),
    # Master target, :9443
    "/siterecovery.v1.MasterTarget/Probe": frozenset({pki.PROCESS_SERVER, pki.ADMIN}),
    "/siterecovery.v1.MasterTarget/Apply": frozenset({pki.PROCESS_SERVER}),
    # The configuration server calls it (with its admin client certificate) for
    # failover and `srctl recovery-points materialize`.
    "/siterecovery.v1.MasterTarget/Materialize": frozenset({pki.ADMIN}),
    "/siterecovery.v1.MasterTarget/OpenView": frozenset({pki.ADMIN}),
    "/siterecovery.v1.MasterTarget/CloseView": frozenset({pki.ADMIN}),
    # Asked by the pair's process server for its source (the master target checks it).
    "/siterecovery.v1.MasterTarget/BlockHashes": frozenset({pki.PROCESS_SERVER}),
    # Every port
    "/grpc.health.v1.Health/Check": ANYONE_ENROLLED | {pki.ENROLLEE},
    "/grpc.health.v1.Health/Watch": ANYONE_ENROLLED,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": OPERATORS,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": OPERATORS,
}


def allowed(method: str, role: str) -> bool:
    return role in RPC_ROLES.get(method, frozenset())
