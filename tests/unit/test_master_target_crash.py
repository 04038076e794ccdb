"""kill -9 of a process applying batches, at seeded moments and at every step of the
write-ahead protocol: the reopened target is exactly the disk at the committed
applied_seq, and the stream resumed from accepted.durable_seq + 1 ends at the
final reference, with every recovery point still exact.

The child (`python -m tests.unit.mt_support child SPEC`) applies a seeded stream in
seeded batches and prints each applied seq. It is killed either by the test, after a
seeded number of batches (the kill lands wherever the child is then), or by itself,
the N-th time it reaches a named step (undo appended, undo flushed, a frame written,
target flushed, committed, or a record put back during recovery).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.common.pb import replication_pb2 as rpb

from .mt_support import (
    T0,
    Harness,
    KiB,
    MiB,
    crash_options,
    make_stream,
    reference_hash,
    send,
    sha256,
    tag_hashes,
)

SEED = int(os.environ.get("SR_MT_CRASH_SEED", "20261128"))
DISK = 2 * MiB
COUNT = 160
REPO = Path(__file__).resolve().parents[2]
# (kill_step, done_at): None kills from the test at a seeded moment.
CASES = [
    (None, 2),
    (None, 2),
    (None, 60),  # often lands in the first initial sync (no undo there)
    ("undo-record", 2),
    ("undo-synced", 2),
    ("target-frame", 2),
    ("target-synced", 2),
    ("committed", 2),
    ("target-frame", 70),
    ("rollback-record", 2),  # a crash while recovering from a crash
]


def _run_child(spec: dict, kill_after: int | None) -> tuple[int, str]:
    """Run the child; SIGKILL it after `kill_after` applied batches. (returncode, last line)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.mt_support", "child", json.dumps(spec)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert child.stdout is not None
    last = ""
    batches = 0
    for line in child.stdout:
        last = line.strip()
        if last.startswith("applied"):
            batches += 1
            if kill_after is not None and batches >= kill_after:
                child.send_signal(signal.SIGKILL)
                break
    child.stdout.close()
    return child.wait(timeout=60), last


@pytest.fixture
def mt(tmp_path: Path):
    harness = Harness(tmp_path, options=crash_options())
    try:
        yield harness
    finally:
        harness.close()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kill9_at_any_moment_leaves_the_target_at_the_committed_seq(mt: Harness, case: int):
    step, done_at = CASES[case]
    rng = random.Random(f"{SEED}-{case}")
    pair_id = f"crash-{case}"
    seed = rng.randrange(1 << 30)
    spec = {
        "pair_id": pair_id, "seed": seed, "disk_size": DISK, "count": COUNT, "done_at": done_at, "t0": T0,
        "max_write": 96 * KiB,
        "target_path": str(mt.datastore / "host" / f"{pair_id}.img"),
        "journal_dir": str(mt.retention / pair_id),
    }
    stream = make_stream(pair_id, seed=seed, disk_size=DISK, count=COUNT, done_at=done_at, max_write=96 * KiB)
    if step == "rollback-record":
        # First crash mid-target-write, then crash again while putting the batch back.
        code, _ = _run_child({**spec, "kill_step": "target-frame", "kill_count": rng.randrange(5, 40)}, None)
        assert code == -signal.SIGKILL
        code, _ = _run_child({**spec, "kill_step": step, "kill_count": 1}, None)
    elif step is None:
        code, _ = _run_child(spec, kill_after=rng.randrange(2, 14))
    else:
        per_batch = step in ("undo-synced", "target-synced", "committed")
        count = rng.randrange(2, 15) if per_batch else rng.randrange(3, 60)
        code, _ = _run_child({**spec, "kill_step": step, "kill_count": count}, None)
    assert code == -signal.SIGKILL, "the child was to be killed, not to finish"

    assignment = mt.assign(pair_id, DISK)  # opens the pair: recovery runs here
    target = mt.pairs.target(pair_id)
    applied = target.applied_seq
    rolled_back = target.rolled_back_at_open
    if target.state["ever_synced"]:
        assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, applied), (
            f"after kill -9 ({step or 'random'}), the target is not the disk at applied_seq {applied}"
        )
    assert not target.journal.uncommitted()

    result = send(mt.stub(), pair_id, DISK, stream)
    assert result.durable_seq == applied and result.last_ack == stream[-1].seq
    assert sha256(Path(assignment.target_path)) == reference_hash(stream, DISK, stream[-1].seq)

    # Points taken before and after the crash still materialise exactly.
    points = [p.tag_id for p in mt.status(pair_id).points]
    expected = tag_hashes(stream, DISK)
    assert points == list(expected)
    for tag_id in (points[0], points[len(points) // 2]) if points else ():
        out = mt.datastore / "copies" / f"{pair_id}-{tag_id}.img"
        mt.pairs.materialize(rpb.MaterializeRequest(pair_id=pair_id, point=tag_id, output_path=str(out)))
        assert sha256(out) == expected[tag_id][1], f"point {tag_id} after a crash"
    print(f"[crash] case {case} ({step or 'random'}, seed {SEED}): killed at applied_seq {applied}, "
          f"{rolled_back} undo records put back, held")
