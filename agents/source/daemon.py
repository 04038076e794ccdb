"""sr-source-agent: runs on a protected machine and reports its disks.

Change tracking and streaming arrive with the replication work; today the
agent enrolls, registers its machine and disks (each with a stable identity),
and heartbeats.
"""

from __future__ import annotations

import threading

from siterecovery.agents import entry
from siterecovery.agents.runtime import AgentRuntime
from siterecovery.agents.settings import SourceSettings
from siterecovery.common import daemon, errors, logging, pki
from siterecovery.common.inventory import DiskIdentities, disk_facts, host_facts
from siterecovery.common.pb import common_pb2

DAEMON = "source-agent"


def run(cfg: SourceSettings, stop: threading.Event | None = None) -> int:
    logging.configure(level=cfg.log_level, json=cfg.log_json)
    stop = stop or daemon.install_stop_handlers()
    identities = DiskIdentities(cfg.state_dir)
    # Refuse a bad disk list before enrolling, so a typo changes nothing.
    for disk in cfg.disks:
        if not disk.path.exists():
            raise errors.InvalidInput(
                f"protected disk {disk.path} does not exist",
                hint="fix the disks list in the source agent's config file",
                code="disk-missing",
            )

    def inventory() -> common_pb2.Inventory:
        return common_pb2.Inventory(
            host=host_facts(),
            disks=[disk_facts(identities, d.path, d.name) for d in cfg.disks],
            data_endpoint=runtime.data_endpoint(),
        )

    runtime = AgentRuntime(cfg, role=pki.SOURCE, daemon_name=DAEMON, stop=stop, inventory=inventory)
    return runtime.run()


def main(argv: list[str] | None = None) -> None:
    entry.main("sr-source-agent", run, SourceSettings, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
