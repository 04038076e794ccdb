"""Point views, the master target's part alone: indexing an undo journal against reading it.

    .venv/bin/python -m bench.view_scan [--records 84000] [--record-size 16K] [--batch 8] [--runs 5]
    .venv/bin/python -m bench.view_scan --journal DIR     # a journal kept by bench.point_in_time --keep

What bench.point_in_time times through srctl, without the daemons: the index a
view is opened with (pitview.PointView.build over journal.undo_extents_after,
every record newer than the point read, its header and fields checked - its
data is checked at the first read of it through the view, not here; records
written before fields sums existed are checked whole here - and indexed)
against a plain sequential read of the same segment files (bench.rpo.cache.timed_read), both
cold (drop_caches where allowed, and each file's pages dropped), alternating,
`--runs` times. Without `--journal` a journal is written first as the master
target writes one under fio's random 16 KiB writes: 64 MiB segments, one commit
record per `--batch` undo records, each record's old data random bytes at a
random 16 KiB-aligned offset of a 4 GiB disk. The work directory is removed at
the end unless `--keep`.

For comparing two checkouts: run the same command with each one's interpreter
(`/path/to/checkout/.venv/bin/python -m bench.view_scan --journal DIR` from that
checkout), one after the other, on the same journal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from bench.rpo import cache
from bench.rpo.stats import MiB, parse_size
from siterecovery.agents.master_target import journal as undo
from siterecovery.agents.master_target import pitview

DISK = 4 * 1024 * MiB
SEGMENT_BYTES = 64 * MiB


def write_journal(directory: Path, records: int, record_size: int, batch: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = os.urandom(record_size * 64 + 4096)
    state = {"applied_seq": 0, "newest_captured_at_ns": 0, "points": []}
    journal = undo.UndoJournal(directory, segment_bytes=SEGMENT_BYTES, reserve_bytes=0)
    journal.open(state)
    seq = 0
    for n in range(records):
        seq += 1
        at = rng.randrange(0, 4096)
        data = pool[at : at + record_size]
        journal.append_undo(seq, rng.randrange(0, DISK // record_size) * record_size, record_size,
                            None if rng.random() < 0.02 else data)
        if (n + 1) % batch == 0 or n + 1 == records:
            delta = {"applied_seq": seq, "applied_captured_at_ns": 1_700_000_000_000_000_000 + seq,
                     "newest_captured_at_ns": 1_700_000_000_000_000_000 + seq,
                     "applied_bytes_total": seq * record_size, "undo_bytes": seq * record_size,
                     "undo_records": seq, "points_added": []}
            journal.commit(delta)
            state = undo.merge(state, delta)
            journal.maybe_rotate(state)
    journal.close()


def open_index(directory: Path) -> tuple[float, int, int]:
    """Index every undo record of the journal as a view of the point before the first one."""
    journal = undo.UndoJournal(directory, segment_bytes=SEGMENT_BYTES, reserve_bytes=0)
    journal.open({"applied_seq": 0, "points": []})
    try:
        seq = journal.segments[0].applied_seq
        with tempfile.NamedTemporaryFile() as disk:
            target = types.SimpleNamespace(pair_id="bench", journal=journal, disk_size=DISK,
                                           target_path=Path(disk.name))
            view = pitview.PointView("bench", target, "", seq)  # type: ignore[arg-type]
            started = time.monotonic()
            view.build(journal.undo_extents_after(seq, journal.cut(), list(journal.segments)))
            seconds = time.monotonic() - started
            view.close()
        return seconds, view.indexed_records, view.indexed_bytes
    finally:
        journal.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.view_scan", description=__doc__.split("\n")[0])
    p.add_argument("--journal", type=Path, default=None, help="index a copy of this journal instead")
    p.add_argument("--in-place", action="store_true",
                   help="with --journal: index it where it is, no copy (it must be a closed, committed journal)")
    p.add_argument("--records", type=int, default=84_000, help="undo records to write (default 84000)")
    p.add_argument("--record-size", type=parse_size, default=parse_size("16K"), help="old data per record")
    p.add_argument("--batch", type=int, default=8, help="undo records per commit (default 8)")
    p.add_argument("--runs", type=int, default=5, help="alternating cold runs of each (default 5)")
    p.add_argument("--workdir", type=Path, default=None, help="where the journal is written or copied")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sr-bench-view-scan-", dir=args.workdir))
    directory = args.journal if args.journal and args.in_place else work / "journal"
    try:
        if args.journal and args.in_place:
            pass
        elif args.journal:
            shutil.copytree(args.journal, directory)
        else:
            write_journal(directory, args.records, args.record_size, args.batch, seed=1)
        segments = sorted(directory.glob(f"*{undo.SUFFIX}"))
        print(f"journal: {len(segments)} segments, {sum(s.stat().st_size for s in segments) / MiB:.0f} MiB; "
              f"load average {os.getloadavg()[0]:.2f}")
        opens, reads = [], []
        for run in range(args.runs):
            how = cache.make_cold(segments)
            seconds, records, read = open_index(directory)
            cache.make_cold(segments)
            total, plain = cache.timed_read(segments)
            opens.append(seconds)
            reads.append(plain)
            print(f"run {run + 1}: index {seconds:.3f} s ({records} records, {read / MiB:.0f} MiB) vs plain read "
                  f"{plain:.3f} s ({total / MiB:.0f} MiB): {seconds / plain:.2f}x  [{how}; load "
                  f"{os.getloadavg()[0]:.2f}]")
        ratios = [o / r for o, r in zip(opens, reads, strict=True)]
        print(json.dumps({"index_median_s": round(statistics.median(opens), 3),
                          "read_median_s": round(statistics.median(reads), 3),
                          "ratio_median": round(statistics.median(ratios), 2),
                          "ratio_best": round(min(ratios), 2)}))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
