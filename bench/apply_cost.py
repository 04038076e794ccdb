"""CPU per 16 KiB frame on the master target's apply path (in process, no daemons, no gRPC).

    .venv/bin/python -m bench.apply_cost [--dir DIR] [--size 1G] [--frames 20000] [--batch 32] [--profile]

Builds the Apply stream's batch messages the way the process server sends them
(16 KiB random-offset writes, zstd-compressed when that saves bytes, `batch`
messages of `--batch` frames), then times what the master target does with
each: read the message (`frames.incoming`), check every frame (apply.py
`_check`: validate, decompress, verify), apply the group (target.py: undo
journal, target write, fsyncs, commit). CPU of this process (user + system)
per frame is the number to compare: the fsyncs make wall time noisy on a
shared disk. `--profile` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from siterecovery.agents.master_target import apply
from siterecovery.agents.master_target.target import PairTarget, TargetOptions
from siterecovery.common import frames
from siterecovery.common.pb import replication_pb2 as rpb

from .common import GiB, own_cpu_seconds, parse_size


def _user() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _messages(size: int, count: int, batch: int) -> list[bytes]:
    rng = random.Random(1)
    out, bodies = [], []
    for seq in range(2, count + 2):
        # Half random, half zeros: compresses, as fio's buffers did in bench.continuous.
        data = rng.randbytes(8192) + bytes(8192)
        frame = frames.compress(frames.write_frame("p", seq, rng.randrange(size // 16384) * 16384, data), data)
        bodies.append(frame.SerializeToString())
        if len(bodies) == batch:
            out.append(frames.batch_message(bodies))
            bodies = []
    if bodies:
        out.append(frames.batch_message(bodies))
    return out


def run(root: Path, size: int, count: int, batch: int, profile: bool) -> tuple[float, float, float]:
    shutil.rmtree(root, ignore_errors=True)
    target = PairTarget(pair_id="p", target_path=root / "ds" / "disk.img", journal_dir=root / "ret" / "p",
                        disk_size=size, options=TargetOptions(reserve_bytes=0), digest_map=root / "ret" / "d.map")
    target.open()
    target.apply([(frames.sync_frame("p", 1, rpb.SYNC_PHASE_INITIAL_DONE, size), b"")])
    messages = _messages(size, count, batch)
    profiler = cProfile.Profile() if profile else None
    cpu, user, wall = own_cpu_seconds(), _user(), time.monotonic()
    if profiler:
        profiler.enable()
    last = target.applied_seq
    for message in messages:
        ready = apply._check("p", frames.incoming(message), size, last)
        target.apply(ready)
        last = target.applied_seq
    if profiler:
        profiler.disable()
    out = own_cpu_seconds() - cpu, _user() - user, time.monotonic() - wall
    assert target.applied_seq == count + 1
    target.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--size", type=parse_size, default=1 * GiB)
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="apply-cost-", dir=args.dir))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        for _round in range(args.rounds):
            cpu, user, wall = run(root, args.size, args.frames, args.batch, args.profile)
            print(f"apply {args.frames} x 16 KiB in batches of {args.batch}: CPU {cpu:.2f} s "
                  f"({cpu / args.frames * 1e6:.0f} us/frame, user {user / args.frames * 1e6:.0f}), wall {wall:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
