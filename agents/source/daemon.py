"""sr-source-agent: runs on a protected machine, serves its disks over NBD and replicates them.

The agent enrolls, registers its machine and disks (each with a stable
identity) and its state directory (where the journals live) with its free
space, and heartbeats. Every configured disk is served as an NBD export
named after the disk on `nbd_listen:nbd_port` (reported as `nbd` =
{disk name: URI} in the state file and in the log); writes made through it are
journaled and streamed to the process server while the disk's pair replicates
in nbd mode (see replicator.py). The registration carries the machine's network
identity, and a heartbeat response may carry a network order to re-apply it
(netidentity/). Start-up order: open the disks, re-attach and
replay the pairs' journals, then serve NBD, then enroll/register.
"""

from __future__ import annotations

import threading

import grpc

from siterecovery.agents import entry
from siterecovery.agents.runtime import AgentRuntime
from siterecovery.agents.settings import SourceSettings
from siterecovery.common import blockhash, daemon, errors, logging, pki
from siterecovery.common.channels import RPC_TIMEOUT, secure_channel
from siterecovery.common.inventory import DiskIdentities, bios_uuid, directory_facts, disk_facts, host_facts
from siterecovery.common.nbd import NbdServer
from siterecovery.common.pb import agent_pb2, agent_pb2_grpc, common_pb2

from . import generation
from .capture import DiskCapture
from .netidentity import NetworkAgent
from .replicator import ReplicationOptions, SourceReplication

DAEMON = "source-agent"
log = logging.get_logger(__name__)


def _check(cfg: SourceSettings) -> None:
    # Refuse a bad disk list before enrolling, so a typo changes nothing.
    names = set()
    for disk in cfg.disks:
        if not disk.path.exists():
            raise errors.InvalidInput(
                f"protected disk {disk.path} does not exist",
                hint="fix the disks list in the source agent's config file",
                code="disk-missing",
            )
        if not disk.name or disk.name in names:
            raise errors.InvalidInput(
                f"disk {disk.path} needs a name of its own (got {disk.name!r})",
                hint="give every disk in the config file a unique name",
                code="disk-name",
            )
        names.add(disk.name)
    if not 0 <= cfg.nbd_port <= 65535:
        raise errors.InvalidInput(f"nbd_port {cfg.nbd_port} is outside 0-65535", code="config-range")
    if cfg.send_window_bytes < 1024 * 1024:
        raise errors.InvalidInput("send_window_bytes must be at least 1 MiB", code="config-range")
    if cfg.journal_limit_bytes < 16 * 1024 * 1024:
        raise errors.InvalidInput("journal_limit_bytes must be at least 16 MiB", code="config-range")
    if not 0 <= cfg.journal_reserve_percent < 100:
        raise errors.InvalidInput("journal_reserve_percent must be 0 to under 100", code="config-range")
    if not 1 <= cfg.delta_hash_blocks <= blockhash.MAX_BLOCKS_PER_CALL:
        raise errors.InvalidInput(
            f"delta_hash_blocks must be 1 to {blockhash.MAX_BLOCKS_PER_CALL}", code="config-range"
        )
    for script in (cfg.freeze_script, cfg.thaw_script):
        if script is not None and not script.exists():
            raise errors.InvalidInput(
                f"hook script {script} does not exist",
                hint="fix freeze_script / thaw_script in the config file",
                code="hook-missing",
            )


def run(cfg: SourceSettings, stop: threading.Event | None = None) -> int:
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    _held = daemon.lock_state_dir(cfg.state_dir, "source-agent")  # released when run() returns
    _check(cfg)
    network = NetworkAgent.from_settings(cfg)
    identities = DiskIdentities(cfg.state_dir)
    disks = {d.name: DiskCapture(d.name, d.path) for d in cfg.disks}

    def directories() -> list[common_pb2.DirectoryFacts]:
        # The pairs' journals live here (writes acknowledged but not yet sent): a full
        # file system stops replication, so its free space is reported like a spool's.
        return [directory_facts(common_pb2.DIRECTORY_KIND_STATE, cfg.state_dir)]

    def inventory() -> common_pb2.Inventory:
        return common_pb2.Inventory(
            host=host_facts(hostname=cfg.hostname, machine_uuid=cfg.machine_uuid or bios_uuid()),
            disks=[disk_facts(identities, d.path, d.name) for d in cfg.disks],
            directories=directories(),
            data_endpoint=runtime.data_endpoint(),
            network=network.identity(),
        )

    def connect(endpoint: str, process_server_id: str) -> grpc.Channel:
        assert runtime.credentials is not None
        return secure_channel(
            endpoint, runtime.credentials.channel_credentials(), target_name=pki.agent_dns_name(process_server_id)
        )

    control: list[grpc.Channel] = []

    def hold_barrier(tag_id: str) -> tuple[int, str]:
        assert runtime.credentials is not None
        if not control:
            control.append(
                secure_channel(cfg.server, runtime.credentials.channel_credentials(), target_name=pki.CONFIG_SERVER_NAME)
            )
        try:
            reply = agent_pb2_grpc.AgentControlStub(control[0]).HoldBarrier(
                agent_pb2.HoldBarrierRequest(tag_id=tag_id), timeout=RPC_TIMEOUT
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, target=cfg.server) from exc
        return reply.outcome, reply.reason

    replication = SourceReplication(
        cfg.state_dir,
        disks,
        connect=connect,
        options=ReplicationOptions(
            window_bytes=cfg.send_window_bytes,
            freeze_script=cfg.freeze_script,
            thaw_script=cfg.thaw_script,
            hook_timeout_seconds=cfg.hook_timeout_seconds,
            delta_batch_blocks=cfg.delta_hash_blocks,
            journal_limit_bytes=cfg.journal_limit_bytes,
            journal_reserve_fraction=cfg.journal_reserve_percent / 100,
        ),
        hold_barrier=hold_barrier,
        notify=lambda: runtime.heartbeat_now.set(),
    )
    generation.drop_stale_pairs(cfg.state_dir, replication.root, cfg.disk_generation_command)
    replication.recover()
    nbd = NbdServer(cfg.nbd_listen, cfg.nbd_port)
    for name, disk in disks.items():
        nbd.add_export(name, disk)
    nbd.start()
    exports = {name: nbd.uri(name) for name in disks}
    for name, uri in exports.items():
        log.info("serving disk over NBD", disk=name, uri=uri)
    runtime = AgentRuntime(
        cfg, role=pki.SOURCE, daemon_name=DAEMON, stop=stop, inventory=inventory, directories=directories,
        pairs=replication, network=network, ready_facts={"nbd": exports},
    )
    try:
        return runtime.run()
    finally:
        nbd.stop()
        replication.close()
        for disk in disks.values():
            disk.close()
        for channel in control:
            channel.close()


def main(argv: list[str] | None = None) -> None:
    entry.main("sr-source-agent", run, SourceSettings, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
