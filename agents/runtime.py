"""The life every agent shares: enroll once, register, heartbeat, serve its data port.

An agent keeps its identity (key, certificate, CA) under `<state_dir>/identity/`
and never enrolls again once that exists. While the configuration server is
unreachable it retries with capped exponential backoff (tenacity), sleeping on
the stop event so SIGTERM is honoured at once, and recovers by itself.

Revoked identities: every registration and heartbeat response lists the ids
the configuration server has revoked (`srctl servers remove`); the data port
refuses their certificates. The list is kept in `<state_dir>/revoked.json`, so
a restarted agent refuses them before its first heartbeat too.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import tenacity
from prometheus_client.registry import Collector

from siterecovery.agents.metrics import AgentCollector, PairCollector
from siterecovery.agents.settings import AgentSettings
from siterecovery.common import daemon, errors, logging, memory, metrics
from siterecovery.common.channels import RPC_TIMEOUT, secure_channel
from siterecovery.common.enrollment import (
    AgentCredentials,
    enroll,
    load_credentials,
    read_passphrase_file,
)
from siterecovery.common.grpcserver import Service, start_server
from siterecovery.common.inventory import space_problems
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc, common_pb2, replication_pb2
from siterecovery.common.pki import CONFIG_SERVER_NAME, Identity, agent_dns_name

log = logging.get_logger(__name__)

REVOKED_FILE = "revoked.json"


@dataclass(frozen=True)
class RetryPolicy:
    """How an agent retries the configuration server while it is unreachable."""

    initial_backoff: float = 0.2
    max_backoff: float = 10.0


class PairParticipant(Protocol):
    """What an agent that takes part in replication pairs plugs into its runtime.

    `apply_assignments` receives the controller's complete desired state after
    every registration and heartbeat (a pair missing from it is to be stopped)
    plus the tags a source is to insert now; it must return quickly, starting or
    stopping its own threads. `pair_statuses` is reported with every heartbeat.
    """

    def apply_assignments(
        self,
        pairs: Sequence[replication_pb2.PairAssignment],
        tag_requests: Sequence[replication_pb2.TagRequest],
    ) -> None: ...

    def pair_statuses(self) -> Sequence[replication_pb2.PairStatus]: ...

    def end_streams(self) -> None:
        """End every data-plane stream this agent serves, at shutdown: the peers
        reconnect and resume from their last acknowledgement, so there is nothing
        to wait for (without this, the gRPC server waits out its whole grace)."""


class NetworkParticipant(Protocol):
    """What a source agent plugs in for network orders (agents/source/netidentity).

    `handle_order` gets the network order of every heartbeat response (None when
    there is none) and returns True when it produced a new result, which is then
    sent at once; `results` is reported with every heartbeat.
    """

    def handle_order(self, message: agent_pb2.NetworkOrder | None) -> bool: ...

    def results(self) -> Sequence[agent_pb2.NetworkOrderResult]: ...


class AgentRuntime:
    def __init__(
        self,
        cfg: AgentSettings,
        *,
        role: str,
        daemon_name: str,
        stop: threading.Event,
        inventory: Callable[[], common_pb2.Inventory],
        directories: Callable[[], Sequence[common_pb2.DirectoryFacts]] = tuple,
        problems: Callable[
            [Sequence[common_pb2.DirectoryFacts]], Sequence[common_pb2.Problem]
        ] = space_problems,
        pairs: PairParticipant | None = None,
        network: NetworkParticipant | None = None,
        ready_facts: Mapping[str, Any] | None = None,
        collectors: Mapping[str, Collector] | None = None,
    ) -> None:
        self.cfg = cfg
        self.role = role
        self.daemon_name = daemon_name
        self.stop = stop
        self._inventory = inventory
        self._directories = directories
        self._problems = problems
        self.pairs = pairs
        self.network = network
        # Extra facts for the state file written when the agent is ready (say, its NBD exports).
        self.ready_facts = dict(ready_facts or {})
        # Set to send the next heartbeat at once (say, a pair has news for the controller).
        self.heartbeat_now = threading.Event()
        self._interval = cfg.heartbeat_interval
        self._registered = False
        self.credentials: AgentCredentials | None = None
        self._channel: grpc.Channel | None = None
        self.data_port = 0
        self.revoked: frozenset[str] = self._load_revoked()
        self._last_status = ""
        # Scraped by /metrics when metrics_listen is set (agents/metrics.py); `collectors`
        # are the daemon's own (say, the process server's spool).
        self._collectors = dict(collectors or {})
        self.metrics: metrics.DaemonMetrics | None = None
        self.metrics_port = 0
        self._last_heartbeat_at: float | None = None
        self._control_failures = 0
        self._last_directories: list[common_pb2.DirectoryFacts] = []

    def _status(self, text: str) -> None:
        """Tell systemd (STATUS=, shown by `systemctl status`) when the situation changes."""
        if text != self._last_status:
            self._last_status = text
            daemon.report_status(text)

    # -- revoked identities ------------------------------------------------
    def _load_revoked(self) -> frozenset[str]:
        try:
            return frozenset(json.loads((self.cfg.state_dir / REVOKED_FILE).read_text())["revoked_ids"])
        except FileNotFoundError:
            return frozenset()
        except (ValueError, KeyError, TypeError) as exc:
            # Refusing to start would be worse: the next heartbeat brings the list again.
            log.warning("the revoked-identities file is unreadable; waiting for the server's list",
                        path=str(self.cfg.state_dir / REVOKED_FILE), error=str(exc))
            return frozenset()

    def _set_revoked(self, ids: Sequence[str]) -> None:
        revoked = frozenset(ids)
        if revoked == self.revoked:
            return
        daemon.write_json_atomically(self.cfg.state_dir / REVOKED_FILE, {"revoked_ids": sorted(revoked)})
        added = sorted(revoked - self.revoked)
        self.revoked = revoked
        if added:
            log.info("certificates revoked by the configuration server are refused", ids=added)

    def is_revoked(self, identity: Identity, _cert_pem: bytes) -> bool:
        return identity.id in self.revoked

    # -- retries -----------------------------------------------------------
    def _retrying(self, what: str) -> tenacity.Retrying:
        policy = RetryPolicy(max_backoff=max(self._interval, 1.0))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(f"{what} failed; retrying", error=str(exc), attempt=state.attempt_number)
            self._status(f"{what} with {self.cfg.server} failed; retrying: {exc}")

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, errors.SiteRecoveryError) and e.retryable
            ),
            # "Full jitter": a random wait below an exponential bound (initial_backoff doubling
            # up to max_backoff), so agents cut off together do not all come back together.
            wait=tenacity.wait_random_exponential(
                multiplier=policy.initial_backoff, max=policy.max_backoff
            ),
            stop=lambda _state: self.stop.is_set(),
            sleep=self.stop.wait,
            before_sleep=before_sleep,
            reraise=True,
        )

    # -- enrollment --------------------------------------------------------
    def ensure_enrolled(self) -> AgentCredentials:
        credentials = load_credentials(self.cfg.state_dir)
        if credentials is None:
            if self.cfg.passphrase_file is None:
                raise errors.InvalidInput(
                    "this agent is not enrolled and no passphrase file is configured",
                    hint="set passphrase_file to a file holding `srctl passphrase show` output",
                    code="passphrase-missing",
                )
            passphrase = read_passphrase_file(self.cfg.passphrase_file)
            log.info("enrolling", server=self.cfg.server, role=self.role)
            self._status(f"enrolling with {self.cfg.server}")
            credentials = self._retrying("enrollment")(
                enroll,
                server_address=self.cfg.server,
                passphrase=passphrase,
                role=self.role,
                state_dir=self.cfg.state_dir,
                hostname=self.cfg.hostname or socket.gethostname(),
                sans=self._sans(),
            )
            log.info("enrolled", agent_id=credentials.identity.id)
        self.credentials = credentials
        return credentials

    def _sans(self) -> list[str]:
        if self.cfg.advertise:
            return [self.cfg.advertise]
        return []

    # -- control plane -----------------------------------------------------
    def _stub(self) -> agent_pb2_grpc.AgentControlStub:
        assert self.credentials is not None
        if self._channel is None:
            self._channel = secure_channel(
                self.cfg.server,
                self.credentials.channel_credentials(),
                target_name=CONFIG_SERVER_NAME,
            )
        return agent_pb2_grpc.AgentControlStub(self._channel)

    def _call(self, method: str, request: object) -> object:
        try:
            response = getattr(self._stub(), method)(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            self._control_failures += 1
            raise errors.from_rpc_error(exc, target=self.cfg.server) from exc
        self._last_heartbeat_at = time.time()
        return response

    def register(self) -> None:
        try:
            response = self._retrying("registration")(
                self._call, "Register", agent_pb2.RegisterRequest(inventory=self._inventory())
            )
        except errors.SiteRecoveryError:
            if self.stop.is_set():
                return
            raise
        self._interval = response.heartbeat_interval_seconds or self._interval
        self._registered = True
        self._set_revoked(response.revoked_ids)
        log.info("registered", heartbeat_interval=self._interval)
        self._status(f"registered with {self.cfg.server}; heartbeat every {self._interval:g} s")
        if self.pairs is not None:
            self.pairs.apply_assignments(list(response.pairs), [])

    def heartbeat_once(self) -> None:
        if not self._registered:
            self.register()
            return
        directories = list(self._directories())
        self._last_directories = directories
        statuses = list(self.pairs.pair_statuses()) if self.pairs is not None else []
        network_results = list(self.network.results()) if self.network is not None else []
        response = self._call(
            "Heartbeat",
            agent_pb2.HeartbeatRequest(
                problems=list(self._problems(directories)), directories=directories, pairs=statuses,
                network_results=network_results,
            ),
        )
        self._interval = response.heartbeat_interval_seconds or self._interval
        self._set_revoked(response.revoked_ids)
        if self.pairs is not None:
            self.pairs.apply_assignments(list(response.pairs), list(response.tag_requests))
        self._status(f"heartbeat ok with {self.cfg.server}; {len(statuses)} pair(s)")
        if self.network is not None:
            order = response.network_order if response.HasField("network_order") else None
            if self.network.handle_order(order):
                self.heartbeat_now.set()

    def heartbeat_loop(self) -> None:
        """Until stopped: a heartbeat every interval; retries with backoff in between."""
        def wake_on_stop() -> None:
            self.stop.wait()
            self.heartbeat_now.set()

        threading.Thread(target=wake_on_stop, name="heartbeat-stop", daemon=True).start()
        while not self.stop.is_set():
            self.heartbeat_now.wait(self._interval)
            self.heartbeat_now.clear()
            if self.stop.is_set():
                break
            try:
                self._retrying("heartbeat")(self.heartbeat_once)
            except errors.SiteRecoveryError as exc:
                if self.stop.is_set():
                    break
                # Not retryable (say, the server no longer knows us): say so and keep trying
                # at the normal pace, so a restored server finds us again.
                log.error("heartbeat refused", error=exc.message, hint=exc.hint, code=exc.code)
                self._status(f"heartbeat refused by {self.cfg.server}: {exc.message}")

    # -- metrics -----------------------------------------------------------
    def _start_metrics(self) -> None:
        """Serve /metrics from the start, so an agent stuck enrolling can be seen too."""
        self.metrics, self.metrics_port = metrics.start(self.role, self.cfg.metrics_listen)
        if self.metrics is None:
            return
        if self.pairs is not None and "pairs" not in self._collectors:
            self.metrics.register("pairs", PairCollector(self.role, self.pairs.pair_statuses))
        self.metrics.register(
            "agent", AgentCollector(lambda: (self._last_heartbeat_at, self._control_failures),
                                    lambda: self._last_directories),
        )
        for name, collector in self._collectors.items():
            self.metrics.register(name, collector)
        self.ready_facts["metrics_port"] = self.metrics_port

    # -- the whole life ----------------------------------------------------
    def run(self, services: Callable[[AgentCredentials], Sequence[Service]] = lambda _c: ()) -> int:
        self._start_metrics()
        try:
            return self._run(services)
        finally:
            if self.metrics is not None:
                self.metrics.stop()

    def _run(self, services: Callable[[AgentCredentials], Sequence[Service]]) -> int:
        try:
            credentials = self.ensure_enrolled()
        except errors.SiteRecoveryError:
            # Stopped while the configuration server could not be reached: the retry
            # loop ends with its last error, but stopping is what was asked for.
            if self.stop.is_set():
                log.info("stopped before enrollment completed")
                return 0
            raise
        if self.stop.is_set():
            return 0
        running = start_server(
            host=self.cfg.listen,
            port=self.cfg.port,
            credentials=credentials.server_credentials(),
            services=services(credentials),
            is_revoked=self.is_revoked,
            observers=[self.metrics.rpc_interceptor()] if self.metrics is not None else (),
        )
        self.data_port = running.port
        log.info("listening", address=self.cfg.listen, port=running.port)
        daemon.report_ready(
            self.cfg.state_dir,
            self.daemon_name,
            agent_id=credentials.identity.id,
            role=self.role,
            port=running.port,
            tls_name=agent_dns_name(credentials.identity.id),
            **self.ready_facts,
        )
        daemon.start_watchdog(self.stop)
        memory.start_trimming(self.stop)
        self.register()
        self.heartbeat_loop()
        daemon.report_stopping()
        if self.pairs is not None:
            self.pairs.end_streams()
        running.stop(grace=5.0)
        if self._channel is not None:
            self._channel.close()
        log.info("stopped")
        return 0

    def data_endpoint(self) -> str:
        host = self.cfg.advertise or (
            socket.gethostname() if self.cfg.listen in ("0.0.0.0", "::", "") else self.cfg.listen
        )
        return f"{host}:{self.cfg.advertise_port or self.data_port}"
