"""The integration harness's replicating site, with what the benchmarks add to it.

`BenchSite` is `tests/integration/replication_site.py::ReplicatingSite` — real
daemons as subprocesses on 127.0.0.1 port 0, mutual TLS, srctl — with a disk
full of random data (so the full sync moves every byte and nothing compresses),
the pair's status read over one Admin channel (`Site.admin()`), and a timed
full sync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import write_image
from siterecovery.common.pb import admin_pb2
from siterecovery.common.pb import replication_pb2 as rpb
from tests.integration.conftest import HEARTBEAT, SRCTL_COLUMNS, srctl_server, wait_for
from tests.integration.replication_site import ReplicatingSite

RPC_TIMEOUT = 10.0


class BenchSite(ReplicatingSite):
    def start_random(self, size: int, *, seed: int = 1, heartbeat: float = HEARTBEAT,
                     source_extra: dict | None = None, ps_extra: dict | None = None) -> None:
        """Every daemon up (heartbeating every `heartbeat` s; the harness's is 0.3 s, production's
        10 s) and a source disk of `size` random bytes, no pair yet."""
        every = {"heartbeat_interval": heartbeat}
        self.start(disk_size=size, data_bytes=0, seed=seed, cs_extra=every, ps_extra={**every, **(ps_extra or {})},
                   mt_extra=every, source_extra={**every, **(source_extra or {})})
        # Written before the pair exists, so nothing captures it: the full sync moves it.
        write_image(self.disk, size, seed=seed)

    def view(self) -> admin_pb2.PairView:
        """The pair's status as `srctl replication status` shows it, over the one Admin channel."""
        pairs = self.admin().ListPairs(admin_pb2.ListPairsRequest(machine=self.machine), timeout=RPC_TIMEOUT).pairs
        (pair,) = pairs
        return pair

    def caught_up(self) -> admin_pb2.PairView | None:
        """The view, when the master target applied everything the source produced."""
        pair = self.view()
        done = (
            pair.state == rpb.PAIR_STATE_REPLICATING
            and pair.applied_seq >= pair.source_seq > 0
            and pair.rpo_known and pair.rpo_seconds == 0
        )
        return pair if done else None

    def wait_caught_up_view(self, timeout: float) -> admin_pb2.PairView:
        def check():
            pair = self.view()
            if pair.state == rpb.PAIR_STATE_ERROR:
                raise RuntimeError(f"pair in error: {pair.reason_code}: {pair.reason}")
            return self.caught_up()

        return wait_for(check, timeout=timeout, what="the target to catch up")

    def timed_full_sync(self, timeout: float) -> float:
        """Enable the pair and return the seconds until the target holds the whole disk."""
        started = time.monotonic()
        self.enable()
        self.wait_caught_up_view(timeout)
        return time.monotonic() - started

    def journal_dir(self) -> Path:
        """The pair's undo journal on the master target: `<retention dir>/<pair id>/`."""
        return self.root / "master-target" / "retention" / self.view().pair_id

    def srctl_timed(self, *args: str, timeout: float = 3600) -> tuple[dict, float]:
        """`srctl ARGS --output json` as its own process (the harness's fork server, so without
        Python's start-up), with a timeout long enough for a whole disk; (answer, seconds)."""
        env = {**os.environ, "COLUMNS": SRCTL_COLUMNS, "HOME": str(self.root / "home")}
        env.pop("SRCTL_CONFIG", None)
        started = time.monotonic()
        done = srctl_server().run(
            ["--config", str(self.profile), *args, "--output", "json"], env=env, cwd=Path.cwd(),
            output_dir=self.root / "srctl", timeout=timeout,
        )
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"srctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout), seconds

    def materialize_timed(self, point: str, output_path: Path | None = None) -> tuple[dict, float]:
        """`srctl recovery-points materialize MACHINE --point POINT [--output-path P]`; (result, seconds)."""
        extra = ["--output-path", str(output_path)] if output_path else []
        answer, seconds = self.srctl_timed("recovery-points", "materialize", self.machine, "--point", point, *extra)
        return answer["result"], seconds

    def daemon_pids(self) -> dict[str, int]:
        named = {"config-server": self.cs.pid} if self.cs is not None else {}
        named.update({name: launched.pid for name, launched in self.agents.items()})
        return named


@contextmanager
def bench_site(workdir: Path | None, prefix: str, *, keep: bool = False) -> Iterator[BenchSite]:
    """A site in a fresh directory under `workdir` (the file system measured); every
    daemon stopped and the directory removed at the end, unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    site = BenchSite(root)
    try:
        yield site
    finally:
        site.stop_all()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def add_site_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark of this package takes for its site: fio depth, heartbeat, where, keep."""
    p.add_argument("--iodepth", type=int, default=16, help="fio iodepth for the nbd engine (default 16)")
    p.add_argument("--heartbeat", type=float, default=HEARTBEAT,
                   help=f"every daemon's heartbeat interval in s (default {HEARTBEAT}, the test harness's)")
    p.add_argument("--workdir", type=Path, default=None, help="directory on the file system to measure")
    p.add_argument("--keep", action="store_true", help="keep the site's directories (logs, images)")
