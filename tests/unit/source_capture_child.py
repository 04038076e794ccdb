"""A child process for the capture crash test: serve one disk over NBD with its pair's journal attached.

    python -m tests.unit.source_capture_child IMAGE PAIR_DIR PAIR_ID [CRASH_AT]

Prints `PORT <n>` on stdout once serving, then serves until killed. With
CRASH_AT = n the process kills itself (SIGKILL) in the middle of the n-th
group commit: after the journal's fsync, before the disk file is written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from siterecovery.agents.source.capture import DiskCapture, PairJournal
from siterecovery.common import logging
from siterecovery.common.nbd import NbdServer


def main() -> None:
    image, pair_dir, pair_id = sys.argv[1:4]
    logging.configure(level="warning", json=True, stream=sys.stderr)
    disk = DiskCapture("disk0", Path(image))
    if len(sys.argv) > 4:
        crash_at = int(sys.argv[4])
        apply = disk._apply

        def apply_or_die(*args):
            if disk.commits >= crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            apply(*args)

        disk._apply = apply_or_die
    disk.attach(PairJournal(Path(pair_dir), pair_id))
    server = NbdServer("127.0.0.1", 0)
    server.add_export("disk0", disk)
    print(f"PORT {server.start()}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
