"""Point in time (issue 7, item 4): materialising an older point, and the latest one.

    .venv/bin/python -m bench.point_in_time [--size 4G] [--minutes 2] [--latest-size 1G] [--rate 20M]

One replicating site of the integration harness (real daemons, mutual TLS,
127.0.0.1 port 0) protects a disk of `--size` random bytes. After the full sync
a recovery point is taken while nothing writes, and the source disk's SHA-256 is
noted then (the copy of the source at the point, as a digest). fio's nbd engine
then writes random 16 KiB blocks through the source agent's NBD export for
`--minutes` at `--rate` (default: half the measured full-sync throughput);
meanwhile "latest" is materialised every few seconds. Once the target caught up:

- the point from `--minutes` ago is materialised to a new file beside the target
  (`srctl recovery-points materialize MACHINE --point TAG --output-path P`), the
  target and the pair's undo journal cold, and compared by SHA-256 with the
  source at the point;
- the peer: a plain sequential read of the pair's undo journal files on the
  master target (`<retention dir>/<pair id>/*.seg`: every record in them is newer
  than the point, since the first sync journals nothing), cold as well;
- for where the time goes: the target copied alone, the way materialising
  starts (copy_file_range over its data extents), cold.
- the same point opened as a view (`srctl recovery-points open-view MACHINE
  --point TAG`: the target plus an index of the undo journal newer than the
  point, served read-only over NBD; no copy), target and journal cold; then,
  for information, the view read whole through nbdcopy and compared by SHA-256
  with the source at the point, and closed (`close-view`).

"Cold" is `echo 3 > /proc/sys/vm/drop_caches` where allowed, and in any case
each file's pages dropped with fsync + posix_fadvise(DONTNEED); the report says
which worked and how much stayed cached. Then "latest" (the target itself, no
copy) is timed on an idle pair, and the same on a second site of `--latest-size`
(sync, a short write load with latest timed under it, then idle), so the last
line shows it for two disk sizes. Targets: older point <= 1.5x the journal read;
latest <= 2 s whatever the disk size. The older point is met by the view: the
last line printed is the ratio view open / journal read.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.rpo import cache, fio, machine
from bench.rpo.site import BenchSite, add_site_options, bench_site
from bench.rpo.stats import MiB, parse_size, percentile
from siterecovery.agents.master_target import blockio
from tests.integration.replication_site import sha256

RATIO_TARGET = 1.5
LATEST_TARGET = 2.0
LATEST_EVERY = 5.0  # seconds between "latest" timings under the write load


@dataclass
class Latest:
    size: int
    under_load: list[float] = field(default_factory=list)
    idle: float = 0.0
    verified: bool = False

    @property
    def worst(self) -> float:
        return max([self.idle, *self.under_load])

    def line(self) -> str:
        load = (f"under load p50 {percentile(self.under_load, 50):.2f} s, max {max(self.under_load):.2f} s "
                f"({len(self.under_load)} calls); " if self.under_load else "")
        return (f"latest at {self.size / MiB:.0f} MiB: {load}idle {self.idle:.2f} s; the target equals the "
                f"source (SHA-256): {'yes' if self.verified else 'NO'}")


@dataclass
class Older:
    """The older point's numbers: materialising it, the journal read, and the target copy alone."""

    rate: int
    written: fio.FioResult
    materialize_seconds: float = 0.0
    journal_bytes: int = 0
    journal_seconds: float = 0.0
    copy_seconds: float = 0.0
    verified: bool = False
    view_open_seconds: float = 0.0  # through srctl
    view_open_master_target: float = 0.0  # the master target's own
    view_read_seconds: float = 0.0
    view_verified: bool = False

    @property
    def ratio(self) -> float:
        return self.materialize_seconds / self.journal_seconds

    @property
    def view_ratio(self) -> float:
        return self.view_open_seconds / self.journal_seconds


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.point_in_time", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("4G"), help="protected disk size (default 4G)")
    p.add_argument("--minutes", type=float, default=2, help="minutes of writes after the point (default 2)")
    p.add_argument("--rate", type=parse_size, default=None,
                   help="fio write rate in bytes/s (e.g. 20M); default: half the measured full-sync throughput")
    p.add_argument("--latest-size", type=parse_size, default=parse_size("1G"),
                   help="disk size of the second site, where only latest is timed (default 1G; 0: none)")
    p.add_argument("--latest-seconds", type=float, default=30,
                   help="write load on the second site while latest is timed (default 30)")
    add_site_options(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print("\n".join(machine.facts(args.workdir or Path(tempfile.gettempdir()))))
    with bench_site(args.workdir, "sr-bench-pit-", keep=args.keep) as site:
        older, latest_main = older_point(site, args)
    latests = [latest_main]
    if args.latest_size:
        with bench_site(args.workdir, "sr-bench-pit-latest-", keep=args.keep) as site:
            latests.insert(0, latest_only(site, args, older.rate))
    for latest in latests:
        print(latest.line())
    ok = older.verified and older.view_verified and all(latest.verified for latest in latests)
    print(f"at the end: {machine.load()}")
    ratio = older.ratio
    print(
        f"point in time {args.size / MiB:.0f} MiB disk, {args.minutes:g} min of writes at "
        f"{older.written.bytes_per_second / 1e6:.1f} MB/s: point from {args.minutes:g} min ago "
        f"{older.materialize_seconds:.1f} s (copying the target alone {older.copy_seconds:.1f} s) vs journal read "
        f"{older.journal_seconds:.2f} s for {older.journal_bytes / MiB:.0f} MiB "
        f"({ratio:.1f}x, target <= {RATIO_TARGET}x{'' if ratio <= RATIO_TARGET else ', MISSED'}); "
        "latest " + " / ".join(f"{lt.worst:.2f} s at {lt.size / MiB:.0f} MiB" for lt in latests)
        + f" (worst of idle and under load, target <= {LATEST_TARGET:.0f} s"
        + ("" if all(lt.worst <= LATEST_TARGET for lt in latests) else ", MISSED")
        + f"); SHA-256 {'verified' if ok else 'MISMATCH'}"
    )
    view_ratio = older.view_ratio
    print(
        f"view open / journal read: {view_ratio:.2f}x (target <= {RATIO_TARGET}x"
        f"{'' if view_ratio <= RATIO_TARGET else ', MISSED'}): point from {args.minutes:g} min ago opened as a view "
        f"in {older.view_open_seconds:.2f} s through srctl ({older.view_open_master_target:.2f} s in the master "
        f"target) vs journal read {older.journal_seconds:.2f} s for {older.journal_bytes / MiB:.0f} MiB; "
        f"read whole through nbdcopy {older.view_read_seconds:.1f} s; SHA-256 "
        f"{'verified' if older.view_verified else 'MISMATCH'}"
    )
    return 0 if ok else 1


def synced(site: BenchSite, size: int, heartbeat: float) -> float:
    """Start the site and run the full sync; its throughput in bytes/s."""
    site.start_random(size, heartbeat=heartbeat)
    seconds = site.timed_full_sync(timeout=max(600.0, size / MiB))
    print(f"full sync of {size / MiB:.0f} MiB random data: {seconds:.1f} s, {size / seconds / 1e6:.1f} MB/s")
    return size / seconds


def write_load(site: BenchSite, size: int, seconds: float, rate: int, iodepth: int) -> tuple[fio.FioResult, list[float]]:
    """fio through NBD for `seconds`; meanwhile "latest" materialised every LATEST_EVERY s (timed)."""
    args = ["fio", "--output-format=json", *fio.through_nbd(site.nbd_uri()),
            *fio.job(size=size, seconds=seconds, rate=rate, iodepth=iodepth)]
    timings = []
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=LATEST_EVERY)
                break
            except subprocess.TimeoutExpired:
                timings.append(site.materialize_timed("latest")[1])
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.strip()}")
    return fio.parse("nbd", out), timings


def timed_latest(site: BenchSite, latest: Latest) -> Latest:
    """"latest" on the idle, caught-up pair, and its disk against the source."""
    site.wait_caught_up_view(timeout=600)
    result, latest.idle = site.materialize_timed("latest")
    latest.verified = not result.get("copied", False) and sha256(Path(result["path"])) == sha256(site.disk)
    return latest


def older_point(site: BenchSite, args: argparse.Namespace) -> tuple[Older, Latest]:
    """Sync, take the point, write for --minutes (timing latest meanwhile), then measure the point."""
    throughput = synced(site, args.size, args.heartbeat)
    rate = args.rate or int(throughput / 2)
    print(f"fio rate {rate / 1e6:.1f} MB/s" + (" (given)" if args.rate else " (half the full sync's)"))
    tag = site.create_point()
    at_point = sha256(site.disk)  # nothing writes: this is the source at the point
    written, under_load = write_load(site, args.size, args.minutes * 60, rate, args.iodepth)
    print(written.line())
    latest = timed_latest(site, Latest(args.size, under_load))
    return measure_older(site, Older(rate, written), tag, at_point), latest


def measure_older(site: BenchSite, older: Older, tag: str, at_point: str) -> Older:
    """Materialise `tag` cold and check it; read the journal cold; copy the target alone, cold."""
    target = Path(site.view().target_path)
    journal = sorted(site.journal_dir().glob("*.seg"))
    out = target.with_name(f"bench-point-{tag}.img")
    how = cache.make_cold([target, *journal])
    print(f"cold caches: {how}; still cached: target {cache.resident_bytes([target]) / MiB:.0f} MiB, "
          f"journal {cache.resident_bytes(journal) / MiB:.0f} MiB")
    result, older.materialize_seconds = site.materialize_timed(tag, out)
    older.verified = sha256(out) == at_point
    print(f"materialised point {tag} (seq {result.get('seq')}): {older.materialize_seconds:.1f} s through srctl, "
          f"{master_target_seconds(site):.1f} s in the master target; "
          f"{int(result.get('bytes_undone', 0)) / MiB:.0f} MiB rolled back; equals the source at the point "
          f"(SHA-256): {'yes' if older.verified else 'NO'}")
    out.unlink()
    measure_view(site, older, tag, at_point, [target, *journal])

    cache.make_cold(journal)
    older.journal_bytes, older.journal_seconds = cache.timed_read(journal)
    print(f"plain sequential read of the undo journal: {len(journal)} files, {older.journal_bytes / MiB:.0f} MiB "
          f"in {older.journal_seconds:.2f} s ({older.journal_bytes / older.journal_seconds / 1e6:.0f} MB/s)")
    copied, older.copy_seconds = copy_alone(target, out)
    print(f"for where the time goes: the target ({copied / MiB:.0f} MiB of data) copied alone as materialising "
          f"starts (copy_file_range over its extents, fsync), cold: {older.copy_seconds:.1f} s")
    return older


def measure_view(site: BenchSite, older: Older, tag: str, at_point: str, cold: list[Path]) -> None:
    """Open `tag` as a view, cold (timed); read it whole through nbdcopy (timed, checked); close it."""
    cache.make_cold(cold)
    answer, older.view_open_seconds = site.srctl_timed("recovery-points", "open-view", site.machine, "--point", tag)
    view = answer["view"]
    older.view_open_master_target = float(view.get("open_seconds", 0.0))
    print(f"opened point {tag} as a view: {older.view_open_seconds:.2f} s through srctl, "
          f"{older.view_open_master_target:.2f} s in the master target; "
          f"{int(view.get('journal_bytes_read', 0)) / MiB:.0f} MiB of journal indexed, "
          f"{int(view.get('journal_records', 0))} records")
    digest, older.view_read_seconds = nbd_digest(view["nbd_uri"])
    older.view_verified = digest == at_point
    print(f"the view read whole through nbdcopy: {older.view_read_seconds:.1f} s; equals the source at the point "
          f"(SHA-256): {'yes' if older.view_verified else 'NO'}")
    site.srctl_timed("recovery-points", "close-view", site.machine, "--view", view["view_id"])


def nbd_digest(uri: str) -> tuple[str, float]:
    """SHA-256 of an NBD export read start to end by nbdcopy (to a pipe); (hex digest, seconds)."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(4 * MiB):
            digest.update(block)
        err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0:
        raise RuntimeError(f"nbdcopy {uri} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return digest.hexdigest(), time.monotonic() - started


def copy_alone(target: Path, out: Path) -> tuple[int, float]:
    """The first phase of materialising an older point, by itself: a sparse copy of the cold target."""
    cache.make_cold([target])
    size = target.stat().st_size
    started = time.monotonic()
    with open(target, "rb") as src, open(out, "xb") as dst:
        copied = blockio.copy_sparse(src.fileno(), dst.fileno(), size)
        os.fsync(dst.fileno())
    seconds = time.monotonic() - started
    out.unlink()
    return copied, seconds


def master_target_seconds(site: BenchSite) -> float:
    """The master target's own time for the last materialisation (its log line)."""
    found = 0.0
    for line in (site.root / "logs" / "master-target.log").read_text(errors="replace").splitlines():
        if "point materialised" in line and line.startswith("{"):
            found = float(json.loads(line).get("seconds", 0.0))
    return found


def latest_only(site: BenchSite, args: argparse.Namespace, rate: int) -> Latest:
    synced(site, args.latest_size, args.heartbeat)
    written, under_load = write_load(site, args.latest_size, args.latest_seconds, rate, args.iodepth)
    print(f"{args.latest_size / MiB:.0f} MiB site: " + written.line())
    return timed_latest(site, Latest(args.latest_size, under_load))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
