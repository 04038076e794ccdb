"""Registration and heartbeats of enrolled agents.

An agent's server row is created at enrollment; `register` fills in what it
reports about itself (and, for a source agent, the machine it protects), and
`heartbeat` keeps it alive (controller/heartbeats.py writes heartbeats in
groups). Both are idempotent: an agent repeats them freely after any restart
of either side.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime

from siterecovery.common import errors, netidentity, pki
from siterecovery.common.settings import parse_endpoint
from siterecovery.controller import registration
from siterecovery.controller.heartbeats import HeartbeatWriter
from siterecovery.controller.jobs.engine import JobKind, create_job
from siterecovery.controller.store.base import ChangeCounters, Heartbeat, MachineRecord, ServerRecord, Store

MAX_DISKS = 256
MAX_DIRECTORIES = 64
MAX_ADDRESSES = 64
MAX_PROBLEMS = 64
MAX_TEXT = 1024


def _known_server(store: Store, identity: pki.Identity) -> ServerRecord:
    try:
        server = store.get_server(identity.id)
    except errors.NotFound as exc:
        raise errors.NotFound(
            f"agent {identity.id} is not known to this configuration server",
            hint="remove the agent's identity directory and enroll it again with the passphrase",
            code="agent-unknown",
        ) from exc
    if server.role != identity.role:
        raise errors.PermissionDenied(
            f"agent {identity.id} enrolled as {server.role}, not {identity.role}",
            code="role-mismatch",
        )
    return server


def _check_text(name: str, value: str, *, required: bool = False) -> None:
    if required and not value:
        raise errors.InvalidInput(f"{name} is empty", code="inventory-invalid")
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise errors.InvalidInput(f"{name} is too long or has control characters", code="inventory-invalid")


def validate_inventory(role: str, inventory: dict) -> None:
    host = inventory.get("host", {})
    _check_text("host.hostname", host.get("hostname", ""), required=True)
    _check_text("host.os", host.get("os", ""))
    _check_text("host.machine_uuid", host.get("machine_uuid", ""))
    addresses = host.get("addresses", [])
    if len(addresses) > MAX_ADDRESSES:
        raise errors.InvalidInput(f"more than {MAX_ADDRESSES} addresses", code="inventory-invalid")
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise errors.InvalidInput(f"{address!r} is not an IP address", code="inventory-invalid") from exc
    disks = inventory.get("disks", [])
    if len(disks) > MAX_DISKS:
        raise errors.InvalidInput(f"more than {MAX_DISKS} disks", code="inventory-invalid")
    identities = [d.get("identity", "") for d in disks]
    for disk in disks:
        _check_text("disk.identity", disk.get("identity", ""), required=True)
        _check_text("disk.path", disk.get("path", ""), required=True)
    if len(set(identities)) != len(identities):
        raise errors.InvalidInput("two disks report the same identity", code="inventory-invalid")
    if len(inventory.get("directories", [])) > MAX_DIRECTORIES:
        raise errors.InvalidInput(f"more than {MAX_DIRECTORIES} directories", code="inventory-invalid")
    if "network" in inventory:
        if role != pki.SOURCE:
            raise errors.InvalidInput("only a source agent reports a network identity", code="inventory-invalid")
        try:
            netidentity.validate_dict(inventory["network"])
        except errors.InvalidInput as exc:
            raise errors.InvalidInput(
                f"network identity: {exc.message}", hint=exc.hint, code="inventory-invalid"
            ) from exc
    endpoint = inventory.get("data_endpoint", "")
    if role in (pki.PROCESS_SERVER, pki.MASTER_TARGET):
        if not endpoint:
            raise errors.InvalidInput(f"a {role} must report its data endpoint", code="inventory-invalid")
        parse_endpoint(endpoint, default_port=9443)


def register(
    store: Store,
    identity: pki.Identity,
    inventory: dict,
    *,
    now: datetime,
    first_registration_job: JobKind | None = None,
) -> ServerRecord:
    """Record what the agent reports; the first time, start `first_registration_job` for it."""
    first = _known_server(store, identity).registered_at is None
    validate_inventory(identity.role, inventory)
    host = inventory.get("host", {})
    server = store.register_server(identity.id, hostname=host["hostname"], inventory=inventory, now=now)
    if identity.role == pki.SOURCE:
        store.upsert_machine(
            MachineRecord(
                id=identity.id,
                server_id=identity.id,
                hostname=host["hostname"],
                os=host.get("os", ""),
                addresses=list(host.get("addresses", [])),
                disks=list(inventory.get("disks", [])),
                updated_at=now,
            )
        )
    if first and first_registration_job is not None:
        create_job(
            store,
            first_registration_job,
            target=registration.target_of(server),
            params={"server_id": server.id},
            now=now,
        )
    return server


def heartbeat(
    store: Store,
    identity: pki.Identity,
    *,
    problems: list[dict],
    directories: list[dict] | None,
    now: datetime,
    writer: HeartbeatWriter | None = None,
) -> ChangeCounters:
    """Record the heartbeat (through `writer`, grouped with others, when given); return the
    store's change counters as read in the transaction that committed it.

    One guarded write and no read: the server row is updated only when it exists
    with the caller's role; only when it is not is the row read, to say why.
    """
    if len(problems) > MAX_PROBLEMS or (directories and len(directories) > MAX_DIRECTORIES):
        raise errors.InvalidInput("heartbeat carries too many entries", code="heartbeat-invalid")
    for problem in problems:
        _check_text("problem.code", problem.get("code", ""))
        _check_text("problem.message", problem.get("message", ""))
    beat = Heartbeat(server_id=identity.id, role=identity.role, problems=problems, directories=directories, now=now)
    if writer is not None:
        recorded, counters = writer.record(beat)
    else:
        alone = store.record_heartbeat_group([beat])
        recorded, counters = alone.recorded[0], alone.counters
    if not recorded:
        _known_server(store, identity)  # NotFound or PermissionDenied, with the fix
        raise errors.NotFound(f"agent {identity.id} was removed meanwhile", code="agent-unknown")
    return counters
