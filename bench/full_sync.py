"""Issue 7 item 1: full sync of a random-data image, against dd and rsync in the same run.

    .venv/bin/python -m bench.full_sync [--size 4G] [--dir DIR] [--keep] [--seed N]

(from the repository root). Ours: the time from `srctl replication enable` until
the pair replicates with everything applied at the master target (polled over
the admin API; the daemons heartbeat every 0.3 s, so the end is seen at most
about 0.6 s late), the target then checked equal to the image. The peers copy
the same image to a local file under the work directory:

- `dd if=IMG of=OUT bs=4M conv=fsync`: buffered writes and one fsync at the
  end, the way the master target writes (page cache, fsync before it
  acknowledges); oflag=direct would measure synchronous 4 MiB O_DIRECT writes
  with no overlap of reading and writing, a slower and different path;
- `rsync -W --inplace IMG OUT` followed by an fsync of OUT, timed together (rsync
  does not fsync by itself, and every copy here ends durable).

Each copy starts with the image's pages dropped (fsync + POSIX_FADV_DONTNEED on
the image only), so all three read it from the disk. Throughput is image bytes
per second, MB = 10^6 bytes, as dd prints it. Item 6: the RSS of every daemon is
sampled throughout and its maximum printed.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import common
from .common import GiB, MiB, mbps


def main() -> None:
    args = common.arguments("Full sync against dd and rsync (issue 7 items 1 and 6)").parse_args()
    common.need_tools("dd", "rsync")
    size = args.size
    with common.work_dir(args.dir, keep=args.keep, needs=3 * size + 512 * MiB) as root:
        for fact in common.machine_facts(root):
            print(fact)
        rss = common.RssSampler()
        with common.site(root / "site", size) as s:
            rss.watch(common.daemons(s))
            common.write_image(s.disk, size, seed=args.seed)
            common.uncache(s.disk)
            cpu = common.cpu_seconds(common.daemons(s))
            started = time.monotonic()
            s.enable()
            pair = common.wait_synced(s, timeout=120 + size / (2 * MiB))
            ours = time.monotonic() - started
            cpu_used = common.cpu_line(cpu, common.cpu_seconds(common.daemons(s)), ours)
            rss.stop()
        image, target = s.disk, Path(pair["target_path"])
        if common.digest(target) != common.digest(image):
            raise SystemExit(f"the target {target} differs from the image {image}")
        sent, applied = int(pair["source_bytes_sent"]), int(pair["applied_bytes_total"])
        print(f"ours: {ours:.2f} s from enable to replicating, target equal to the image; "
              f"source sent {sent / MiB:.1f} MiB, master target applied {applied / MiB:.1f} MiB")
        print(cpu_used)
        target.unlink()

        out = root / "peer.img"
        common.uncache(image)
        dd, _ = common.timed(["dd", f"if={image}", f"of={out}", "bs=4M", "conv=fsync"])
        print(f"dd bs=4M conv=fsync: {dd:.2f} s")
        out.unlink()
        common.uncache(image)
        rsync, _ = common.timed(["rsync", "-W", "--inplace", str(image), str(out)], fsync=out)
        print(f"rsync -W --inplace (+ fsync): {rsync:.2f} s")
        if out.stat().st_size != size:
            raise SystemExit(f"rsync wrote {out.stat().st_size} bytes, not {size}")
        print(rss.line())
        print(f"full_sync {size / GiB:g} GiB: ours {mbps(size, ours):.0f} MB/s, dd {mbps(size, dd):.0f} MB/s, "
              f"rsync {mbps(size, rsync):.0f} MB/s; ours/dd {dd / ours:.2f} (target >= 0.50), "
              f"ours/rsync {rsync / ours:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
