"""The backup schedule: each run writes a sealed backup and keeps the newest few;
settings refuse a schedule without a passphrase file."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.common import errors
from siterecovery.controller import backup
from siterecovery.controller.settings import ConfigServerSettings
from siterecovery.controller.store import open_store

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def test_each_run_writes_a_backup_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    state = tmp_path / "cs"
    (state / "pki").mkdir(parents=True)
    (state / "pki" / "ca.key").write_bytes(b"key")
    secret = tmp_path / "pass"
    secret.write_text("twelve chars or more\n")
    os.chmod(secret, 0o600)
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    try:
        schedule = backup.BackupSchedule(
            store, state, directory=tmp_path / "backups", passphrase_file=secret, interval=3600, keep=2,
            stop=threading.Event(),
        )
        written = [schedule.run_once(T0 + timedelta(hours=h)) for h in range(3)]
    finally:
        store.close()
    kept = sorted(p.name for p in (tmp_path / "backups").iterdir())
    assert kept == [w.name for w in written[1:]]
    manifest, _tables, files = backup.read(written[-1].read_bytes(), "twelve chars or more")
    assert files["pki/ca.key"] == b"key" and manifest["created_at"].startswith("2026-11-29T05:00")


def test_a_passphrase_file_others_can_read_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("twelve chars or more\n")
    os.chmod(secret, 0o644)
    with pytest.raises(errors.InvalidInput) as caught:
        backup.read_passphrase(secret)
    assert caught.value.code == "passphrase-file-mode" and "chmod 600" in caught.value.hint


def test_a_schedule_needs_its_passphrase_file(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        ConfigServerSettings(state_dir=tmp_path, backup_dir=tmp_path / "b")
    assert caught.value.code == "config-backup"
