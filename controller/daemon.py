"""sr-config-server: the configuration server daemon.

On first start it creates, in its state directory:
  pki/ca.key, pki/ca.crt         the CA every certificate chains to (key 0600)
  pki/server.key, pki/server.crt its own serving certificate
  passphrase.json                the connection passphrase agents enroll with (0600)
  admin/                         the local administrator's client certificate and
                                 srctl.toml, which srctl reads to connect
  store.db                       the SQLite store (unless store_url names PostgreSQL)
and it keeps all of them across restarts, so no agent ever has to enroll again.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import tomli_w

from siterecovery.common import daemon, errors, logging, metrics, pki, settings
from siterecovery.common.grpcserver import Service, start_server
from siterecovery.common.pb import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    protection_pb2,
    protection_pb2_grpc,
)
from siterecovery.controller import azure_sites, backup, vcenters
from siterecovery.controller.context import ControllerContext
from siterecovery.controller.enrollment import FailureLimiter, PassphraseVault
from siterecovery.controller.jobs.engine import JobRunner, RetryPolicy, registry
from siterecovery.controller.metrics import JobMetrics, StoreCollector
from siterecovery.controller.protection import workflows
from siterecovery.controller.protection.environment import Environment, LocalSites
from siterecovery.controller.providers.local.site import AgentLaunch
from siterecovery.controller.providers.vsphere.session import Session
from siterecovery.controller.registration import register_server_kind
from siterecovery.controller.revocation import Revocations
from siterecovery.controller.secrets import SecretBox
from siterecovery.controller.servicers.admin_servicer import AdminServicer
from siterecovery.controller.servicers.agent_servicer import AgentControlServicer
from siterecovery.controller.servicers.enrollment_servicer import EnrollmentServicer
from siterecovery.controller.servicers.protection_servicer import ProtectionServicer
from siterecovery.controller.settings import ConfigServerSettings
from siterecovery.controller.store.sql import open_store

DAEMON = "config-server"
# The control plane's gRPC options, on top of common/grpcserver.py's. No BDP probing (the
# HTTP/2 transport's PINGs to size its receive window from what it receives): every agent's
# connection carries a small request every heartbeat interval, and probing on thousands of
# them cost about a tenth of the server's CPU at 200 heartbeats a second (bench/RESULTS.md,
# Control plane). The largest request here is a Register's inventory, which the default
# window carries; agents' data ports, which receive bulk data, keep probing.
SERVER_OPTIONS = (("grpc.http2.bdp_probe", 0),)
ADMIN_ID = "local-admin"
log = logging.get_logger(__name__)


def parse_args(argv: list[str] | None) -> ConfigServerSettings:
    parser = argparse.ArgumentParser(prog="sr-config-server", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--state-dir", dest="state_dir")
    parser.add_argument("--listen", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default 443; 0 picks a free one)")
    parser.add_argument("--advertise", action="append", help="name or address agents use (repeatable)")
    parser.add_argument("--store-url", dest="store_url", help="SQLAlchemy URL (default SQLite in the state dir)")
    parser.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    parser.add_argument(
        "--vcenter-discovery-interval",
        dest="vcenter_discovery_interval",
        type=float,
        help="seconds between discoveries of each vCenter / ESXi endpoint (default 900)",
    )
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--metrics-listen", dest="metrics_listen",
                        help="serve Prometheus metrics on host:port (0 picks a free port)")
    args = vars(parser.parse_args(argv))
    config = args.pop("config")
    if args.get("advertise"):
        args["advertise"] = tuple(args["advertise"])
    return settings.load(ConfigServerSettings, config, args)


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(parse_args(argv)))
    except errors.SiteRecoveryError as exc:
        print(f"sr-config-server: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _serving_names(cfg: ConfigServerSettings) -> list[str]:
    names = [pki.CONFIG_SERVER_NAME, "localhost", "127.0.0.1", "::1", socket.gethostname(), *cfg.advertise]
    if cfg.listen not in ("0.0.0.0", "::", ""):
        names.append(cfg.listen)
    return list(dict.fromkeys(names))


def _ensure_serving_cert(ca: pki.CertificateAuthority, pki_dir: Path, names: list[str]) -> tuple[bytes, bytes]:
    key_path, cert_path = pki_dir / "server.key", pki_dir / "server.crt"
    if key_path.exists() and cert_path.exists() and pki.cert_has_names(cert_path.read_bytes(), names):
        return key_path.read_bytes(), cert_path.read_bytes()
    key_pem, cert_pem = ca.issue_keypair(pki.Identity(id=DAEMON, role=pki.CONFIG_SERVER), sans=names)
    pki.write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    return key_pem, cert_pem


def _ensure_admin_credentials(ca: pki.CertificateAuthority, admin_dir: Path) -> None:
    key_path, cert_path = admin_dir / "client.key", admin_dir / "client.crt"
    if not (key_path.exists() and cert_path.exists()):
        key_pem, cert_pem = ca.issue_keypair(pki.Identity(id=ADMIN_ID, role=pki.ADMIN))
        pki.write_private(key_path, key_pem)
        pki.write_private(cert_path, cert_pem)
    (admin_dir / "ca.crt").write_bytes(ca.cert_pem)


def _controller_client_credentials(ca: pki.CertificateAuthority, pki_dir: Path) -> grpc.ChannelCredentials:
    """The certificate the configuration server itself dials agents' data ports with."""
    key_path, cert_path = pki_dir / "controller-client.key", pki_dir / "controller-client.crt"
    if not (key_path.exists() and cert_path.exists()):
        key_pem, cert_pem = ca.issue_keypair(pki.Identity(id=DAEMON, role=pki.ADMIN))
        pki.write_private(key_path, key_pem)
        cert_path.write_bytes(cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem, private_key=key_path.read_bytes(), certificate_chain=cert_path.read_bytes()
    )


def _endpoint(cfg: ConfigServerSettings, port: int) -> str:
    """Where this server is reached: the first advertised name, else the local address."""
    host = cfg.advertise[0] if cfg.advertise else (
        "127.0.0.1" if cfg.listen in ("0.0.0.0", "::", "") else cfg.listen
    )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_srctl_profile(admin_dir: Path, endpoint: str) -> Path:
    profile = admin_dir / "srctl.toml"
    text = tomli_w.dumps(
        {"server": endpoint, "ca": "ca.crt", "cert": "client.crt", "key": "client.key"}
    )
    tmp = profile.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, profile)
    return profile


def _schedule_discoveries(ctx: ControllerContext, stop: threading.Event) -> None:
    """Start a discovery of each endpoint every `vcenter_discovery_interval` seconds."""
    interval = ctx.settings.vcenter_discovery_interval
    assert ctx.discovery_job is not None
    while True:
        try:
            vcenters.schedule_due(ctx.store, ctx.discovery_job, interval=interval, now=datetime.now(UTC))
        except errors.SiteRecoveryError as exc:
            log.warning("discovery scheduling failed", error=str(exc))
        if stop.wait(min(max(interval / 10, 0.2), 30.0)):
            return


def _start_backup_schedule(cfg: ConfigServerSettings, store, stop: threading.Event) -> threading.Thread | None:
    if cfg.backup_dir is None:
        log.warning("no backup schedule: set backup_dir and backup_passphrase_file (see controller/backup.py)")
        return None
    assert cfg.backup_passphrase_file is not None
    schedule = backup.BackupSchedule(
        store, cfg.state_dir, directory=cfg.backup_dir, passphrase_file=cfg.backup_passphrase_file,
        interval=cfg.backup_interval, keep=cfg.backup_keep, stop=stop,
    )
    schedule.passphrase()  # a bad passphrase file stops the start, with the reason
    thread = threading.Thread(target=schedule.loop, name="backups", daemon=True)
    thread.start()
    log.info("backups scheduled", directory=str(cfg.backup_dir), interval=cfg.backup_interval, keep=cfg.backup_keep)
    return thread


def run(
    cfg: ConfigServerSettings,
    stop: threading.Event | None = None,
    *,
    azure: azure_sites.AzureConnector | None = None,
) -> int:
    """Serve until `stop` is set (SIGTERM/SIGINT when not given).

    `azure` builds the Azure clients of job steps; None is production (real
    credential and network). Tests that run this function in-process pass one
    with a replaying transport; there is no setting or flag for it.
    """
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    _held = daemon.lock_state_dir(cfg.state_dir, "config-server")  # released when run() returns
    served, metrics_port = metrics.start(pki.CONFIG_SERVER, cfg.metrics_listen)
    try:
        return _serve(cfg, stop, azure, served, metrics_port)
    finally:
        if served is not None:
            served.stop()


def _serve(
    cfg: ConfigServerSettings,
    stop: threading.Event,
    azure: azure_sites.AzureConnector | None,
    served: metrics.DaemonMetrics | None,
    metrics_port: int,
) -> int:
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = pki.CertificateAuthority.load_or_create(cfg.state_dir / "pki")
    key_pem, cert_pem = _ensure_serving_cert(ca, cfg.state_dir / "pki", _serving_names(cfg))
    _ensure_admin_credentials(ca, cfg.state_dir / "admin")
    vault = PassphraseVault(cfg.state_dir / "passphrase.json")
    vault.load_or_create()
    store = open_store(cfg.resolved_store_url)
    agent_client = _controller_client_credentials(ca, cfg.state_dir / "pki")
    box = SecretBox.load_or_create(cfg.state_dir / "pki")
    ctx = ControllerContext(
        settings=cfg,
        store=store,
        ca=ca,
        vault=vault,
        limiter=FailureLimiter(),
        server_cert_pem=cert_pem,
        registration_job=register_server_kind(agent_client),
        agent_client_credentials=agent_client,
        revocations=Revocations(store),
        secrets=box,
        discovery_job=vcenters.discovery_kind(box),
        azure_jobs=registry(azure_sites.kinds(box, vault, azure)),
    )
    ctx.protection = Environment(
        credentials=agent_client,
        heartbeat_interval=cfg.heartbeat_interval,
        scripts_dir=cfg.resolved_plan_scripts_dir,
        local=LocalSites(cfg.local_site_dir) if cfg.local_site_dir else None,
        agent_launch=lambda: AgentLaunch(
            server=ctx.endpoint, passphrase=vault.current(), heartbeat_interval=cfg.heartbeat_interval,
            log_level=cfg.log_level,
        ),
        vsphere_session=lambda record: Session(vcenters.endpoint_of(record, box)),
        azure=azure_sites.SiteClients(box, azure or azure_sites.AzureConnector()),
    )
    ctx.protection_jobs = registry(workflows.kinds(ctx.protection))
    runner = JobRunner(
        store,
        owner_id=_runner_id(cfg.state_dir),
        kinds=[ctx.registration_job, ctx.discovery_job, *ctx.azure_jobs.values(), *ctx.protection_jobs.values()],
        retry_policy=RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=5.0),
        lease_seconds=30.0,
        observer=JobMetrics(served.registry) if served is not None else None,
    )
    if served is not None:
        served.register("store", StoreCollector(store, heartbeat_interval=cfg.heartbeat_interval))
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca.cert_pem + pki.bootstrap_ca_pem(),
        require_client_auth=True,
    )
    running = start_server(
        host=cfg.listen,
        port=cfg.port,
        credentials=credentials,
        is_revoked=ctx.revocations.is_revoked,
        observers=[served.rpc_interceptor()] if served is not None else (),
        options=SERVER_OPTIONS,
        services=[
            Service(
                enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
                EnrollmentServicer(ctx),
                enrollment_pb2_grpc.add_EnrollmentServicer_to_server,
            ),
            Service(
                agent_pb2.DESCRIPTOR.services_by_name["AgentControl"].full_name,
                AgentControlServicer(ctx),
                agent_pb2_grpc.add_AgentControlServicer_to_server,
            ),
            Service(
                admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                AdminServicer(ctx, stop),
                admin_pb2_grpc.add_AdminServicer_to_server,
            ),
            Service(
                protection_pb2.DESCRIPTOR.services_by_name["Protection"].full_name,
                ProtectionServicer(ctx),
                protection_pb2_grpc.add_ProtectionServicer_to_server,
            ),
        ],
    )
    runner.start(interval=cfg.job_poll_interval)
    scheduler = threading.Thread(
        target=_schedule_discoveries, args=(ctx, stop), name="vcenter-discovery", daemon=True
    )
    scheduler.start()
    backups = _start_backup_schedule(cfg, store, stop)
    ctx.endpoint = _endpoint(cfg, running.port)
    profile = _write_srctl_profile(cfg.state_dir / "admin", ctx.endpoint)
    log.info("listening", address=cfg.listen, port=running.port, srctl_profile=str(profile))
    facts = {"metrics_port": metrics_port} if served is not None else {}
    daemon.report_ready(cfg.state_dir, DAEMON, port=running.port, srctl_profile=str(profile), **facts)
    daemon.start_watchdog(stop)
    stop.wait()
    daemon.report_stopping()
    running.stop(grace=5.0)
    runner.stop()
    scheduler.join(timeout=5.0)
    if backups is not None:
        backups.join(timeout=30.0)
    store.close()
    log.info("stopped")
    return 0


def _runner_id(state_dir: Path) -> str:
    """This server's job-runner id, the same across restarts (see JobRunner.start).

    Kept in the state directory, so two servers sharing one PostgreSQL store
    (each with its own state directory) never share it.
    """
    path = state_dir / "runner-id"
    try:
        return path.read_text("utf-8").strip()
    except FileNotFoundError:
        runner_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(runner_id + "\n", "utf-8")
        os.replace(tmp, path)
        return runner_id


if __name__ == "__main__":
    main()
