"""What srctl shows: servers with derived health, machines, jobs — as wire messages."""

from __future__ import annotations

import socket
from datetime import datetime

from siterecovery.common import pki
from siterecovery.common.inventory import directory_facts, host_facts
from siterecovery.common.pb import admin_pb2, common_pb2
from siterecovery.controller.convert import (
    HEALTH_VALUES,
    from_dict,
    problem_from_dict,
    timestamp,
)
from siterecovery.controller.health import CRITICAL, derive_health, heartbeat_age
from siterecovery.controller.settings import ConfigServerSettings
from siterecovery.controller.store.base import JobRecord, MachineRecord, ServerRecord

JOB_STATUS_VALUES = {
    "pending": admin_pb2.JOB_STATUS_PENDING,
    "running": admin_pb2.JOB_STATUS_RUNNING,
    "succeeded": admin_pb2.JOB_STATUS_SUCCEEDED,
    "failed": admin_pb2.JOB_STATUS_FAILED,
    "compensating": admin_pb2.JOB_STATUS_COMPENSATING,
    "compensated": admin_pb2.JOB_STATUS_COMPENSATED,
    "cancelled": admin_pb2.JOB_STATUS_CANCELLED,
}
JOB_STATUS_NAMES = {v: k for k, v in JOB_STATUS_VALUES.items()}
CONFIG_SERVER_ID = "config-server"
FINISHED = frozenset({"succeeded", "failed", "compensated", "cancelled"})


def server_info(server: ServerRecord, *, interval: float, now: datetime) -> common_pb2.ServerInfo:
    health, reason = derive_health(
        last_heartbeat_at=server.last_heartbeat_at,
        problems=server.problems,
        interval=interval,
        now=now,
    )
    if server.revoked_at is not None:
        health, reason = CRITICAL, f"removed {server.revoked_at:%Y-%m-%d %H:%M} UTC: its certificate is revoked"
    age = heartbeat_age(server.last_heartbeat_at, now)
    return common_pb2.ServerInfo(
        id=server.id,
        role=pki.role_to_proto(server.role),
        hostname=server.hostname,
        health=HEALTH_VALUES[health],
        health_reason=reason,
        enrolled_at=timestamp(server.enrolled_at),
        last_heartbeat_at=timestamp(server.last_heartbeat_at),
        heartbeat_age_seconds=age if age != float("inf") else -1.0,
        problems=[problem_from_dict(p) for p in server.problems],
        inventory=from_dict(server.inventory, common_pb2.Inventory()),
        revoked_at=timestamp(server.revoked_at),
    )


def config_server_info(settings: ConfigServerSettings, endpoint: str, *, now: datetime) -> common_pb2.ServerInfo:
    """The configuration server itself: it answers, so it is healthy; its state directory's space."""
    return common_pb2.ServerInfo(
        id=CONFIG_SERVER_ID,
        role=common_pb2.ROLE_CONFIG_SERVER,
        hostname=socket.gethostname(),
        health=common_pb2.HEALTH_HEALTHY,
        last_heartbeat_at=timestamp(now),
        heartbeat_age_seconds=0.0,
        inventory=common_pb2.Inventory(
            host=host_facts(),
            directories=[directory_facts(common_pb2.DIRECTORY_KIND_STATE, settings.state_dir, used_by_agent=0)],
            data_endpoint=endpoint,
        ),
    )


def machine(record: MachineRecord, health: int, server: ServerRecord | None = None) -> admin_pb2.Machine:
    """`server`: its source agent's row, whose inventory holds the network identity last reported."""
    network = server.inventory.get("network") if server is not None else None
    return admin_pb2.Machine(
        network=from_dict(network, common_pb2.NetworkIdentity()) if isinstance(network, dict) else None,
        id=record.id,
        hostname=record.hostname,
        os=record.os,
        server_id=record.server_id,
        addresses=record.addresses,
        disks=[from_dict(d, common_pb2.DiskFacts()) for d in record.disks],
        health=health,
    )


def job_progress(job: JobRecord) -> float:
    if not job.steps:
        return 1.0 if job.status in FINISHED else 0.0
    done = sum(1.0 if s.status == "succeeded" else s.progress for s in job.steps)
    return done / len(job.steps)


def job(record: JobRecord) -> admin_pb2.Job:
    return admin_pb2.Job(
        id=record.id,
        kind=record.kind,
        status=JOB_STATUS_VALUES.get(record.status, admin_pb2.JOB_STATUS_UNSPECIFIED),
        target=record.target,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        progress=job_progress(record),
        error_code=record.error_code,
        error_message=record.error_message,
        steps=[
            admin_pb2.JobStep(
                name=s.name,
                status=JOB_STATUS_VALUES.get(s.status, admin_pb2.JOB_STATUS_UNSPECIFIED),
                attempt=s.attempt,
                progress=1.0 if s.status == "succeeded" else s.progress,
                message=s.message,
                error_code=s.error_code,
            )
            for s in record.steps
        ],
    )
