"""Where srctl looks for the lab."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from siterecovery.controller.cli import lab, output
from siterecovery.controller.cli.client import Profile, candidate_profiles, lab_dir, lab_profile
from siterecovery.controller.protection.environment import LocalSites


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of its own, with none of srctl's variables set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("SRCTL_CONFIG", "SRCTL_LAB_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def _write_profile(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        (path.parent / name).write_text(name)
    path.write_text('server = "127.0.0.1:1"\nca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n')
    return path


def test_the_profile_lookup_finds_the_lab_in_srctl_lab_dir(home: Path, tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "labs" / "mine"
    monkeypatch.setenv("SRCTL_LAB_DIR", str(elsewhere))
    profile = _write_profile(elsewhere / "config-server" / "admin" / "srctl.toml")
    _write_profile(lab_profile(home / ".local" / "state" / "siterecovery" / "lab"))  # a lab in the default place too

    assert lab_dir() == elsewhere.resolve() == lab.lab_dir_of(None)
    assert candidate_profiles(None)[0] == profile.resolve()
    assert Profile.find().path == profile.resolve()


def test_dir_beats_srctl_lab_dir_and_srctl_config_beats_the_lab(home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SRCTL_LAB_DIR", str(tmp_path / "env-lab"))
    assert lab.lab_dir_of(tmp_path / "flag-lab") == (tmp_path / "flag-lab").resolve()
    _write_profile(lab_profile(tmp_path / "env-lab"))
    chosen = _write_profile(tmp_path / "profile" / "srctl.toml")
    monkeypatch.setenv("SRCTL_CONFIG", str(chosen))
    assert Profile.find().path == chosen


def test_without_srctl_lab_dir_the_default_lab_is_looked_at(home: Path) -> None:
    assert candidate_profiles(None)[0] == lab_profile(home / ".local" / "state" / "siterecovery" / "lab").resolve()


@pytest.mark.parametrize("in_env", [True, False])
def test_lab_up_says_to_export_srctl_config_only_when_the_lookup_would_miss_the_lab(
    home: Path, tmp_path: Path, monkeypatch, capsys, in_env: bool
) -> None:
    where = (tmp_path / "labs" / "mine").resolve()
    if in_env:
        monkeypatch.setenv("SRCTL_LAB_DIR", str(where))
    profile = Profile.load(_write_profile(lab_profile(where)))
    monkeypatch.setattr(output, "console", Console(width=1000))  # no line of the summary wrapped
    lab.Summary(where, [], [], profile, LocalSites(where / "sites"), None).print()
    printed = capsys.readouterr().out
    assert f"srctl profile: {profile.path}" in printed
    assert ("export SRCTL_CONFIG" in printed) is not in_env
