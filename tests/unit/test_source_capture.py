"""Write capture: writes through the NBD export are journaled in order, durably, before the reply;
a kill -9 at any moment loses no acknowledged write; seqs are never reused."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from siterecovery.agents.source import capture
from siterecovery.agents.source.capture import (
    FRAME_DATA_BYTES,
    DiskCapture,
    PairJournal,
    SeqLease,
    apply_frame,
)
from siterecovery.common import frames, nbd
from siterecovery.common.nbd import NbdServer
from siterecovery.common.pb import replication_pb2 as rpb
from tests.conftest import needs_tools
from tests.nbd_raw import Raw

MiB = 1024 * 1024
SIZE = 32 * MiB
PAIR = "pair-capture"
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))

needs_clients = needs_tools("qemu-io", "fio")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def journal_frames(journal: PairJournal) -> list[rpb.Frame]:
    first = journal.log.first_pending_seq
    return [] if first is None else list(journal.log.read_from(first))


def replay_onto_zero_image(tmp_path: Path, frame_list: list[rpb.Frame], size: int = SIZE) -> str:
    image = new_image(tmp_path / "replayed.img", size)
    fd = os.open(image, os.O_RDWR)
    try:
        for frame in frame_list:
            frames.verify(PAIR, frame)
            apply_frame(fd, frame)
    finally:
        os.close(fd)
    return sha(image)


@pytest.fixture
def captured(tmp_path):
    image = new_image(tmp_path / "disk0.img")
    disk = DiskCapture("disk0", image)
    journal = PairJournal(tmp_path / "pair", PAIR)
    disk.attach(journal)
    server = NbdServer("127.0.0.1", 0)
    server.add_export("disk0", disk)
    server.start()
    try:
        yield server, disk, journal, image
    finally:
        server.stop()
        disk.detach()
        journal.close()
        disk.close()


@needs_clients
def test_writes_through_the_export_are_journaled_in_order_and_replay_to_the_disk(captured, tmp_path):
    server, disk, journal, image = captured
    uri = server.uri("disk0")
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -z 2M 512k", "-c", "discard 8M 1M",
         "-c", "write -P 0x33 8M 4k", "-c", "flush", uri],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=16k", "--size=8M",
         "--iodepth=8", "--randseed=9", "--refill_buffers"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    journaled = journal_frames(journal)
    seqs = [f.seq for f in journaled]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = [f.WhichOneof("body") for f in journaled]
    assert kinds[:4] == ["write", "zero", "zero", "write"]
    assert kinds.count("write") == 2 + 8 * MiB // (16 * 1024)
    assert journaled[2].zero.offset == 8 * MiB and journaled[2].zero.length == MiB
    assert replay_onto_zero_image(tmp_path, journaled) == sha(image)
    # Group commit: fio kept 8 writes in flight, so several shared one fsync.
    assert disk.committed_frames == len(journaled) and disk.commits <= disk.committed_frames


def test_a_large_write_is_split_into_frames_and_trim_reads_as_zeros(captured, tmp_path):
    _server, disk, journal, image = captured
    data = random.Random(4).randbytes(9 * MiB + 5)
    disk.write(MiB, data, fua=True)
    disk.trim(2 * MiB, MiB, fua=False)
    disk.write_zeroes(4 * MiB, 4096, fua=False, punch=False)
    journaled = journal_frames(journal)
    sizes = [f.write.length for f in journaled if f.WhichOneof("body") == "write"]
    assert sizes == [FRAME_DATA_BYTES, FRAME_DATA_BYTES, MiB + 5]
    assert disk.read(2 * MiB, MiB) == bytes(MiB)
    assert disk.read(4 * MiB, 4096) == bytes(4096)
    assert replay_onto_zero_image(tmp_path, journaled) == sha(image)


def test_replay_at_attach_puts_journaled_writes_on_the_disk(tmp_path):
    """A crash after the journal fsync and before the pwrite: the next attach applies it."""
    image = new_image(tmp_path / "disk0.img")
    journal = PairJournal(tmp_path / "pair", PAIR)
    seq = journal.lease.take(2)
    journal.log.append([
        frames.write_frame(PAIR, seq, 4096, b"journaled but not written"),
        frames.zero_frame(PAIR, seq + 1, 8192, 4096),
    ])
    with open(image, "r+b") as f:
        f.seek(8192)
        f.write(b"\xff" * 4096)
    journal.close()
    disk = DiskCapture("disk0", image)
    journal = PairJournal(tmp_path / "pair", PAIR)
    disk.attach(journal)
    assert disk.read(4096, 25) == b"journaled but not written"
    assert disk.read(8192, 4096) == bytes(4096)
    assert journal.applied_seq == seq + 1
    # Released frames are never replayed; release fsyncs the disk first and stops at what it holds.
    journal.release_through(seq + 1)
    assert journal.log.first_pending_seq is None
    disk.detach()
    journal.close()
    disk.close()


def test_quiesced_holds_new_writes_until_it_ends(captured):
    _server, disk, journal, _image = captured
    done = threading.Event()
    with disk.quiesced():
        before = journal.lease.last_taken
        writer = threading.Thread(target=lambda: (disk.write(0, b"x" * 4096, fua=False), done.set()))
        writer.start()
        assert not done.wait(0.3), "a write went through while the disk was quiesced"
        assert journal.lease.last_taken == before
    assert done.wait(10)
    writer.join()
    assert journal.lease.last_taken == before + 1


def test_seq_lease_never_hands_out_a_seq_twice_across_restarts(tmp_path):
    path = tmp_path / "seq.json"
    lease = SeqLease(path, span=10)
    assert [lease.take() for _ in range(3)] == [1, 2, 3]
    # A crash: nothing more is written. The next process starts above the lease.
    again = SeqLease(path, span=10)
    assert again.take() == 12  # the first take leased 1..11
    assert again.take(12) == 13  # 13..24 crosses the lease (..21): it is moved to 34 first
    third = SeqLease(path, span=10)
    assert third.take() == 35
    third.skip_past(1000)
    assert third.take() == 1001
    assert SeqLease(path, span=10).take() > 1001


def start_child(image: Path, pair_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.source_capture_child", str(image), str(pair_dir), PAIR, *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    return child, int(child.stdout.readline().split()[1])


def reopen_and_check_replay(tmp_path: Path, image: Path, pair_dir: Path) -> tuple[DiskCapture, PairJournal]:
    """Restart: the journal replays onto the disk, and replaying it onto zeros gives the disk."""
    disk = DiskCapture("disk0", image)
    journal = PairJournal(pair_dir, PAIR)
    disk.attach(journal)
    journaled = journal_frames(journal)
    assert replay_onto_zero_image(tmp_path, journaled) == sha(image)
    assert journal.lease.take() > (journaled[-1].seq if journaled else 0)
    return disk, journal


@needs_clients
@pytest.mark.parametrize("round_", range(3))
def test_kill9_while_qemu_io_writes_loses_no_acknowledged_write(tmp_path, round_):
    rng = random.Random(f"{SEED}-capture-{round_}")
    image = new_image(tmp_path / "disk0.img")
    pair_dir = tmp_path / "pair"
    writes = []
    commands = []
    for _ in range(120):
        offset, length, pattern = rng.randrange(0, SIZE - 65536, 512), rng.choice((512, 4096, 65536)), rng.randrange(1, 255)
        writes.append((offset, length, pattern))
        commands += ["-c", f"write -P {pattern} {offset} {length}"]
    kill_after = rng.randrange(5, 100)
    # Round 0: the process dies in the middle of a commit (journaled, not yet on the disk file).
    child, port = start_child(image, pair_dir, *([str(kill_after + 1)] if round_ == 0 else []))
    writer = None
    try:
        writer = subprocess.Popen(
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", *commands, f"nbd://127.0.0.1:{port}/disk0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        acknowledged = 0
        for line in writer.stdout:
            if re.match(r"wrote \d+/\d+ bytes", line):
                acknowledged += 1
                if acknowledged == kill_after and round_ != 0:
                    os.kill(child.pid, signal.SIGKILL)
                    break
        child.wait(timeout=30)
        for line in writer.stdout:  # what it printed before it noticed
            if re.match(r"wrote \d+/\d+ bytes", line):
                acknowledged += 1
        writer.wait(timeout=60)
    finally:
        for process in (child, writer):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert acknowledged >= kill_after
    assert acknowledged < len(writes), "qemu-io finished before the kill: nothing was tested"
    print(f"[capture] kill -9 after {kill_after} acknowledged writes ({acknowledged} seen, seed {SEED})")
    # Restart: opening the journal replays what may be missing from the file.
    disk, journal = reopen_and_check_replay(tmp_path, image, pair_dir)
    try:
        done = writes[:acknowledged]
        if round_ == 0:  # the write in the interrupted commit was journaled: it is on the disk now
            done = writes[:acknowledged + 1]
        for index, (offset, length, pattern) in enumerate(done):
            got = disk.read(offset, length)
            for i in range(0, length, 512):
                if not any(o <= offset + i < o + n for o, n, _p in done[index + 1:]):
                    assert got[i:i + 512] == bytes([pattern]) * 512, f"acknowledged write {index} was lost"
        # qemu-io has one write in flight: the kill may land after its journal fsync
        # and before its reply, so it may be journaled (and replayed) unacknowledged.
        journaled = [(f.write.offset, f.write.length) for f in journal_frames(journal)]
        assert journaled[: len(done)] == [(o, n) for o, n, _p in done]
        assert journaled[len(done):] in ([], [writes[len(done)][:2]]), journaled[len(done):]
    finally:
        disk.detach()
        journal.close()
        disk.close()


@needs_clients
def test_kill9_while_fio_writes_leaves_journal_and_disk_agreeing(tmp_path):
    rng = random.Random(f"{SEED}-capture-fio")
    image = new_image(tmp_path / "disk0.img")
    pair_dir = tmp_path / "pair"
    child, port = start_child(image, pair_dir)
    writer = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/disk0", "--rw=randwrite", "--bs=4k",
         "--size=16M", "--iodepth=16", f"--randseed={rng.randrange(1 << 30)}", "--refill_buffers",
         "--status-interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    kill_at = rng.randrange(100, 2000)  # frames of 4 KiB
    try:
        def journal_bytes() -> int:  # read the sizes only: opening the live log would repair its tail
            return sum(p.stat().st_size for p in (pair_dir / "journal").glob("*.seg"))

        deadline = time.monotonic() + 60
        while journal_bytes() < kill_at * 4096 and writer.poll() is None:
            assert time.monotonic() < deadline, "fio wrote too little"
            time.sleep(0.005)  # polling the file size, not synchronising
        assert writer.poll() is None, "fio finished before the kill: nothing was tested"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        writer.wait(timeout=60)
    finally:
        for process in (child, writer):
            if process.poll() is None:
                process.kill()
                process.wait()
    disk, journal = reopen_and_check_replay(tmp_path, image, pair_dir)
    try:
        assert journal.log.last_seq >= kill_at // 2  # the byte count includes record headers
        print(f"[capture] kill -9 after {journal.log.last_seq} journaled fio writes (seed {SEED})")
    finally:
        disk.detach()
        journal.close()
        disk.close()


def _pipelined_writer(port: int, writes: list[tuple[int, bytes]], depth: int) -> None:
    """One NBD connection keeping `depth` writes in flight until all are acknowledged."""
    client = Raw(port)
    client.go()
    try:
        sent = answered = 0
        while answered < len(writes):
            while sent < len(writes) and sent - answered < depth:
                offset, data = writes[sent]
                client.request(nbd.CMD_WRITE, offset, len(data), data, handle=sent)
                sent += 1
            magic, error, _handle = struct.unpack(">IIQ", client.recv(16))
            assert (magic, error) == (nbd.SIMPLE_REPLY_MAGIC, 0)
            answered += 1
    finally:
        client.close()


def test_concurrent_pipelined_writers_on_several_connections_journal_in_the_order_the_disk_saw(captured, tmp_path):
    """Several connections, each with 16 writes in flight, all over the same 256 KiB: the journal
    is in seq order and replaying it onto zeros gives the disk file byte for byte (so the disk file
    saw the overlapping writes in seq order), and every write was journaled exactly once."""
    server, disk, journal, image = captured
    rng = random.Random(f"{SEED}-pipelined")
    per_connection = [
        [(rng.randrange(0, 256 * 1024, 512), rng.randbytes(rng.choice((512, 4096, 16384)))) for _ in range(300)]
        for _ in range(4)
    ]
    failures: list[BaseException] = []

    def run(writes):
        try:
            _pipelined_writer(server.port, writes, depth=16)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(writes,)) for writes in per_connection]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    journaled = journal_frames(journal)
    seqs = [f.seq for f in journaled]
    assert seqs == sorted(set(seqs))
    assert len(journaled) == sum(len(w) for w in per_connection)
    assert sorted((f.write.offset, frames.payload(f)) for f in journaled) == sorted(
        w for writes in per_connection for w in writes
    )
    assert replay_onto_zero_image(tmp_path, journaled) == sha(image)
    assert disk.commits < len(journaled), "no two writes shared a group commit"


@needs_clients
def test_fio_with_several_jobs_and_queue_depth_journals_in_the_order_the_disk_saw(captured, tmp_path):
    """fio's nbd engine, four jobs (a connection each) with iodepth 16 over the same 1 MiB."""
    server, _disk, journal, image = captured
    result = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={server.uri('disk0')}", "--rw=randwrite",
         "--bsrange=4k-64k", "--size=1M", "--io_size=8M", "--iodepth=16", "--numjobs=4", "--randseed=11",
         "--refill_buffers", "--group_reporting"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    journaled = journal_frames(journal)
    seqs = [f.seq for f in journaled]
    assert seqs == sorted(set(seqs))
    assert sum(f.write.length for f in journaled) == 4 * 8 * MiB
    assert replay_onto_zero_image(tmp_path, journaled) == sha(image)


def test_a_write_queued_while_held_waits_for_release_and_gets_its_seq_after(captured):
    """hold() (a multi-VM barrier): a pipelined NBD write is not journaled until release()."""
    server, disk, journal, _image = captured
    client = Raw(server.port)
    client.go()
    try:
        disk.hold()
        try:
            client.request(nbd.CMD_WRITE, 0, 4096, b"h" * 4096, handle=1)
            client.request(nbd.CMD_READ, 0, 4096, handle=2)  # reads are not held
            magic, error, handle = struct.unpack(">IIQ", client.recv(16))
            assert (magic, error, handle) == (nbd.SIMPLE_REPLY_MAGIC, 0, 2)
            assert client.recv(4096) == bytes(4096)
            tag_seq = journal.lease.take()
            journal.append([frames.tag_frame(PAIR, tag_seq, "t1", rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT)])
        finally:
            disk.release()
        assert client.simple_reply() == (0, b"")
    finally:
        client.close()
    journaled = journal_frames(journal)
    assert [f.WhichOneof("body") for f in journaled] == ["tag", "write"]
    assert journaled[1].seq > tag_seq


def test_acknowledged_frames_are_released_in_batches_not_per_ack(captured, monkeypatch):
    _server, disk, journal, _image = captured
    for i in range(4):
        disk.write(i * 4096, b"a" * 4096, fua=False)
    first = journal.log.first_pending_seq
    journal.acknowledge(first)  # the first release is at once
    assert journal.log.released_seq == first
    monkeypatch.setattr(capture, "RELEASE_INTERVAL", 3600.0)
    journal.acknowledge(first + 1)
    journal.release_due()
    assert journal.log.released_seq == first, "released again within RELEASE_INTERVAL"
    journal.release_due(now=True)
    assert journal.log.released_seq == first + 1
    monkeypatch.setattr(capture, "RELEASE_BYTES", 1)  # enough acknowledged bytes wait: release at once
    journal.acknowledge(first + 3)
    assert journal.log.released_seq == first + 3


def test_a_commit_that_fails_fails_its_writes_and_the_committer_goes_on(captured, monkeypatch):
    """The seq lease cannot be persisted (say the disk is full): those writes get an error,
    nothing is journaled for them, and the next write works (the committer did not die)."""
    _server, disk, journal, _image = captured
    take = journal.lease.take
    failures = iter([OSError(errno.ENOSPC, "no space left for seq.json")])

    def take_or_fail(count=1):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return take(count)

    monkeypatch.setattr(journal.lease, "take", take_or_fail)
    with pytest.raises(OSError):
        disk.write(0, b"lost" * 1024, fua=False)
    assert journal_frames(journal) == [] and disk.read(0, 4) == bytes(4)
    disk.write(0, b"kept" * 1024, fua=False)
    assert [frames.payload(f)[:4] for f in journal_frames(journal)] == [b"kept"]
