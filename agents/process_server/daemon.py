"""sr-process-server: receives replication from source agents and forwards it.

The data path (spool, compression, forwarding) arrives with the replication
work; today the daemon enrolls, registers its spool, heartbeats and serves its
data port (health, reflection, Probe).
"""

from __future__ import annotations

import threading

from siterecovery.agents import entry
from siterecovery.agents.probe import probe_response
from siterecovery.agents.runtime import AgentRuntime
from siterecovery.agents.settings import ProcessServerSettings
from siterecovery.common import daemon, logging, pki
from siterecovery.common.grpcserver import Service
from siterecovery.common.inventory import directory_facts, host_facts
from siterecovery.common.pb import common_pb2, dataplane_pb2, dataplane_pb2_grpc

DAEMON = "process-server"


class ProcessServerServicer(dataplane_pb2_grpc.ProcessServerServicer):
    def __init__(self, runtime: AgentRuntime) -> None:
        self._runtime = runtime

    def Probe(self, request, context):
        return probe_response(self._runtime)


def run(cfg: ProcessServerSettings, stop: threading.Event | None = None) -> int:
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    spool = cfg.resolved_spool_dir

    def directories() -> list[common_pb2.DirectoryFacts]:
        return [directory_facts(common_pb2.DIRECTORY_KIND_SPOOL, spool)]

    runtime = AgentRuntime(
        cfg,
        role=pki.PROCESS_SERVER,
        daemon_name=DAEMON,
        stop=stop,
        inventory=lambda: common_pb2.Inventory(
            host=host_facts(), directories=directories(), data_endpoint=runtime.data_endpoint()
        ),
        directories=directories,
    )
    return runtime.run(
        lambda _creds: [
            Service(
                dataplane_pb2.DESCRIPTOR.services_by_name["ProcessServer"].full_name,
                ProcessServerServicer(runtime),
                dataplane_pb2_grpc.add_ProcessServerServicer_to_server,
            )
        ]
    )


def main(argv: list[str] | None = None) -> None:
    entry.main("sr-process-server", run, ProcessServerSettings, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
