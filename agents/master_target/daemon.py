"""sr-master-target: writes replicated disks on a datastore and keeps the undo journal.

The daemon enrolls, registers its datastore and retention directories with
their free space, heartbeats (with every pair's status and recovery points) and
serves its data port: health, reflection, Probe, Apply (process servers stream
frames in; apply.py, target.py, journal.py), Materialize (a disk as it was
at a recovery point; materialize.py), OpenView/CloseView (a read-only NBD view
of a disk at a recovery point, no copy; pitview.py, views.py) and BlockHashes (digests of a target disk's
blocks for a delta sync; hashes.py). The pairs it serves arrive with the
heartbeat (pairs.py).
"""

from __future__ import annotations

import threading

from siterecovery.agents import entry
from siterecovery.agents.master_target.apply import serve_apply
from siterecovery.agents.master_target.pairs import MasterTargetPairs
from siterecovery.agents.master_target.target import TargetOptions
from siterecovery.agents.master_target.views import ViewExports
from siterecovery.agents.metrics import PairCollector
from siterecovery.agents.probe import probe_response
from siterecovery.agents.runtime import AgentRuntime
from siterecovery.agents.settings import MasterTargetSettings
from siterecovery.common import daemon, grpcserver, logging, pki
from siterecovery.common.grpcserver import Service
from siterecovery.common.inventory import bios_uuid, directory_facts, host_facts
from siterecovery.common.pb import common_pb2, dataplane_pb2, dataplane_pb2_grpc

DAEMON = "master-target"


class MasterTargetServicer(dataplane_pb2_grpc.MasterTargetServicer):
    def __init__(self, runtime: AgentRuntime, pairs: MasterTargetPairs) -> None:
        self._runtime = runtime
        self._pairs = pairs

    def Probe(self, request, context):
        return probe_response(self._runtime)

    def Apply(self, request_iterator, context):
        return serve_apply(self._pairs, request_iterator, context)

    def Materialize(self, request, context):
        return self._pairs.materialize(request)

    def OpenView(self, request, context):
        return self._pairs.open_view(request)

    def CloseView(self, request, context):
        return self._pairs.close_view(request)

    def BlockHashes(self, request, context):
        return self._pairs.block_hashes(request, grpcserver.caller())


# Apply parses its stream's messages itself (frames.received_frames): no copy of the data.
add_servicer = grpcserver.raw_requests(dataplane_pb2_grpc.add_MasterTargetServicer_to_server, ["Apply"])


def run(cfg: MasterTargetSettings, stop: threading.Event | None = None) -> int:
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    _held = daemon.lock_state_dir(cfg.state_dir, "master-target")  # released when run() returns

    def directories() -> list[common_pb2.DirectoryFacts]:
        found = [directory_facts(common_pb2.DIRECTORY_KIND_DATASTORE, d) for d in cfg.resolved_datastore_dirs]
        found.append(directory_facts(common_pb2.DIRECTORY_KIND_RETENTION, cfg.resolved_retention_dir))
        return found

    def agent_id() -> str:
        assert runtime.credentials is not None, "pairs arrive only after enrollment"
        return runtime.credentials.identity.id

    pairs = MasterTargetPairs(
        datastore_dirs=cfg.resolved_datastore_dirs,
        retention_dir=cfg.resolved_retention_dir,
        agent_id=agent_id,
        on_change=lambda: runtime.heartbeat_now.set(),
        options=TargetOptions(reserve_bytes=cfg.retention_reserve_bytes),
        views=ViewExports(cfg.view_nbd_host, cfg.view_nbd_port),
    )
    runtime = AgentRuntime(
        cfg,
        role=pki.MASTER_TARGET,
        daemon_name=DAEMON,
        stop=stop,
        inventory=lambda: common_pb2.Inventory(
            host=host_facts(hostname=cfg.hostname, machine_uuid=cfg.machine_uuid or bios_uuid()), directories=directories(), data_endpoint=runtime.data_endpoint()
        ),
        directories=directories,
        pairs=pairs,
        # A scrape reads the pairs without pruning their journals (the heartbeat does that).
        collectors={"pairs": PairCollector(pki.MASTER_TARGET, pairs.observed_statuses)},
    )
    try:
        return runtime.run(
            lambda _creds: [
                Service(
                    dataplane_pb2.DESCRIPTOR.services_by_name["MasterTarget"].full_name,
                    MasterTargetServicer(runtime, pairs),
                    add_servicer,
                )
            ]
        )
    finally:
        pairs.close()


def main(argv: list[str] | None = None) -> None:
    entry.main("sr-master-target", run, MasterTargetSettings, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
