"""A source agent drops its old pairs' journals when failback rewrote its disks, and only then."""

from __future__ import annotations

import shlex
from pathlib import Path

from siterecovery.agents.source import generation


def _pairs(root: Path) -> Path:
    pairs = root / "pairs"
    for name in ("pair-a", "pair-b"):
        (pairs / name).mkdir(parents=True)
        (pairs / name / "journal").write_bytes(b"frames")
    return pairs


def _command(path: Path) -> str:
    return f"cat {shlex.quote(str(path))}"


def test_a_new_generation_drops_the_journals_and_is_remembered(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path)
    stamp = tmp_path / "guestinfo"
    stamp.write_text("job-1\n")
    # First start with a stamp: the disks changed since the journals were written.
    assert generation.drop_stale_pairs(tmp_path, pairs, _command(stamp)) == ["pair-a", "pair-b"]
    assert list(pairs.iterdir()) == []
    assert (tmp_path / generation.RECORD).read_text() == "job-1\n"
    # The same stamp at the next start: new pairs' journals are kept.
    (pairs / "pair-c").mkdir()
    assert generation.drop_stale_pairs(tmp_path, pairs, _command(stamp)) == []
    assert [p.name for p in pairs.iterdir()] == ["pair-c"]
    # Another failback: dropped again.
    stamp.write_text("job-2\n")
    assert generation.drop_stale_pairs(tmp_path, pairs, _command(stamp)) == ["pair-c"]


def test_no_command_an_empty_answer_or_a_failing_command_keep_everything(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for command in ("", _command(empty), _command(tmp_path / "missing"), "/nonexistent/vmware-rpctool x"):
        assert generation.drop_stale_pairs(tmp_path, pairs, command) == []
    assert sorted(p.name for p in pairs.iterdir()) == ["pair-a", "pair-b"]
    assert not (tmp_path / generation.RECORD).exists()
