"""Network identity on the source agent: record it at registration, re-apply it on order.

- capture.py reads the configured identity from NetworkManager / netplan / ifcfg files;
- render.py writes one for a configuration system (or a netsh script for Windows);
- apply.py matches interfaces, writes atomically with backups, remembers orders done.

`NetworkAgent` is what the daemon plugs into its runtime (agents/runtime.py): the
identity for the inventory, and the network order of each heartbeat response,
carried out once, whose result goes back with every heartbeat until the
configuration server stops sending that order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from siterecovery.agents.settings import SourceSettings
from siterecovery.common import errors, logging
from siterecovery.common.netidentity import Identity
from siterecovery.common.pb import agent_pb2, common_pb2

from .apply import AppliedOrders, Order, Result, carry_out
from .capture import capture, from_settings

log = logging.get_logger(__name__)

_ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class NetworkAgent:
    def __init__(
        self,
        state_dir: Path,
        *,
        root: Path = Path("/"),
        apply_command: str = "",
        stated: Identity | None = None,
        windows: bool = os.name == "nt",
    ) -> None:
        self.root = root
        self.apply_command = apply_command
        self.stated = stated
        self.windows = windows
        self._applied = AppliedOrders(state_dir)
        # The result of the order the configuration server is sending now.
        self._current: Result | None = None

    @classmethod
    def from_settings(cls, cfg: SourceSettings) -> NetworkAgent:
        """InvalidInput (code config-network) when the config file's [network] does not check out."""
        windows = os.name == "nt"
        return cls(
            cfg.state_dir,
            root=cfg.network_root,
            apply_command=cfg.network_apply_command,
            stated=from_settings(cfg.network, windows=windows),
            windows=windows,
        )

    # -- recording -----------------------------------------------------------------
    def identity(self) -> common_pb2.NetworkIdentity | None:
        """For the inventory: the stated identity, else what the OS configures; None when reading failed."""
        now = datetime.now(UTC)
        if self.stated is not None:
            return dataclasses.replace(self.stated, captured_at=now).to_proto()
        try:
            found = capture(self.root, now=now)
        except Exception as exc:  # on purpose: see below
            # Registration must not fail over this: the machine is still worth protecting,
            # and capture already skips each file it cannot read; this is the last resort.
            log.warning("could not read the network configuration", root=str(self.root), error=repr(exc))
            return None
        log.info("network identity recorded", system=found.system.value,
                 interfaces=[i.name for i in found.interfaces], static=found.is_static)
        return found.to_proto()

    # -- orders ----------------------------------------------------------------------
    def handle_order(self, message: agent_pb2.NetworkOrder | None) -> bool:
        """The network order of a heartbeat response (None: there is none). True when a new
        result is ready, so the caller sends a heartbeat at once."""
        if message is None or not message.order_id:
            self._current = None
            return False
        if not _ORDER_ID.fullmatch(message.order_id):
            log.error("ignoring a network order with a malformed id", order=message.order_id[:80])
            self._current = None
            return False
        known = self._applied.get(message.order_id)
        if known is not None:
            self._current = known
            return False
        try:
            order = Order.from_proto(message)
        except errors.InvalidInput as exc:
            log.error("network order refused: it does not check out", order=message.order_id, error=exc.message)
            result = Result(message.order_id, False, f"the order does not check out: {exc.message}")
        else:
            log.info("carrying out a network order", order=order.order_id,
                     interfaces=[i.name for i in order.identity.interfaces])
            result = carry_out(order, root=self.root, apply_command=self.apply_command, windows=self.windows)
        self._applied.record(result)
        self._current = result
        return True

    def results(self) -> Sequence[agent_pb2.NetworkOrderResult]:
        return [self._current.to_proto()] if self._current is not None else []
