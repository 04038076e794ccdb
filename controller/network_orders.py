"""Network orders: the configuration server's side of re-applying a network identity.

A source agent reports its machine's network identity with every registration
(`Inventory.network`, kept with the server's inventory and checked by
`agents.validate_inventory`). At failback the workflow sends the identity back
to the agent on the failed-back machine as a `NetworkOrder` in heartbeat
responses, until the agent's `network_results` for that order arrive.

The pending order lives with the protected machine
(`details["network_order"]`: order id, the agent's server id, the identity
recorded at protection time, status pending / ok / failed, message, files); the
failback workflow's `apply network` step writes it and waits for its status.
The identity sent is the one recorded when the machine was protected, not the
inventory's current copy: a machine failed over to Azure registers again with
the DHCP configuration Azure gave it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from siterecovery.common import errors, netidentity, pki
from siterecovery.common.pb import agent_pb2
from siterecovery.controller.store.base import Store

log = structlog.get_logger(__name__)

MAX_RESULTS = 16
MAX_FILES = 64
MAX_MESSAGE = 4096
MAX_PATH = 1024
_ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def recorded_identity(store: Store, server_id: str) -> dict | None:
    """The network identity the agent `server_id` last reported (NetworkIdentity as JSON), or None."""
    network = store.get_server(server_id).inventory.get("network")
    return network if isinstance(network, dict) else None


def make_order(order_id: str, identity: dict, target_system: netidentity.System) -> agent_pb2.NetworkOrder:
    """A network order for an identity as stored (checked again here: it is about to be written to a machine)."""
    if not _ORDER_ID.fullmatch(order_id):
        raise errors.InvalidInput(f"network order id {order_id[:80]!r} is malformed", code="network-order-invalid")
    return agent_pb2.NetworkOrder(
        order_id=order_id,
        identity=netidentity.from_dict(identity).to_proto(),
        target_system=netidentity.system_to_proto(target_system),
    )


def check_results(results: Sequence[agent_pb2.NetworkOrderResult]) -> None:
    """Refuse what no agent of ours sends, before anything of the heartbeat is written."""
    if len(results) > MAX_RESULTS:
        raise errors.InvalidInput(f"more than {MAX_RESULTS} network order results", code="heartbeat-invalid")
    for result in results:
        if not _ORDER_ID.fullmatch(result.order_id):
            raise errors.InvalidInput("a network order result has a malformed order id", code="heartbeat-invalid")
        if len(result.message) > MAX_MESSAGE or len(result.files) > MAX_FILES:
            raise errors.InvalidInput("a network order result is too long", code="heartbeat-invalid")
        for text in (result.message, *result.files):
            if any(ord(c) < 32 and c not in "\t\n" for c in text) or any(len(f) > MAX_PATH for f in result.files):
                raise errors.InvalidInput("a network order result has control characters or an overlong path",
                                          code="heartbeat-invalid")


def network_order_for(store: Store, server_id: str, *, now: datetime) -> agent_pb2.NetworkOrder | None:
    """The network order pending for this agent, if a failback asked for one."""
    return _first_order(pending_orders(store).get(server_id, []))


def pending_orders(store: Store) -> dict[str, list[tuple[str, dict]]]:
    """Every pending network order: agent's server id → [(machine name, order)]."""
    pending: dict[str, list[tuple[str, dict]]] = {}
    for item in store.list_protected_items():
        order = item.details.get("network_order") or {}
        if order.get("status") == "pending" and order.get("server_id"):
            pending.setdefault(order["server_id"], []).append((item.name, order))
    return pending


def _first_order(orders: list[tuple[str, dict]]) -> agent_pb2.NetworkOrder | None:
    for machine, order in orders:
        try:
            identity = netidentity.from_dict(order["identity"])
            return make_order(order["order_id"], order["identity"], identity.system)
        except (errors.SiteRecoveryError, KeyError, ValueError):
            # Never fail the agent's heartbeat over it: the failback step times out and says so.
            log.error("a pending network order cannot be sent", machine=machine, exc_info=True)
    return None


class PendingOrders:
    """The pending network orders, read from the store at most every `refresh_seconds`.

    Every heartbeat asks for its agent's order, but orders are pending only
    during a failback: reading every protected machine's row for each heartbeat
    was one more query per heartbeat, and grew with the number of protected
    machines. One read per interval now serves every heartbeat in it. A new
    order reaches its agent at most `refresh_seconds` later (agents heartbeat
    every 10 s anyway); a settled one may be sent once more within that time,
    which the agent ignores (it keeps the results of the orders it carried out).
    Two configuration servers on one store each keep their own, as with
    revocations (revocation.py).
    """

    def __init__(self, *, refresh_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._refresh = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # (store, read at, orders), replaced whole: a fresh copy is used without the lock,
        # which every heartbeat would otherwise take (only a read takes it).
        self._state: tuple[Store | None, float | None, dict[str, list[tuple[str, dict]]]] = (None, None, {})

    def order_for(self, store: Store, server_id: str, *, now: datetime) -> agent_pb2.NetworkOrder | None:
        orders = self._fresh(store)
        if orders is None:
            with self._lock:
                orders = self._fresh(store)
                if orders is None:
                    at = self._clock()
                    orders = pending_orders(store)
                    self._state = (store, at, orders)
        return _first_order(orders.get(server_id, []))

    def _fresh(self, store: Store) -> dict[str, list[tuple[str, dict]]] | None:
        read_from, read_at, orders = self._state
        if read_from is not store or read_at is None or self._clock() - read_at >= self._refresh:
            return None
        return orders

    def forget(self) -> None:
        """Read again at the next question (this server just changed an order)."""
        with self._lock:
            self._state = (None, None, {})


def record_network_results(
    store: Store, identity: pki.Identity, results: Sequence[agent_pb2.NetworkOrderResult], *, now: datetime
) -> None:
    """Settle the orders an agent reports on (only orders addressed to that agent)."""
    check_results(results)
    by_id = {r.order_id: r for r in results}
    if not by_id:
        return
    for item in store.list_protected_items():
        order = item.details.get("network_order") or {}
        result = by_id.get(order.get("order_id", ""))
        if result is None or order.get("server_id") != identity.id or order.get("status") != "pending":
            continue
        settled = {**order, "status": "ok" if result.ok else "failed", "message": result.message,
                   "files": list(result.files)}
        if store.update_protected_item(item.id, expected_version=item.version, now=now,
                                       details={**item.details, "network_order": settled}) is None:
            continue  # changed meanwhile: the agent reports again with its next heartbeat
        log.info("network order settled", machine=item.name, order=result.order_id, ok=result.ok,
                 message=result.message)


@dataclass(frozen=True)
class NetworkOrderHooks:
    """The pending-order lookup and the result sink the AgentControl servicer calls."""

    order_for: Callable[..., agent_pb2.NetworkOrder | None] = network_order_for
    record_results: Callable[..., None] = record_network_results


def cached_hooks() -> NetworkOrderHooks:
    """The configuration server's hooks: orders read through a `PendingOrders`, which
    forgets what it read whenever this server settles an order."""
    pending = PendingOrders()

    def record_results(store: Store, identity: pki.Identity, results: Sequence[agent_pb2.NetworkOrderResult], *,
                       now: datetime) -> None:
        try:
            record_network_results(store, identity, results, now=now)
        finally:
            pending.forget()

    return NetworkOrderHooks(order_for=pending.order_for, record_results=record_results)
