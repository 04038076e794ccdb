"""What the master target's digest map costs the apply path (in process, no daemons).

    .venv/bin/python -m bench.digest_apply_cost [--dir DIR] [--size 1G] [--writes 20000]

Applies the same frames to a PairTarget three ways: without a map, with a map
that reads back and hashes the blocks a frame covers in part
(`digestmap.PARTIAL_BLOCKS = "read"`), and with one that leaves them unknown
("forget"). Two workloads: a full sync (1 MiB write frames, first sync: no undo)
and continuous random 16 KiB writes (64 per batch, undo journaled). Reports CPU
seconds of this process (user + system) and wall seconds for each; the fsyncs
make wall time noisy on a shared disk, CPU is the number to compare.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from siterecovery.agents.master_target import digestmap
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import frames
from siterecovery.common.pb import replication_pb2 as rpb

from .common import GiB, MiB, own_cpu_seconds, parse_size


def _pair(root: Path, size: int, mode: str) -> PairTarget:
    shutil.rmtree(root, ignore_errors=True)
    t = PairTarget(pair_id="p", target_path=root / "ds" / "disk.img", journal_dir=root / "ret" / "p", disk_size=size,
                   options=TargetOptions(reserve_bytes=0),
                   digest_map=None if mode == "none" else root / "ret" / digestmap.DIR_NAME / "disk.map")
    digestmap.PARTIAL_BLOCKS = "read" if mode == "none" else mode
    t.open()
    return t


def full_sync(root: Path, size: int, mode: str) -> tuple[float, float]:
    t = _pair(root, size, mode)
    block = os.urandom(MiB)
    seq = 1
    t.apply([(frames.sync_frame("p", seq, rpb.SYNC_PHASE_INITIAL_STARTED, size), b"")])
    cpu, wall = own_cpu_seconds(), time.monotonic()
    for batch_at in range(0, size, 16 * MiB):
        batch = []
        for at in range(batch_at, min(batch_at + 16 * MiB, size), MiB):
            seq += 1
            batch.append((frames.write_frame("p", seq, at, block), block))
        t.apply(batch)
    out = own_cpu_seconds() - cpu, time.monotonic() - wall
    t.close()
    return out


def continuous(root: Path, size: int, mode: str, writes: int) -> tuple[float, float]:
    t = _pair(root, size, mode)
    seq = 1
    t.apply([(frames.sync_frame("p", 1, rpb.SYNC_PHASE_INITIAL_DONE, size), b"")])
    rng = random.Random(1)
    data = os.urandom(16 * 1024)
    cpu, wall = own_cpu_seconds(), time.monotonic()
    for _ in range(writes // 64):
        batch = []
        for _ in range(64):
            seq += 1
            at = rng.randrange(size // 16384) * 16384
            batch.append((frames.write_frame("p", seq, at, data), data))
        t.apply(batch)
    out = own_cpu_seconds() - cpu, time.monotonic() - wall
    t.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--size", type=parse_size, default=1 * GiB)
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="digest-cost-", dir=args.dir))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        for _round in range(args.rounds):
            for mode in ("none", "read", "forget"):
                cpu, wall = full_sync(root, args.size, mode)
                print(f"full sync {args.size / GiB:g} GiB, map {mode:6}: CPU {cpu:.2f} s "
                      f"({cpu / (args.size / GiB):.2f} s/GiB), wall {wall:.2f} s")
            for mode in ("none", "read", "forget"):
                cpu, wall = continuous(root, args.size, mode, args.writes)
                print(f"continuous {args.writes} x 16 KiB, map {mode:6}: CPU {cpu:.2f} s "
                      f"({cpu / args.writes * 1e6:.0f} us/write), wall {wall:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
