"""Continuous replication (issue 7, item 3): RPO and backlog under a steady write load.

    .venv/bin/python -m bench.continuous [--size 1G] [--seconds 300] [--rate 40M] [--heartbeat 0.3]
                                         [--journal-limit 8G] [--spool-limit 400G]

One replicating site of the integration harness (real daemons, mutual TLS,
127.0.0.1 port 0) protects a disk of random data. The full sync is timed
(throughput = disk size / time from `enable` until the target holds it all);
the write rate is half of it unless `--rate` gives one. fio's nbd engine then
writes random 16 KiB blocks of fresh random data through the source agent's NBD
export at that rate for `--seconds`, while the pair's RPO and backlog (source +
spool) as the configuration server reports them, and every daemon's RSS, are
sampled once a second over one Admin channel; each daemon's CPU time over the
load is noted too. After the load the time to drain is measured and the target
is compared with the source by SHA-256. The same fio job then runs straight at
a plain file of the same size (psync engine, page cache) and once more with
`--fdatasync=1` (the NBD path makes each write durable in the source's journal
before it answers), `--file-seconds` each.

The RPO is what the configuration server computes from the agents' heartbeats:
now minus the oldest write not yet applied as last reported, so it includes up
to one heartbeat interval of report age (`--heartbeat`: every daemon's, 0.3 s
by default as in the tests; production's is 10 s).

`--journal-limit` sets the source agent's `journal_limit_bytes` (default: the
agent's, 8 GiB), `--spool-limit` the process server's `spool_limit_bytes`. A
load above what the pipeline carries piles up in the spool first (the master
target is the slower hop); once the spool is full, in the source's journal; once
that is at its limit the pair tracks changed blocks (reason `journal-full`) and
catches up after the load: the report says in how many samples it tracked and
the largest backlogs.

Two lines say where the limit is: the whole machine's CPU split during the load
(idle near 0 means every daemon waits for a core), and what the pipeline behind
the source carried, during the load (fio's bytes less the backlog's growth) and
alone after it (the backlog left at the end over the drain time, while neither
fio nor the source's capture competes for the cores).

Targets: RPO p99 <= 5 s; the backlog not growing (its mean over the last minute
at most one second of writes above the first minute's; over a third of the run
each when it is shorter than 3 minutes); RSS <= 200 MiB per daemon. The last
line holds the numbers; fio's achieved rate shows there when it fell short.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

from bench.common import write_image
from bench.rpo import fio, machine
from bench.rpo.sampler import Sampler, Samples, cpu_seconds
from bench.rpo.site import BenchSite, add_site_options, bench_site
from bench.rpo.stats import MiB, mean, parse_size, percentile, slope_per_minute
from tests.integration.replication_site import sha256

RPO_TARGET = 5.0
RSS_TARGET = 200 * MiB


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.continuous", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="protected disk size (default 1G)")
    p.add_argument("--seconds", type=float, default=300, help="length of the write load (default 300)")
    p.add_argument("--rate", type=parse_size, default=None,
                   help="fio write rate in bytes/s (e.g. 40M); default: half the measured full-sync throughput")
    p.add_argument("--file-seconds", type=float, default=60,
                   help="length of each plain-file fio run (default 60)")
    p.add_argument("--journal-limit", type=parse_size, default=None,
                   help="the source agent's journal_limit_bytes (default: the agent's own)")
    p.add_argument("--spool-limit", type=parse_size, default=None,
                   help="the process server's spool_limit_bytes (default: its own)")
    add_site_options(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print("\n".join(machine.facts(args.workdir or Path(tempfile.gettempdir()))))
    with bench_site(args.workdir, "sr-bench-continuous-", keep=args.keep) as site:
        limit = {"journal_limit_bytes": args.journal_limit} if args.journal_limit else {}
        spool = {"spool_limit_bytes": args.spool_limit} if args.spool_limit else {}
        site.start_random(args.size, heartbeat=args.heartbeat, source_extra=limit, ps_extra=spool)
        with Sampler(site.view, site.daemon_pids()) as sampler:
            sync_start = sampler.now()
            sync_seconds = site.timed_full_sync(timeout=max(600.0, args.size / MiB))
            sync_end = sampler.now()
            throughput = args.size / sync_seconds
            rate = args.rate or int(throughput / 2)
            print(f"full sync of {args.size / MiB:.0f} MiB random data: {sync_seconds:.1f} s, "
                  f"{throughput / 1e6:.1f} MB/s; fio rate {rate / 1e6:.1f} MB/s"
                  + (" (given)" if args.rate else " (half of it)"))

            load_start, cpu_before = sampler.now(), cpu_seconds(site.daemon_pids())
            machine_before = machine.cpu_times()
            nbd = fio.run("nbd", [*fio.through_nbd(site.nbd_uri()),
                                  *fio.job(size=args.size, seconds=args.seconds, rate=rate, iodepth=args.iodepth)],
                          timeout=args.seconds + 300)
            load_end, cpu_after = sampler.now(), cpu_seconds(site.daemon_pids())
            machine_split = machine.cpu_split(machine_before, machine.cpu_times())
            site.wait_caught_up_view(timeout=600)
            drain = sampler.now() - load_end
        verified = sha256(Path(site.view().target_path)) == sha256(site.disk)
        files = plain_file_runs(site, args, rate)
    print("max RSS during the full sync: " + rss_line(sampler.samples.max_rss(sync_start, sync_end)))
    print("max RSS during the write load: " + rss_line(sampler.samples.max_rss(load_start, load_end)))
    print(f"at the end: {machine.load()}")
    print("CPU during the write load: " + ", ".join(
        f"{name} {(cpu_after[name] - cpu_before[name]) / (load_end - load_start):.0%} of a core, "
        f"{(cpu_after[name] - cpu_before[name]) / max(nbd.written / 1e9, 1e-9):.1f} s/GB"
        for name in sorted(cpu_after) if name in cpu_before))
    print(f"machine CPU during the write load: {machine_split}")
    line = carried(sampler.samples, load_start, load_end, drain, nbd.bytes_per_second)
    if line:
        print(line)
    report(rate, args.heartbeat, sampler.samples, load_start, load_end, drain, verified, nbd, files)
    return 0 if verified else 1


def plain_file_runs(site: BenchSite, args: argparse.Namespace, rate: int) -> list[fio.FioResult]:
    """The same job at a plain file of random data, without and with fdatasync after each write."""
    plain = site.root / "plain.img"
    write_image(plain, args.size, seed=99)
    job = fio.job(size=args.size, seconds=args.file_seconds, rate=rate, iodepth=args.iodepth)
    return [
        fio.run("file", [*fio.at_file(plain), *job], timeout=args.file_seconds + 300),
        fio.run("file+fdatasync", [*fio.at_file(plain, "--fdatasync=1"), *job], timeout=args.file_seconds + 300),
    ]


def rss_line(by_name: dict[str, int]) -> str:
    return ", ".join(f"{name} {rss / MiB:.0f} MiB" for name, rss in sorted(by_name.items()))


def report(
    rate: int, heartbeat: float, samples: Samples, start: float, end: float, drain: float,
    verified: bool, nbd: fio.FioResult, files: list[fio.FioResult],
) -> None:
    during = samples.between(start, end)
    known = [s.rpo_seconds for s in during if s.rpo_known]
    window = min(60.0, (end - start) / 3)
    first = mean([s.backlog for s in samples.between(start, start + window)])
    last = mean([s.backlog for s in samples.between(end - window, end)])
    slope = slope_per_minute([(s.at, s.backlog) for s in during])
    growing = last > first + rate  # more than one second of writes piled up
    p99 = percentile(known, 99)
    max_rss = max(samples.max_rss().values())
    achieved = "" if nbd.bytes_per_second >= 0.95 * rate else f"{nbd.bytes_per_second / 1e6:.1f} MB/s of "

    print(f"samples during the load: {len(during)} ({len(during) - len(known)} with RPO unknown, "
          f"{samples.failed_between(start, end)} status calls failed)")
    print(f"RPO p50 {percentile(known, 50):.2f} s, p99 {p99:.2f} s, max {max(known, default=float('nan')):.2f} s")
    print(f"backlog (source + spool) mean first {window:.0f} s {first / MiB:.2f} MiB, last {window:.0f} s "
          f"{last / MiB:.2f} MiB, trend {slope / MiB:+.2f} MiB/min; drained {drain:.1f} s after the load")
    tracked = [s for s in during if s.reason_code == "journal-full"]
    print(f"tracking changed blocks (journal-full) in {len(tracked)} of {len(during)} samples; largest backlog "
          f"{max((s.backlog for s in during), default=0) / MiB:.0f} MiB (source "
          f"{max((s.source_backlog for s in during), default=0) / MiB:.0f} MiB, spool "
          f"{max((s.spool_backlog for s in during), default=0) / MiB:.0f} MiB)")
    print(f"target equals source after the load (SHA-256): {'yes' if verified else 'NO'}")
    for result in (nbd, *files):
        print(result.line())
    file = files[0]
    ratio = nbd.clat_p99_ms / file.clat_p99_ms if file.clat_p99_ms else float("inf")
    print(
        f"continuous {end - start:.0f} s at {achieved}{rate / 1e6:.1f} MB/s: RPO p99 {p99:.1f} s (heartbeat {heartbeat:g} s; target <= {RPO_TARGET:.0f} s"
        f"{'' if p99 <= RPO_TARGET else ', MISSED'}), backlog first/last {_span(window)} {first / MiB:.1f}/{last / MiB:.1f} MiB "
        f"({'growing' if growing else 'not growing'}); fio clat p99 nbd {nbd.clat_p99_ms:.1f} ms vs file "
        f"{file.clat_p99_ms:.2f} ms ({ratio:.1f}x); max RSS {max_rss / MiB:.0f} MiB (target <= "
        f"{RSS_TARGET / MiB:.0f} MiB{'' if max_rss <= RSS_TARGET else ', MISSED'})"
    )


def carried(samples: Samples, start: float, end: float, drain: float, written_per_second: float) -> str:
    """What the pipeline behind the source carried: during the load (fio's bytes less the
    growth of the backlog) and alone after it (the backlog left at the end over the drain
    time, while neither fio nor the source's capture competes for the machine); "" without samples."""
    during = samples.between(start, end)
    if not during:
        return ""
    grown = during[-1].backlog - during[0].backlog
    seconds = during[-1].at - during[0].at or 1.0
    line = (f"the pipeline behind the source carried {(written_per_second * seconds - grown) / seconds / 1e6:.1f} "
            f"MB/s during the load")
    if any(s.reason_code == "journal-full" for s in during):
        line += " (an upper bound: while the pair tracked changed blocks, a block written many times counted once)"
    if drain > 1.0 and during[-1].backlog > 0:
        line += (f", and {during[-1].backlog / drain / 1e6:.1f} MB/s alone after it "
                 f"({during[-1].backlog / MiB:.0f} MiB in {drain:.1f} s)")
    return line


def _span(seconds: float) -> str:
    return "minute" if seconds >= 60 else f"{seconds:.0f} s"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
