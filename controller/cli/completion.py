"""Shell completion of names the server knows: protected machines, plans, groups, jobs, endpoints.

Typer's completion (`srctl --install-completion`) calls these only while the
user presses TAB, never for `--help` or a command, so they cost nothing
otherwise. Each asks the configuration server once, with a short deadline, and
completes nothing when it cannot answer (no profile, server down, a reader
asking for something only an admin may list): completion must never fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import protection_pb2 as ppb

# Long enough for a TLS handshake on a LAN; short enough not to hang a TAB key.
COMPLETION_TIMEOUT = 2.0


def _names(ctx: typer.Context, method: str, request, pick: Callable, *, service: str = "admin") -> list[str]:
    from siterecovery.controller.cli.client import Profile

    config = ctx.find_root().params.get("config")
    try:
        chosen = Profile.find(Path(config) if config else None)
        response = getattr(getattr(chosen, service)(), method)(request, timeout=COMPLETION_TIMEOUT)
        return sorted({name for name in pick(response) if name})
    except Exception:  # a completion that fails offers nothing, and says nothing
        return []


def _completer(method: str, request_type, pick: Callable, *, service: str = "admin") -> Callable:
    def complete(ctx: typer.Context, incomplete: str) -> list[str]:
        return [n for n in _names(ctx, method, request_type(), pick, service=service) if n.startswith(incomplete)]

    return complete


protected_machines = _completer("ListProtectedMachines", ppb.ListProtectedMachinesRequest,
                                lambda r: [m.name for m in r.machines], service="protection")
plans = _completer("ListRecoveryPlans", ppb.ListRecoveryPlansRequest, lambda r: [p.name for p in r.plans],
                   service="protection")
groups = _completer("ListProtectionGroups", ppb.ListProtectionGroupsRequest,
                    lambda r: [g.name for g in r.groups if not g.failback_of], service="protection")
jobs = _completer("ListJobs", admin_pb2.ListJobsRequest, lambda r: [j.id for j in r.jobs])
machines = _completer("ListMachines", admin_pb2.ListMachinesRequest, lambda r: [m.hostname for m in r.machines])
vcenters = _completer("ListVcenters", admin_pb2.ListVcentersRequest, lambda r: [v.name for v in r.vcenters])
azure_sites = _completer("ListAzureSites", admin_pb2.ListAzureSitesRequest, lambda r: [s.name for s in r.sites])
servers = _completer("ListServers", admin_pb2.ListServersRequest,
                     lambda r: [s.hostname for s in r.servers if s.id != "config-server"])

ProtectedMachineArg = Annotated[str, typer.Argument(help="the protected machine (see `srctl machine list`)",
                                                    autocompletion=protected_machines)]
PlanArg = Annotated[str, typer.Argument(help="the recovery plan (see `srctl plan list`)", autocompletion=plans)]
GroupArg = Annotated[str, typer.Argument(help="the protection group (see `srctl group list`)", autocompletion=groups)]
JobArg = Annotated[str, typer.Argument(help="the job's id (see `srctl jobs list`)", autocompletion=jobs)]
