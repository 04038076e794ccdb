"""Between wire messages and the store's plain dicts and records."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.common import errors
from siterecovery.common.pb import common_pb2

SEVERITY_NAMES = {
    common_pb2.SEVERITY_WARNING: "warning",
    common_pb2.SEVERITY_CRITICAL: "critical",
}
HEALTH_VALUES = {
    "healthy": common_pb2.HEALTH_HEALTHY,
    "warning": common_pb2.HEALTH_WARNING,
    "critical": common_pb2.HEALTH_CRITICAL,
}


def to_dict(message: Message) -> dict:
    """The message as the store keeps it; InvalidInput when a peer sent a value JSON cannot
    carry (a timestamp outside years 1-9999, found by the fuzz suite: it was INTERNAL)."""
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    except (json_format.Error, ValueError, OverflowError) as exc:
        raise errors.InvalidInput(
            f"the {message.DESCRIPTOR.name} message holds a value out of range: {exc}",
            hint="timestamps must lie between years 1 and 9999; this is a bug in the sending agent",
            code="message-out-of-range",
        ) from exc


def from_dict(data: dict, message: Message) -> Message:
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def problem_to_dict(problem: common_pb2.Problem) -> dict:
    return {
        "code": problem.code,
        "severity": SEVERITY_NAMES.get(problem.severity, "warning"),
        "message": problem.message,
    }


def problem_from_dict(data: dict) -> common_pb2.Problem:
    severity = {v: k for k, v in SEVERITY_NAMES.items()}.get(data.get("severity", ""), 1)
    return common_pb2.Problem(code=data.get("code", ""), severity=severity, message=data.get("message", ""))


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
