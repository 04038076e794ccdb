"""The one state-store interface of the configuration server, and its records.

Records are frozen dataclasses of plain Python values (no protobuf): datetimes
are timezone-aware UTC, JSON-able dicts and lists hold inventory, problems,
job parameters and step outputs. Servicers convert messages to these.

What is stored (the SQL schema is spelled out in `sql.py`):

- servers  - one row per enrolled agent (source, process server, master
  target): identity from its certificate, its last inventory, its last
  heartbeat and the problems it reported then, and when it was revoked.
- machines - one row per protected host (for now one per source agent).
- jobs     - one row per long action, with `version` bumped on every change
  to the job or to one of its steps, so a reader can tell that it changed.
- steps    - ordered rows under a job: status, attempt, progress, lease owner
  and lease expiry, output.
- pairs    - one row per replicated disk: source disk -> target disk file on a
  master target, through a process server, with its policy and desired state.
- pair_reports - the last PairStatus each agent of a pair reported (one row
  per pair and agent), as JSON; recovery points come from the master target's.
- tag_requests - recovery points asked for (on demand, multi-VM) and not yet
  seen at the master target; delivered to the source agent until then.
- change_counters - how often pairs and tag requests changed (`ChangeCounters`),
  counted in the transaction of each change: a heartbeat learns whether its
  answer changed without reading the pairs.
- vcenters - one row per vCenter or standalone ESXi endpoint: address, user,
  the password encrypted by the controller (opaque here), how its certificate
  is trusted, and how its last discovery went.
- vcenter_inventories - the last successful discovery of each endpoint, one
  JSON document (removed with its endpoint).
- azure_sites - one row per Azure site (subscription, resource group, region,
  network, storage account: `common.azure.site.AzureSite` as JSON) with its
  service principal's secret encrypted by the controller (opaque here).

Transaction boundaries: every method is one transaction; nothing is committed
half-way, so a crash (process killed, power lost) in the middle of any method
leaves the store as it was before the call or as it is after it, never in
between. Multi-call sequences are not atomic. The job engine is built for that:
a step is claimed (one transaction), executed outside any transaction, then
recorded (another transaction); a crash between leaves the step `running` with
a lease that expires, after which another runner claims it and runs it again,
which is why steps must be idempotent.

Concurrency: compare-and-set writes (`set_job_status`, `claim_step`,
`renew_lease`, `update_step`) return False/None when the row was not in the
expected state; they never overwrite someone else's change. Times (`now`) are
passed in by the caller, never read from the database clock, so replicas must
keep their clocks in step to well under a lease length.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from siterecovery.common.errors import InvalidInput

ROLES = ("source", "process-server", "master-target")  # server roles stored here


@dataclass(frozen=True)
class ServerRecord:
    id: str
    role: str
    hostname: str
    cert_serial: str
    cert_fingerprint: str
    enrolled_at: datetime
    last_heartbeat_at: datetime | None = None
    registered_at: datetime | None = None
    inventory: dict = field(default_factory=dict)  # JSON-able dict (protobuf Inventory as dict)
    problems: list = field(default_factory=list)  # list of {"code","severity","message"}
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Heartbeat:
    """One agent's heartbeat as `record_heartbeats` writes it: `directories`, when given,
    replace inventory["directories"]."""

    server_id: str
    role: str
    problems: list
    directories: list | None
    now: datetime


OPERATOR_ROLES = ("admin", "reader")


@dataclass(frozen=True)
class OperatorRecord:
    """A person or script with a client certificate; one row per certificate issued."""

    identity_id: str
    name: str
    role: str
    cert_serial: str
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class MachineRecord:
    id: str
    server_id: str
    hostname: str
    os: str
    addresses: list = field(default_factory=list)
    disks: list = field(default_factory=list)  # list of {"identity","path","size_bytes","name"}
    updated_at: datetime | None = None


@dataclass(frozen=True)
class StepRecord:
    job_id: str
    index: int
    name: str
    status: str
    attempt: int = 0
    progress: float = 0.0
    message: str = ""
    error_code: str = ""
    lease_owner: str = ""
    lease_expires_at: datetime | None = None
    output: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    target: str
    status: str
    created_at: datetime
    updated_at: datetime
    params: dict = field(default_factory=dict)
    steps: tuple[StepRecord, ...] = ()
    error_code: str = ""
    error_message: str = ""
    version: int = 0  # incremented on every change of the job or one of its steps

    def step(self, index: int) -> StepRecord:
        return self.steps[index]

    def outputs(self) -> dict[str, dict]:
        """Outputs of the steps that produced one, by step name."""
        return {s.name: s.output for s in self.steps if s.output}


PAIR_MODES = ("nbd", "scan")
PAIR_DESIRED_STATES = ("replicating", "paused")
# How a pair's first synchronisation runs: copy every block, or compare block
# hashes with a target disk that already holds an older copy (failback to the
# original disk, reprotect onto an existing replica) and send only the differences.
PAIR_SYNC_KINDS = ("full", "delta")
# Where a pair's frames end: a master target writing a disk file, or (forward
# protection to Azure) the process server writing a page blob.
PAIR_TARGET_KINDS = ("master-target", "azure-page-blob")


@dataclass(frozen=True)
class PairRecord:
    """One replicated disk. `id` is chosen by the caller (see controller/replication.py)."""

    id: str
    machine_id: str
    source_server_id: str
    disk_name: str
    disk_identity: str
    disk_size_bytes: int
    mode: str
    process_server_id: str
    master_target_id: str
    target_path: str
    journal_dir: str
    created_at: datetime
    updated_at: datetime
    policy: dict = field(default_factory=dict)
    desired_state: str = "replicating"
    group_id: str = ""
    sync_kind: str = "full"
    target_kind: str = "master-target"
    # What the target kind needs beyond target_path (e.g. the Azure site and blob name).
    target_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PairReport:
    """What one agent last said about one pair (a PairStatus as a JSON dict)."""

    pair_id: str
    server_id: str
    role: str
    status: dict
    reported_at: datetime


@dataclass(frozen=True)
class TagRequestRecord:
    pair_id: str
    tag_id: str
    kind: str  # "crash-consistent" | "app-consistent" | "multi-vm-consistent"
    created_at: datetime
    expires_at: datetime
    group_id: str = ""
    # Set for a multi-VM barrier (see replication.proto, TagRequest).
    cut_at: datetime | None = None
    held_at: datetime | None = None
    outcome: str = ""  # "", "committed" or "aborted"


BARRIER_WAIT, BARRIER_COMMITTED, BARRIER_ABORTED = "", "committed", "aborted"


@dataclass(frozen=True, order=True)
class ChangeCounters:
    """How often what heartbeat answers hold has changed; each only ever grows.

    `pairs` counts changes to pairs (created, changed, deleted) and to the data
    endpoint of a server some pair names; `tag_requests` counts tag requests
    added, removed or decided. A change and its count commit together.
    """

    pairs: int = 0
    tag_requests: int = 0


@dataclass(frozen=True)
class RecordedHeartbeats:
    """What `record_heartbeat_group` did: per heartbeat, whether its server was there and
    was updated; and the change counters as that transaction read them after its writes."""

    recorded: list[bool]
    counters: ChangeCounters


@dataclass(frozen=True)
class PairsSnapshot:
    """Every pair and the data endpoint of every server a pair names, read with the
    counters in one snapshot (so `counters.pairs` says exactly which pairs these are)."""

    counters: ChangeCounters
    pairs: tuple[PairRecord, ...]
    endpoints: dict[str, str]


@dataclass(frozen=True)
class TagRequestsSnapshot:
    """Every tag request (expired ones until they are removed), with its pair's source
    server id, read with the counters in one snapshot."""

    counters: ChangeCounters
    requests: tuple[tuple[str, TagRequestRecord], ...]

DISCOVERY_STATUSES = ("", "ok", "failed")  # "" = never discovered


@dataclass(frozen=True)
class VcenterRecord:
    """A vCenter or standalone ESXi endpoint. `secret` is ciphertext, never a clear password."""

    id: str
    name: str
    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    trust: dict  # {"ca_pem": str, "thumbprint": str, "insecure": bool}
    created_at: datetime
    updated_at: datetime
    discovery_requested_at: datetime | None = None
    discovered_at: datetime | None = None
    discovery_status: str = ""
    discovery_error: str = ""


@dataclass(frozen=True)
class VcenterInventory:
    vcenter_id: str
    discovered_at: datetime
    document: dict


@dataclass(frozen=True)
class ProtectionGroupRecord:
    """A protection group; `failback_of` is set on a `<name>_Failback` twin (the primary's id)."""

    id: str
    name: str
    policy: dict
    created_at: datetime
    failback_of: str = ""


@dataclass(frozen=True)
class RecoveryPlanRecord:
    """A recovery plan; `definition` is controller/protection/plans.py's document."""

    id: str
    name: str
    definition: dict
    created_at: datetime
    updated_at: datetime
    version: int = 0


@dataclass(frozen=True)
class ProtectedItemRecord:
    """A machine under protection: its lifecycle state and what each site holds of it.

    `machine_id` is the machine first protected (its on-premises source agent);
    `details` is controller/protection/items.py's document (VMs on each side,
    pairs, the network identity recorded at protection, the last failover).
    """

    id: str
    name: str
    machine_id: str
    group_id: str
    state: str
    details: dict
    created_at: datetime
    updated_at: datetime
    version: int = 0


@dataclass(frozen=True)
class AzureSiteRecord:
    """An Azure site. `settings` is `AzureSite.to_dict()`; `secret` is ciphertext, never the clear secret."""

    id: str
    name: str
    settings: dict
    secret: str = field(repr=False)
    created_at: datetime
    updated_at: datetime


class Store(ABC):
    """Inventory and jobs of one configuration server (or of several replicas)."""

    # --- servers -------------------------------------------------------------

    @abstractmethod
    def add_server(self, server: ServerRecord) -> None:
        """Store a newly enrolled server. Conflict when its id is taken."""

    @abstractmethod
    def get_server(self, server_id: str) -> ServerRecord:
        """NotFound when there is no such server."""

    @abstractmethod
    def list_servers(self, role: str | None = None) -> list[ServerRecord]:
        """All servers (or those of one role), ordered by role, then hostname."""

    @abstractmethod
    def register_server(
        self, server_id: str, *, hostname: str, inventory: dict, now: datetime
    ) -> ServerRecord:
        """Replace hostname and inventory; set registered_at and last_heartbeat_at to now.

        This records facts; whether a revoked server may register is the
        caller's rule. NotFound when there is no such server.
        """

    @abstractmethod
    def record_heartbeat(
        self, server_id: str, *, problems: list, directories: list | None, now: datetime
    ) -> ServerRecord:
        """Set last_heartbeat_at and problems; replace inventory["directories"] when given.

        NotFound when there is no such server.
        """

    def record_heartbeats(self, beats: Sequence[Heartbeat]) -> list[bool]:
        """`record_heartbeat_group(beats).recorded`."""
        return self.record_heartbeat_group(beats).recorded

    @abstractmethod
    def record_heartbeat_group(self, beats: Sequence[Heartbeat]) -> RecordedHeartbeats:
        """Record many heartbeats in one transaction, so one commit for all of them.

        Each does what `record_heartbeat` does, but only to a server with its id *and*
        role, and no server row is read back: the result says, per heartbeat, whether
        such a server was there and was updated. The same transaction then reads the
        change counters, so every change committed before this group shows in them.
        InvalidInput (nothing written) when any heartbeat's problems or directories
        are not JSON lists.
        """

    @abstractmethod
    def revoke_server(self, server_id: str, *, now: datetime) -> ServerRecord:
        """Mark the server revoked; revoking again keeps the first time. NotFound."""

    @abstractmethod
    def revoked_server_ids(self) -> list[str]:
        """The ids of every revoked server (a small query: every port checks it often)."""

    # --- backup ----------------------------------------------------------------

    @abstractmethod
    def export_tables(self) -> tuple[str | None, dict[str, list[dict[str, Any]]]]:
        """(schema revision, every row of every table), read in one consistent snapshot."""

    @abstractmethod
    def import_tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Insert exported rows into an empty store (Conflict when it is not empty)."""

    # --- operators -------------------------------------------------------------

    @abstractmethod
    def add_operator(self, operator: OperatorRecord) -> OperatorRecord:
        """Record a certificate issued to an operator. Conflict while one with that
        name is not revoked; InvalidInput for an unknown role."""

    @abstractmethod
    def list_operators(self, *, include_revoked: bool = False) -> list[OperatorRecord]:
        """By name, then issue time."""

    @abstractmethod
    def revoke_operator(self, name: str, *, now: datetime) -> OperatorRecord:
        """Revoke the operator's current certificate. NotFound when none is current."""

    @abstractmethod
    def revoked_operator_ids(self) -> list[str]:
        """The identity ids of every revoked operator certificate."""

    # --- machines --------------------------------------------------------------

    @abstractmethod
    def upsert_machine(self, machine: MachineRecord) -> None:
        """Insert or replace a machine. NotFound when its server does not exist."""

    @abstractmethod
    def get_machine(self, machine_id: str) -> MachineRecord:
        """NotFound when there is no such machine."""

    @abstractmethod
    def list_machines(self) -> list[MachineRecord]:
        """All machines, ordered by hostname, then id."""

    # --- replication pairs ---------------------------------------------------------

    @abstractmethod
    def create_pair(self, pair: PairRecord) -> PairRecord:
        """Store a new pair. Conflict when its id is taken or its disk already has a pair.

        NotFound when the machine or one of the servers does not exist.
        """

    @abstractmethod
    def get_pair(self, pair_id: str) -> PairRecord:
        """NotFound when there is no such pair."""

    @abstractmethod
    def list_pairs(self, *, machine_id: str | None = None, server_id: str | None = None) -> list[PairRecord]:
        """Pairs (of one machine, or those a server takes part in), by machine then disk name."""

    @abstractmethod
    def set_pair_desired_state(self, pair_id: str, state: str, *, now: datetime) -> PairRecord:
        """Change what the agents are told to do with the pair. NotFound; InvalidInput."""

    @abstractmethod
    def delete_pair(self, pair_id: str) -> None:
        """Forget the pair, its reports and its tag requests. NotFound."""

    @abstractmethod
    def record_pair_reports(self, server_id: str, role: str, statuses: dict[str, dict], *, now: datetime) -> None:
        """Replace what `server_id` last reported for each pair id in `statuses`.

        Reports for pairs that do not exist, or that the server takes no part
        in, are ignored (an agent may lag behind a deletion).
        """

    @abstractmethod
    def pair_reports(self, pair_id: str | None = None) -> list[PairReport]:
        """The last report of each agent of the pair; with no pair id, of every pair
        (one read, ordered by pair and server: views of many pairs at once)."""

    @abstractmethod
    def add_tag_requests(self, requests: Sequence[TagRequestRecord]) -> None:
        """Store requests for tags, all or none. Conflict when one exists already."""

    @abstractmethod
    def tag_requests(self, *, source_server_id: str, now: datetime) -> list[TagRequestRecord]:
        """Unexpired requests for pairs whose source is `source_server_id`, oldest first."""

    @abstractmethod
    def remove_tag_requests(self, pair_id: str, tag_ids: Collection[str], *, now: datetime) -> None:
        """Drop these requests (the tags arrived) and every expired request."""

    @abstractmethod
    def change_counters(self) -> ChangeCounters:
        """The change counters now (see `ChangeCounters`; one small read)."""

    @abstractmethod
    def pairs_snapshot(self) -> PairsSnapshot:
        """Every pair (ordered as `list_pairs`) and the data endpoint ("" when none) of every
        server a pair names as process server or master target, with the counters, in one
        read transaction."""

    @abstractmethod
    def tag_requests_snapshot(self) -> TagRequestsSnapshot:
        """Every tag request, expired or not (ordered as `tag_requests`), with its pair's
        source server id, and the counters, in one read transaction."""

    @abstractmethod
    def hold_barrier(self, tag_id: str, source_server_id: str, *, now: datetime) -> str:
        """Record that the source holds writes for barrier `tag_id`; return the outcome.

        One transaction: marks the source's rows held, then decides. Committed
        once every row of the barrier is held before it expires; aborted when it
        expired first. A decision never changes afterwards. NotFound when the
        source has no row for the tag (it expired and was swept, or never was).
        """

    # --- jobs --------------------------------------------------------------------

    @abstractmethod
    def create_job(
        self,
        *,
        kind: str,
        target: str,
        step_names: Sequence[str],
        params: dict,
        now: datetime,
    ) -> JobRecord:
        """A new job (id a uuid4 string, status pending, version 1) with pending steps."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord:
        """The job with its steps in order. NotFound."""

    @abstractmethod
    def list_jobs(self, *, statuses: Collection[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Jobs (optionally only those in `statuses`), newest first, at most `limit`."""

    @abstractmethod
    def set_job_status(
        self,
        job_id: str,
        *,
        expected: Collection[str],
        new: str,
        now: datetime,
        error_code: str = "",
        error_message: str = "",
    ) -> bool:
        """Compare-and-set the job status: only when it is one of `expected`.

        Every `expected -> new` must be in `jobs.states.TRANSITIONS["job"]`, else
        InvalidInput. The error fields are written only when not empty. Returns
        False when the job was in another status; NotFound when it does not exist.
        """

    @abstractmethod
    def claim_step(
        self, job_id: str, index: int, *, owner: str, lease_seconds: float, now: datetime
    ) -> StepRecord | None:
        """Take the lease on step `index` if it is the one the job needs next.

        Claimable: while the job is running, a pending step or a running step
        whose lease expired (it becomes running); while the job is compensating,
        a succeeded step or a running/compensating one whose lease expired (it
        becomes compensating). `attempt` goes up by one on every claim. Returns
        None when the step is not claimable now (someone holds it, it is not
        next, the job is not running or compensating). NotFound for an unknown
        job or index.
        """

    @abstractmethod
    def renew_lease(
        self, job_id: str, index: int, *, owner: str, lease_seconds: float, now: datetime
    ) -> bool:
        """Extend the lease to now + lease_seconds; False unless `owner` holds it."""

    @abstractmethod
    def update_step(
        self,
        job_id: str,
        index: int,
        *,
        owner: str,
        now: datetime,
        status: str | None = None,
        progress: float | None = None,
        message: str | None = None,
        error_code: str | None = None,
        output: dict | None = None,
    ) -> bool:
        """Record progress or an outcome; only the lease owner may. False otherwise.

        A status change is checked against the step transition table
        (InvalidInput); a status that is not leased (succeeded, failed,
        compensated) releases the lease.
        """

    @abstractmethod
    def runnable_job_ids(self, *, now: datetime) -> list[str]:
        """Active jobs that need something done now, oldest first.

        That is: a pending job (to start), a job with a claimable step, or a
        job whose status has to be settled (all steps done, a step failed, all
        compensations done). Jobs waiting on a live lease are left out.
        """

    @abstractmethod
    def release_leases(self, owner: str, *, now: datetime) -> int:
        """End every lease `owner` holds now; return how many.

        A runner calls it when it starts: leases under its id are from its
        previous life (killed mid-step), and its steps can be taken up again at
        once instead of after the lease runs out.
        """

    # --- vCenter / ESXi endpoints --------------------------------------------

    @abstractmethod
    def add_vcenter(self, vcenter: VcenterRecord) -> VcenterRecord:
        """Store a new endpoint. Conflict when its id, name or host:port is taken."""

    @abstractmethod
    def get_vcenter(self, name_or_id: str) -> VcenterRecord:
        """The endpoint with that name (or id). NotFound otherwise."""

    @abstractmethod
    def list_vcenters(self) -> list[VcenterRecord]:
        """Every endpoint, by name."""

    @abstractmethod
    def update_vcenter_credentials(
        self, name_or_id: str, *, username: str, secret: str, now: datetime
    ) -> VcenterRecord:
        """Replace the user and encrypted password. NotFound when there is no such endpoint."""

    @abstractmethod
    def remove_vcenter(self, name_or_id: str) -> None:
        """Remove the endpoint and its inventory. NotFound when there is no such endpoint."""

    @abstractmethod
    def request_discovery(self, vcenter_id: str, *, due_before: datetime | None, now: datetime) -> bool:
        """Compare-and-set: mark a discovery as requested now.

        With `due_before`, only when the last request is older than that (or
        there was none): of several replicas asking at once exactly one gets
        True and creates the job. With None, always (an on-demand request).
        """

    @abstractmethod
    def record_discovery(
        self, vcenter_id: str, *, now: datetime, document: dict | None = None, error: str = ""
    ) -> VcenterRecord:
        """Record a discovery: its inventory document on success, or the error (the last inventory stays)."""

    @abstractmethod
    def get_vcenter_inventory(self, vcenter_id: str) -> VcenterInventory:
        """The last successful discovery. NotFound when there is none yet."""

    # --- Azure sites -----------------------------------------------------------

    @abstractmethod
    def add_azure_site(self, site: AzureSiteRecord) -> AzureSiteRecord:
        """Store a new site. Conflict when its id or name is taken; InvalidInput when a field is empty."""

    @abstractmethod
    def get_azure_site(self, name_or_id: str) -> AzureSiteRecord:
        """The site with that name (or id). NotFound otherwise."""

    @abstractmethod
    def list_azure_sites(self) -> list[AzureSiteRecord]:
        """Every site, by name."""

    @abstractmethod
    def update_azure_site_credentials(
        self, name_or_id: str, *, client_id: str, secret: str, now: datetime
    ) -> AzureSiteRecord:
        """Replace the client id (in `settings`) and the encrypted secret. NotFound when there is no such site."""

    @abstractmethod
    def remove_azure_site(self, name_or_id: str, *, unless_used_by_kinds: Collection[str] = ()) -> None:
        """Remove the site. NotFound when there is none.

        Conflict (`azure-site-in-use`), and nothing removed, when an active job
        (pending, running, compensating) of one of `unless_used_by_kinds` has
        `params["site_id"]` equal to the site's id, checked in the same
        transaction as the delete. A job created for the site after that
        check fails at its first step with NotFound (the site is gone).
        Conflict (`azure-site-in-use`) too while an azure-page-blob pair's
        `target_options["azure_site_id"]` names the site.
        """

    # --- protection groups, recovery plans, protected machines (0007) --------

    @abstractmethod
    def add_protection_groups(self, primary: ProtectionGroupRecord, twin: ProtectionGroupRecord) -> None:
        """Create a group and its failback twin together; Conflict when a name is taken."""

    @abstractmethod
    def get_protection_group(self, name_or_id: str) -> ProtectionGroupRecord:
        """NotFound (code protection-group-not-found) when there is none."""

    @abstractmethod
    def list_protection_groups(self) -> list[ProtectionGroupRecord]: ...

    @abstractmethod
    def remove_protection_groups(self, name_or_id: str) -> None:
        """Remove a primary group and its twin; Conflict while a machine is in either."""

    @abstractmethod
    def save_recovery_plan(self, plan: RecoveryPlanRecord, *, expected_version: int | None) -> RecoveryPlanRecord:
        """Insert (expected_version None; Conflict when the name is taken) or replace
        the plan if it is still at `expected_version` (Conflict otherwise). Bumps the version."""

    @abstractmethod
    def get_recovery_plan(self, name_or_id: str) -> RecoveryPlanRecord: ...

    @abstractmethod
    def list_recovery_plans(self) -> list[RecoveryPlanRecord]: ...

    @abstractmethod
    def remove_recovery_plan(self, name_or_id: str) -> None: ...

    @abstractmethod
    def add_protected_item(self, item: ProtectedItemRecord) -> ProtectedItemRecord:
        """Conflict (code machine-already-protected) when the machine has one."""

    @abstractmethod
    def get_protected_item(self, item_id: str) -> ProtectedItemRecord: ...

    @abstractmethod
    def list_protected_items(self, *, group_id: str | None = None) -> list[ProtectedItemRecord]: ...

    @abstractmethod
    def update_protected_item(
        self,
        item_id: str,
        *,
        expected_version: int,
        now: datetime,
        state: str | None = None,
        group_id: str | None = None,
        details: dict | None = None,
    ) -> ProtectedItemRecord | None:
        """Compare-and-set on `version`: the new record, or None when it changed meanwhile."""

    @abstractmethod
    def remove_protected_item(self, item_id: str) -> None: ...

    @abstractmethod
    def signal_job(self, job_id: str, name: str, *, now: datetime) -> bool:
        """Record an operator's signal for a job; False when it was already given."""

    @abstractmethod
    def job_signals(self, job_id: str) -> set[str]: ...

    # --- enrollment -----------------------------------------------------------------

    @abstractmethod
    def claim_enrollment_nonce(self, digest: str, *, now: datetime, keep_seconds: float) -> bool:
        """Remember an accepted enrollment's nonce (its digest); False when it was seen already.

        Digests older than `keep_seconds` are forgotten in the same transaction.
        Shared by every replica on the store and kept across restarts.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""


# --- helpers shared by implementations ---------------------------------------------


def utc(value: datetime, what: str = "time") -> datetime:
    """`value` in UTC; InvalidInput when it carries no timezone."""
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            f"{what} has no timezone ({value.isoformat()})",
            hint="pass an aware datetime, e.g. datetime.now(UTC)",
            code="naive-datetime",
        )
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None, what: str = "time") -> datetime | None:
    return None if value is None else utc(value, what)


def json_copy(value: Any, what: str, kind: type = dict) -> Any:
    """A deep copy of `value` after checking it is JSON and of type `kind`.

    Tuples come back as lists; anything JSON cannot carry faithfully (non-str
    keys, NaN, sets, objects) is refused with InvalidInput.
    """
    json_check(value, what, kind)
    return json.loads(json.dumps(value))


def json_check(value: Any, what: str, kind: type = dict) -> None:
    """What `json_copy` checks, without the copy: for a value serialised at once (and so not
    shared with its caller afterwards)."""
    if not isinstance(value, kind):
        raise InvalidInput(f"{what} must be a {kind.__name__}, not {type(value).__name__}")
    _check_json(value, what)


def _check_json(value: Any, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
        problem = f"{value!r} is not a finite number"
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problem = f"key {key!r} is not a string"
                break
            _check_json(item, f"{path}.{key}")
        else:
            return
    else:
        problem = f"a {type(value).__name__} is not JSON"
    raise InvalidInput(
        f"{path} cannot be stored: {problem}",
        hint="use only str, int, float, bool, None, lists and dicts with str keys",
        code="not-json",
    )
