"""What every srctl command shares: the profile chosen on the command line, and calling the server."""

from __future__ import annotations

from pathlib import Path

import grpc

from siterecovery.common import errors
from siterecovery.common.channels import RPC_TIMEOUT
from siterecovery.controller.cli.client import Profile


class State:
    config: Path | None = None


def profile() -> Profile:
    return Profile.find(State.config)


def call(method: str, request, *, timeout: float = RPC_TIMEOUT, service: str = "admin"):
    """Call `method` of the Admin service (or of `service`: "protection") and rebuild its error."""
    chosen = profile()
    try:
        return getattr(getattr(chosen, service)(), method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc, target=chosen.server) from exc


def protect_call(method: str, request, *, timeout: float = RPC_TIMEOUT):
    return call(method, request, timeout=timeout, service="protection")
