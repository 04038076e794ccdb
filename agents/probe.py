"""Probe: answers who this data-plane server is and who called it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from siterecovery.common import pki
from siterecovery.common.grpcserver import caller
from siterecovery.common.pb import dataplane_pb2

if TYPE_CHECKING:
    from siterecovery.agents.runtime import AgentRuntime


def probe_response(runtime: AgentRuntime) -> dataplane_pb2.ProbeResponse:
    assert runtime.credentials is not None
    me = runtime.credentials.identity
    who = caller()
    return dataplane_pb2.ProbeResponse(
        server_id=me.id,
        role=pki.role_to_proto(me.role),
        caller_id=who.id,
        caller_role=pki.role_to_proto(who.role),
    )
