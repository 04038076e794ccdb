"""sr-process-server: receives replication from source agents and forwards it.

The daemon enrolls, registers its spool directory, heartbeats and serves its
data port: health, reflection, Probe, Replicate and BlockHashes. Replicate spools each
pair's frames durably (receiver.py, spool.py); one forwarder per assigned pair
sends them on to the pair's master target (forwarder.py) or, for forward
protection to Azure, writes them into the pair's page blob (blob_forwarder.py,
with the credential of azure_storage.py); BlockHashes carries a delta sync's
question for target block hashes to the master target (hashes.py), or for an
Azure pair answers it from the page blob (blob_hashes.py); pairs.py
ties them to the controller's assignments and reports them with every heartbeat.
"""

from __future__ import annotations

import threading

from siterecovery.agents import entry
from siterecovery.agents.probe import probe_response
from siterecovery.agents.runtime import AgentRuntime
from siterecovery.agents.settings import ProcessServerSettings
from siterecovery.common import daemon, grpcserver, logging, pki
from siterecovery.common.grpcserver import Service
from siterecovery.common.inventory import directory_facts, host_facts, space_problems
from siterecovery.common.pb import common_pb2, dataplane_pb2, dataplane_pb2_grpc
from siterecovery.common.sealing import RecordCipher

from .azure_storage import StorageCredentialFile
from .metrics import SpoolCollector
from .pairs import ProcessServerPairs
from .receiver import Receiver
from .spool import Spool

DAEMON = "process-server"
log = logging.get_logger(__name__)


class ProcessServerServicer(dataplane_pb2_grpc.ProcessServerServicer):
    """Thin: Probe answers from the runtime; Replicate is the receiver's (receiver.py);
    BlockHashes is asked of the master target, or read from an Azure pair's blob (hashes.py)."""

    def __init__(self, runtime: AgentRuntime, receiver: Receiver, pairs: ProcessServerPairs) -> None:
        self._runtime = runtime
        self._receiver = receiver
        self._pairs = pairs

    def Probe(self, request, context):
        return probe_response(self._runtime)

    def Replicate(self, request_iterator, context):
        return self._receiver.replicate(request_iterator, context)

    def BlockHashes(self, request, context):
        return self._pairs.block_hashes(request, grpcserver.caller())


# Replicate parses its stream's messages itself (frames.received_frames): no copy of the data.
add_servicer = grpcserver.raw_requests(dataplane_pb2_grpc.add_ProcessServerServicer_to_server, ["Replicate"])


def run(cfg: ProcessServerSettings, stop: threading.Event | None = None) -> int:
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    _held = daemon.lock_state_dir(cfg.state_dir, "process-server")  # released when run() returns
    storage = None
    if cfg.azure_storage_connection_string_file is not None:
        storage = StorageCredentialFile(cfg.azure_storage_connection_string_file)
        account = storage.check()  # refuse to start with a file others may read, or a wrong one
        log.info("azure storage credential found", path=str(storage.path), storage_account=account)
    spool_dir = cfg.resolved_spool_dir
    # With encryption off, a key made earlier still opens the records sealed with it.
    key_file = cfg.resolved_spool_key_file
    cipher = RecordCipher.load_or_create(key_file) if cfg.spool_encryption or key_file.exists() else None
    spool = Spool(spool_dir, limit_bytes=cfg.spool_limit_bytes, cipher=cipher, seal=cfg.spool_encryption)
    pairs = ProcessServerPairs(
        spool,
        credentials=lambda: runtime.credentials,
        storage=storage,
        state_dir=cfg.state_dir,
        on_change=lambda: runtime.heartbeat_now.set(),
    )

    def directories() -> list[common_pb2.DirectoryFacts]:
        return [directory_facts(common_pb2.DIRECTORY_KIND_SPOOL, spool_dir)]

    def problems(found: list[common_pb2.DirectoryFacts]) -> list[common_pb2.Problem]:
        return [*space_problems(found), *pairs.problems()]

    runtime = AgentRuntime(
        cfg,
        role=pki.PROCESS_SERVER,
        daemon_name=DAEMON,
        stop=stop,
        inventory=lambda: common_pb2.Inventory(
            host=host_facts(hostname=cfg.hostname), directories=directories(), data_endpoint=runtime.data_endpoint()
        ),
        directories=directories,
        problems=problems,
        pairs=pairs,
        collectors={"spool": SpoolCollector(spool)},
    )
    # On SIGTERM end the replication streams and forwarders at once, so the server's
    # graceful stop does not wait out its grace period on streams that never end.
    threading.Thread(target=lambda: (stop.wait(), pairs.close()), name="pairs-stop", daemon=True).start()
    try:
        return runtime.run(
            lambda _creds: [
                Service(
                    dataplane_pb2.DESCRIPTOR.services_by_name["ProcessServer"].full_name,
                    ProcessServerServicer(runtime, pairs.receiver, pairs),
                    add_servicer,
                )
            ]
        )
    finally:
        pairs.close()
        spool.close()


def main(argv: list[str] | None = None) -> None:
    entry.main("sr-process-server", run, ProcessServerSettings, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
