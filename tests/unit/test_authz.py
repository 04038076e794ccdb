"""The role table covers every RPC of the contract, and nothing else."""

from siterecovery.common import authz
from siterecovery.common.pb import admin_pb2, agent_pb2, dataplane_pb2, enrollment_pb2, protection_pb2


def contract_methods() -> set[str]:
    methods = set()
    for module in (admin_pb2, agent_pb2, dataplane_pb2, enrollment_pb2, protection_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_every_contract_rpc_has_a_rule():
    assert contract_methods() - set(authz.RPC_ROLES) == set()


def test_no_rule_names_a_missing_rpc():
    standard = {m for m in authz.RPC_ROLES if m.startswith("/grpc.")}
    assert set(authz.RPC_ROLES) - standard == contract_methods()


def test_unknown_method_is_refused_for_everyone():
    for role in ("source", "process-server", "master-target", "admin", "reader", "enrollee"):
        assert not authz.allowed("/siterecovery.v1.Admin/DropEverything", role)


def test_enrollee_may_only_enroll():
    allowed = {m for m in authz.RPC_ROLES if authz.allowed(m, "enrollee")}
    assert allowed == {"/siterecovery.v1.Enrollment/Enroll", "/grpc.health.v1.Health/Check"}


def test_reader_changes_nothing():
    assert not authz.allowed("/siterecovery.v1.Admin/RotatePassphrase", "reader")
    assert not authz.allowed("/siterecovery.v1.Admin/GetPassphrase", "reader")
    assert authz.allowed("/siterecovery.v1.Admin/ListServers", "reader")
