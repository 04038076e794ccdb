"""vCenter / ESXi endpoints: registering them, their credentials, and discovery.

- `add` checks the input, logs in once (so a wrong password, an untrusted
  certificate or an unreachable host is refused and nothing is stored), stores
  the endpoint with its password encrypted (`secrets.SecretBox`), and starts a
  discovery job.
- `update_credentials` does the same check with the new account, then stores it.
- The `discover-vcenter` job (one step) logs in, reads the inventory
  (`providers.vsphere.discovery`) and records it, or records the error.
- `schedule_due` starts a discovery for every endpoint whose last request is
  older than the interval (15 min by default); the store's compare-and-set
  makes exactly one replica start it.

Passwords are never logged nor returned by any RPC.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from siterecovery.common import errors
from siterecovery.common.logging import get_logger
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, RetryPolicy, StepContext, create_job
from siterecovery.controller.providers.vsphere.discovery import discover
from siterecovery.controller.providers.vsphere.session import Endpoint, Session, Trust
from siterecovery.controller.secrets import SecretBox
from siterecovery.controller.store.base import JobRecord, Store, VcenterRecord

log = get_logger(__name__)

KIND = "discover-vcenter"
DEFAULT_DISCOVERY_INTERVAL = 900.0  # seconds
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A login check at add time: one retry at most, so a typo fails fast.
CHECK_RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.2, max_backoff=0.2)


@dataclass(frozen=True)
class NewEndpoint:
    name: str
    host: str
    port: int
    username: str
    password: str
    trust: Trust

    def __repr__(self) -> str:
        return f"NewEndpoint(name={self.name!r}, host={self.host!r}, port={self.port}, username={self.username!r})"


def trust_dict(trust: Trust) -> dict:
    return {"ca_pem": trust.ca_pem, "thumbprint": trust.thumbprint, "insecure": trust.insecure}


def trust_of(record: VcenterRecord) -> Trust:
    t = record.trust
    return Trust(
        ca_pem=t.get("ca_pem", ""), thumbprint=t.get("thumbprint", ""), insecure=bool(t.get("insecure"))
    )


def endpoint_of(record: VcenterRecord, box: SecretBox) -> Endpoint:
    return Endpoint(
        host=record.host,
        port=record.port,
        username=record.username,
        password=box.decrypt(record.secret, context=record.id),
        trust=trust_of(record),
    )


def check_login(endpoint: Endpoint, retry: RetryPolicy = CHECK_RETRY) -> str:
    """Log in and out once; returns the API type ("VirtualCenter" or "HostAgent")."""
    with Session(endpoint, retry=retry) as session:
        return session.content.about.apiType


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise errors.InvalidInput(
            f"{name!r} is not a usable endpoint name",
            hint="use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="vcenter-name-invalid",
        )


def add(
    store: Store, box: SecretBox, new: NewEndpoint, kind: JobKind, *, now: datetime
) -> tuple[VcenterRecord, JobRecord]:
    _check_name(new.name)
    endpoint = Endpoint(
        host=new.host, port=new.port, username=new.username, password=new.password, trust=new.trust
    )
    for existing in store.list_vcenters():  # refuse before dialling anything
        if existing.name == new.name or (existing.host, existing.port) == (new.host, new.port):
            raise errors.Conflict(
                f"{new.host}:{new.port} or the name {new.name!r} is already registered (as {existing.name!r})",
                hint="`srctl vcenter list` shows it; use update-credentials to change its account",
                code="vcenter-exists",
            )
    api_type = check_login(endpoint)
    vid = uuid.uuid4().hex
    record = store.add_vcenter(
        VcenterRecord(
            id=vid,
            name=new.name,
            host=new.host,
            port=new.port,
            username=new.username,
            secret=box.encrypt(new.password, context=vid),
            trust=trust_dict(new.trust),
            created_at=now,
            updated_at=now,
        )
    )
    log.info("vcenter added", vcenter=record.name, host=record.host, api=api_type)
    return record, request_discovery(store, record.name, kind, now=now)


def update_credentials(
    store: Store, box: SecretBox, name: str, username: str, password: str, *, now: datetime
) -> VcenterRecord:
    record = store.get_vcenter(name)
    endpoint = Endpoint(
        host=record.host, port=record.port, username=username, password=password, trust=trust_of(record)
    )
    check_login(endpoint)
    updated = store.update_vcenter_credentials(
        record.id, username=username, secret=box.encrypt(password, context=record.id), now=now
    )
    log.info("vcenter credentials updated", vcenter=record.name)
    return updated


def request_discovery(store: Store, name: str, kind: JobKind, *, now: datetime) -> JobRecord:
    record = store.get_vcenter(name)
    store.request_discovery(record.id, due_before=None, now=now)
    return _start(store, record, kind, now)


def schedule_due(store: Store, kind: JobKind, *, interval: float, now: datetime) -> list[JobRecord]:
    """Start a discovery for every endpoint not asked about for `interval` seconds."""
    started = []
    due_before = now - timedelta(seconds=interval)
    for record in store.list_vcenters():
        if store.request_discovery(record.id, due_before=due_before, now=now):
            started.append(_start(store, record, kind, now))
    return started


def _start(store: Store, record: VcenterRecord, kind: JobKind, now: datetime) -> JobRecord:
    for job in store.list_jobs(statuses=states.ACTIVE_JOB_STATUSES, limit=500):
        if job.kind == KIND and job.params.get("vcenter_id") == record.id:
            return job  # one discovery at a time per endpoint
    return create_job(store, kind, target=f"vCenter {record.name}", params={"vcenter_id": record.id}, now=now)


def discovery_kind(box: SecretBox, *, retry: RetryPolicy | None = None) -> JobKind:
    def run(ctx: StepContext) -> dict:
        record = ctx.store.get_vcenter(ctx.params["vcenter_id"])
        ctx.progress(0.1, f"logging in to {record.host}")
        try:
            with Session(endpoint_of(record, box), **({"retry": retry} if retry else {})) as session:
                ctx.progress(0.3, "reading the inventory")
                inventory = discover(session)
        except errors.SiteRecoveryError as exc:
            ctx.store.record_discovery(record.id, now=_now(), error=str(exc))
            raise
        ctx.store.record_discovery(record.id, now=_now(), document=inventory.to_dict())
        summary = {
            "hosts": len(inventory.hosts),
            "datastores": len(inventory.datastores),
            "vms": len(inventory.vms),
            "api_type": inventory.api_type,
        }
        ctx.progress(
            1.0, f"{summary['hosts']} host(s), {summary['datastores']} datastore(s), {summary['vms']} VM(s)"
        )
        log.info("vcenter discovered", vcenter=record.name, **summary)
        return summary

    return JobKind(KIND, [FunctionStep("discover", run)])


def _now() -> datetime:
    return datetime.now(UTC)
