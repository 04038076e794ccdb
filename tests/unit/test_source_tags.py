"""Recovery points on the source: requested, periodic, app-consistent with freeze/thaw hooks
(and their failures), and the multi-VM barrier."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from siterecovery.agents.source.capture import DiskCapture
from siterecovery.agents.source.replicator import ReplicationOptions, SourceReplication
from siterecovery.common.pb import replication_pb2 as rpb

from .source_support import MiB, Site, wait_for

PAIR = "pair-t"
SIZE = 8 * MiB
CRASH = rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT
APP = rpb.RECOVERY_POINT_KIND_APP_CONSISTENT
MULTI = rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Replicating:
    def __init__(self, site: Site, tmp_path: Path, *, hold_barrier=None, **options) -> None:
        image = tmp_path / "disk0.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        self.site = site
        self.disk = DiskCapture("disk0", image)
        self.replication = SourceReplication(
            tmp_path / "source", {"disk0": self.disk}, connect=site.connect,
            options=ReplicationOptions(**options), hold_barrier=hold_barrier,
        )
        self.replication.recover()

    def start(self, **policy: int) -> rpb.PairAssignment:
        assignment = self.site.assignment(PAIR, "disk0", SIZE, **policy)
        self.replication.apply_assignments([assignment], [])
        wait_for(lambda: self.status().state == rpb.PAIR_STATE_REPLICATING, what="the initial sync")
        return assignment

    def status(self) -> rpb.PairStatus:
        return self.replication.pair_statuses()[0]

    def tags(self) -> list[rpb.Frame]:
        record = self.site.ps.pairs.get(PAIR)
        return [f for f in record.frames if f.WhichOneof("body") == "tag"] if record else []

    def wait_tags(self, count: int) -> list[rpb.Frame]:
        wait_for(lambda: len(self.tags()) >= count, what=f"{count} tags at the process server")
        return self.tags()

    def close(self) -> None:
        self.replication.close()
        self.disk.close()


@pytest.fixture
def make(site, tmp_path):
    made: list[Replicating] = []

    def factory(**kwargs) -> Replicating:
        made.append(Replicating(site, tmp_path, **kwargs))
        return made[-1]

    yield factory
    for replicating in made:
        replicating.close()


def request(tag_id: str, kind: int, **extra) -> rpb.TagRequest:
    return rpb.TagRequest(pair_id=PAIR, tag_id=tag_id, kind=kind, **extra)


def test_a_requested_tag_is_inserted_once_between_the_writes_around_it(make):
    src = make()
    assignment = src.start()
    src.disk.write(0, b"before" * 100, fua=False)
    before = src.disk.journal.lease.last_taken
    src.replication.apply_assignments([assignment], [request("od-1", CRASH)])
    (tag,) = src.wait_tags(1)
    src.disk.write(4096, b"after" * 100, fua=False)
    # The controller repeats the request until the target has the point: it is still inserted once.
    src.replication.apply_assignments([assignment], [request("od-1", CRASH)])
    wait_for(lambda: src.site.ps.record(PAIR).durable >= src.disk.journal.lease.last_taken, what="the last write")
    assert [t.tag.tag_id for t in src.tags()] == ["od-1"]
    assert tag.tag.on_demand and tag.tag.kind == CRASH
    assert tag.seq > before
    writes = [f.seq for f in src.site.ps.record(PAIR).frames if f.WhichOneof("body") == "write" and f.seq > before]
    assert writes and min(writes) > tag.seq


def test_app_consistent_point_runs_freeze_then_thaw(make, tmp_path):
    trace = tmp_path / "trace"
    freeze = script(tmp_path / "freeze", f'echo "freeze $SR_HOOK $SR_TAG_ID $SR_DISK" >> {trace}')
    thaw = script(tmp_path / "thaw", f'echo "thaw $SR_HOOK $SR_TAG_ID" >> {trace}')
    src = make(freeze_script=freeze, thaw_script=thaw)
    assignment = src.start()
    src.replication.apply_assignments([assignment], [request("app-1", APP)])
    (tag,) = src.wait_tags(1)
    assert (tag.tag.tag_id, tag.tag.kind, tag.tag.note) == ("app-1", APP, "")
    wait_for(lambda: trace.exists() and len(trace.read_text().splitlines()) == 2, what="thaw")
    assert trace.read_text().splitlines() == ["freeze freeze app-1 disk0", "thaw thaw app-1"]


def test_a_failing_freeze_degrades_the_point_and_thaw_still_runs(make, tmp_path):
    trace = tmp_path / "trace"
    freeze = script(tmp_path / "freeze", "echo cannot freeze; exit 3")
    thaw = script(tmp_path / "thaw", f"echo thawed >> {trace}")
    src = make(freeze_script=freeze, thaw_script=thaw)
    assignment = src.start()
    src.replication.apply_assignments([assignment], [request("app-2", APP)])
    (tag,) = src.wait_tags(1)
    assert tag.tag.kind == CRASH and tag.tag.tag_id == "app-2" and tag.tag.on_demand
    assert tag.tag.note == "freeze script failed (exit 3): degraded to crash-consistent"
    wait_for(lambda: trace.exists(), what="thaw")


def test_a_freeze_that_hangs_is_killed_and_the_point_degraded(make, tmp_path):
    freeze = script(tmp_path / "freeze", "sleep 60")
    src = make(freeze_script=freeze, hook_timeout_seconds=0.5)
    assignment = src.start()
    src.replication.apply_assignments([assignment], [request("app-3", APP)])
    (tag,) = src.wait_tags(1)
    assert tag.tag.kind == CRASH
    assert tag.tag.note == "freeze script failed (timed out): degraded to crash-consistent"


def test_without_a_freeze_script_an_app_request_is_taken_crash_consistent(make):
    src = make()
    assignment = src.start()
    src.replication.apply_assignments([assignment], [request("app-4", APP)])
    (tag,) = src.wait_tags(1)
    assert tag.tag.kind == CRASH and "no freeze script" in tag.tag.note


def test_periodic_crash_and_app_consistent_points(make, tmp_path):
    freeze = script(tmp_path / "freeze", "exit 0")
    src = make(freeze_script=freeze)
    src.start(crash=1, app=1)
    tags = src.wait_tags(4)
    kinds = {t.tag.kind for t in tags}
    assert kinds == {CRASH, APP}
    assert not any(t.tag.on_demand for t in tags)
    assert len({t.tag.tag_id for t in tags}) == len(tags)


def test_multi_vm_barrier_holds_writes_until_commit(make):
    calls: list[int] = []
    answers = [rpb.BARRIER_OUTCOME_WAIT, rpb.BARRIER_OUTCOME_WAIT, rpb.BARRIER_OUTCOME_COMMIT]
    attempts = threading.Event()

    def hold_barrier(tag_id: str) -> tuple[int, str]:
        assert tag_id == "mv-1"
        if len(calls) == 1:
            wait_for(attempts.is_set, what="a write to try while the barrier holds")
        calls.append(src.disk.journal.lease.last_taken)
        return answers[len(calls) - 1], ""

    src = make(hold_barrier=hold_barrier)
    assignment = src.start()
    stop = threading.Event()

    def writer() -> None:
        offset = 0
        while not stop.is_set():
            attempts.set()
            src.disk.write(offset % SIZE, b"w" * 4096, fua=False)
            offset += 4096

    cut = Timestamp()
    cut.GetCurrentTime()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        src.replication.apply_assignments([assignment], [request("mv-1", MULTI, group_id="g1", cut_at=cut)])
        (tag,) = src.wait_tags(1)
    finally:
        stop.set()
        thread.join()
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2], "a write got a seq while the barrier held"
    assert (tag.tag.kind, tag.tag.group_id, tag.seq) == (MULTI, "g1", calls[0] + 1)


def test_an_aborted_barrier_takes_no_point_and_lets_writes_go(make):
    src = make(hold_barrier=lambda _tag: (rpb.BARRIER_OUTCOME_ABORT, "too late"))
    assignment = src.start()
    cut = Timestamp()
    cut.GetCurrentTime()
    src.replication.apply_assignments([assignment], [request("mv-2", MULTI, group_id="g1", cut_at=cut)])
    src.replication.apply_assignments([assignment], [request("od-after", CRASH)])
    tags = src.wait_tags(1)
    assert [t.tag.tag_id for t in tags] == ["od-after"]
    src.disk.write(0, b"free" * 1024, fua=False)  # not held
