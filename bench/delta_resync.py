"""Issue 7 item 2: delta resync after 1 % of the 64 KiB blocks changed, against rsync.

    .venv/bin/python -m bench.delta_resync [--size 4G] [--dir DIR] [--keep] [--seed N] [--fraction 0.01]

(from the repository root). Two runs, each on a site of its own:

1. random data: the image is replicated once (full), the pair disabled (the
   target stays), a seeded random `--fraction` of its 64 KiB blocks overwritten
   with new random data, and the pair enabled again with `--sync delta` onto the
   same target (the default layout reuses it, as tests/integration/
   test_delta_resync.py and a reprotect do). Timed from that enable until the
   pair replicates with everything applied at the master target; the target is
   then checked equal to the image. In the same run, `rsync -I --inplace
   --no-whole-file --stats IMG OLD` on the changed image and a copy of the old
   target, followed by an fsync of OLD (timed together), and checked equal too;
2. mostly zeros: the same with an image of zeros (written, not sparse: the
   source cannot skip it as holes) and the same changed blocks with the same
   data; only ours is timed.

Every timed copy starts with the pages of its files dropped (fsync +
POSIX_FADV_DONTNEED on those files only). Bytes reported by the pair (the new
pair's counters count only its delta sync): what the source sent (write
payload: the wire's data), what the master target applied, and the digests
fetched from the target (the hash exchange; requests are a few bytes each).
Also printed per run: each daemon's CPU seconds and the bytes it read (read
calls / from storage, /proc/PID/io) from the enable to replicating.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path

from . import common
from .common import GiB, MiB

BLOCK = 64 * 1024


def change_blocks(image: Path, size: int, *, fraction: float, seed: int) -> int:
    """Overwrite a seeded random `fraction` of the image's 64 KiB blocks with seeded random data
    (the same blocks and data for any image of this size and seed); how many blocks."""
    blocks = sorted(random.Random(seed).sample(range(size // BLOCK), max(1, round(size // BLOCK * fraction))))
    data = common.keystream(f"{seed}-changes")
    with open(image, "r+b") as f:
        for block in blocks:
            f.seek(block * BLOCK)
            f.write(data(BLOCK))
    common.uncache(image)
    return len(blocks)


def resync(root: Path, args, *, zeros: bool, rss: common.RssSampler) -> dict:
    """One run: full sync, disable, change, delta sync (timed); rsync on the same files unless `zeros`."""
    size = args.size
    timeout = 120 + size / (2 * MiB)
    with common.site(root / "site", size) as s:
        rss.watch(common.daemons(s))
        common.write_image(s.disk, size, seed=None if zeros else args.seed)
        s.enable()
        first = common.wait_synced(s, timeout=timeout)
        s.srctl_json("replication", "disable", s.machine)
        common.wait_no_pairs(s)
        target = Path(first["target_path"])
        changed = change_blocks(s.disk, size, fraction=args.fraction, seed=args.seed)
        old = root / "old-target.img"
        if not zeros:
            shutil.copyfile(target, old)
        common.uncache(s.disk, target)
        cpu = common.cpu_seconds(common.daemons(s))
        reads = common.read_bytes(common.daemons(s))
        started = time.monotonic()
        (pair,) = s.srctl_json("replication", "enable", s.machine, "--disk", "disk0", "--sync", "delta")
        if pair["target_path"] != str(target):
            raise SystemExit(f"the delta pair writes {pair['target_path']}, not the old target {target}")
        done = common.wait_synced(s, timeout=timeout)
        ours = time.monotonic() - started
        cpu_used = common.cpu_line(cpu, common.cpu_seconds(common.daemons(s)), ours)
        read_used = common.read_line(reads, common.read_bytes(common.daemons(s)))
    image = s.disk
    if common.digest(target) != common.digest(image):
        raise SystemExit(f"after the delta sync the target {target} differs from the image {image}")
    run = {
        "ours": ours, "changed": changed * BLOCK, "blocks": changed,
        "sent": int(done["source_bytes_sent"]), "applied": int(done["applied_bytes_total"]),
        "hashes": int(done["sync_hash_bytes"]), "differing": int(done["sync_differing_bytes"]),
    }
    kind = "mostly-zero" if zeros else "random"
    print(f"{kind}: ours {ours:.2f} s from enable --sync delta to replicating, target equal to the image; "
          f"{changed} blocks ({run['changed'] / MiB:.2f} MiB) changed, {run['differing'] / MiB:.2f} MiB found "
          f"differing; source sent {run['sent'] / MiB:.2f} MiB, master target applied {run['applied'] / MiB:.2f} "
          f"MiB, digests fetched {run['hashes'] / MiB:.2f} MiB")
    print(f"{kind}: {cpu_used}")
    print(f"{kind}: {read_used}")
    if not zeros:
        common.uncache(image, old)
        seconds, stats = common.timed(
            ["rsync", "-I", "--inplace", "--no-whole-file", "--stats", str(image), str(old)], fsync=old)
        if common.digest(old) != common.digest(image):
            raise SystemExit("rsync left the old copy different from the image")
        run.update(rsync=seconds, **{key: _stat(stats, label) for key, label in RSYNC_STATS.items()})
        print(f"random: rsync -I --inplace --no-whole-file (+ fsync) {seconds:.2f} s; literal data "
              f"{run['literal'] / MiB:.2f} MiB, bytes sent {run['rsync_sent'] / MiB:.2f} MiB, "
              f"received {run['rsync_received'] / MiB:.2f} MiB")
    return run


RSYNC_STATS = {"literal": "Literal data", "rsync_sent": "Total bytes sent", "rsync_received": "Total bytes received"}


def _stat(stats: str, label: str) -> int:
    match = re.search(rf"^{label}: ([\d,.]+)", stats, re.MULTILINE)
    if not match:
        raise SystemExit(f"rsync --stats printed no {label!r}:\n{stats}")
    return int(match.group(1).replace(",", "").replace(".", ""))


def main() -> None:
    parser = common.arguments("Delta resync against rsync (issue 7 items 2 and 6)")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the 64 KiB blocks changed")
    args = parser.parse_args()
    common.need_tools("rsync")
    size = args.size
    with common.work_dir(args.dir, keep=args.keep, needs=3 * size + 512 * MiB) as root:
        for fact in common.machine_facts(root):
            print(fact)
        rss = common.RssSampler()
        try:
            random_run = resync(root / "random", args, zeros=False, rss=rss)
            if not args.keep:  # room for the second run
                shutil.rmtree(root / "random")
            zero_run = resync(root / "zeros", args, zeros=True, rss=rss)
        finally:
            rss.stop()
    r, z = random_run, zero_run
    print(rss.line())
    print(f"delta_resync {size / GiB:g} GiB, {r['blocks']} of {size // BLOCK} blocks changed "
          f"({r['changed'] / MiB:.1f} MiB): ours {r['ours']:.2f} s, rsync {r['rsync']:.2f} s, "
          f"ours/rsync {r['ours'] / r['rsync']:.2f} (target <= 0.50); wire/changed {r['sent'] / r['changed']:.3f} "
          f"(target <= 1.05) + hash exchange {r['hashes'] / MiB:.2f} MiB, (wire+hash)/changed "
          f"{(r['sent'] + r['hashes']) / r['changed']:.3f}; mostly-zero {z['ours']:.2f} s, "
          f"zero/random {z['ours'] / r['ours']:.2f} (target <= 1.20); load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
