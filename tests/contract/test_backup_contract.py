"""Backup and restore on both store backends: every row comes back exactly, the
files come back with their modes, and bad input changes nothing."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from siterecovery.common import errors
from siterecovery.controller import backup
from siterecovery.controller.store import MachineRecord, ProtectionGroupRecord, Store, open_store

from .test_store_contract import T0, operator, server

PASSPHRASE = "correct horse battery staple"


def _fill(store: Store) -> None:
    store.add_server(server())
    store.add_server(server("srv-2", role="process-server", hostname="ps-01"))
    store.revoke_server("srv-2", now=T0 + timedelta(minutes=5))
    store.upsert_machine(MachineRecord(id="m-1", server_id="srv-1", hostname="web-01", os="linux"))
    store.add_operator(operator())
    store.create_job(kind="demo", target="vm-1", step_names=["a", "b"], params={"x": [1, 2]}, now=T0)
    # The twin refers to its primary in the same table, and sorts before it: restore puts the primary first.
    store.add_protection_groups(
        ProtectionGroupRecord(id="pg-b", name="PG1", policy={}, created_at=T0),
        ProtectionGroupRecord(id="pg-a", name="PG1_Failback", policy={}, created_at=T0, failback_of="pg-b"),
    )


def _state_dir(root: Path) -> Path:
    state = root / "cs"
    (state / "pki").mkdir(parents=True)
    (state / "admin").mkdir()
    for name, data in {"pki/ca.key": b"ca key", "pki/ca.crt": b"ca cert", "pki/secrets.key": os.urandom(32),
                       "passphrase.json": b"{}", "admin/client.key": b"k", "admin/client.crt": b"c"}.items():
        (state / name).write_bytes(data)
    return state


@pytest.fixture
def restore_url(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty store of the same backend to restore into."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/restored.db"
    server_ = request.getfixturevalue("postgres_server")
    return server_.create_database(f"t_{uuid.uuid4().hex[:16]}")


def test_a_backup_restores_every_row_and_file(store: Store, restore_url: str, tmp_path: Path) -> None:
    _fill(store)
    state = _state_dir(tmp_path)
    sealed = backup.create(store, state, PASSPHRASE)
    assert b"web-01" not in sealed and b"ca key" not in sealed, "a backup is sealed as a whole"

    target = tmp_path / "new-host"
    manifest = backup.restore(sealed, PASSPHRASE, target, store_url=restore_url)
    assert manifest["rows"]["servers"] == 2 and manifest["schema_revision"] == store.schema_revision()
    restored = open_store(restore_url)
    try:
        assert restored.export_tables() == store.export_tables()
        assert restored.revoked_server_ids() == ["srv-2"]
    finally:
        restored.close()
    for name in ("pki/ca.key", "pki/secrets.key", "passphrase.json", "admin/client.key"):
        assert (target / name).read_bytes() == (state / name).read_bytes()
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600


def test_a_wrong_passphrase_or_a_damaged_file_changes_nothing(store: Store, tmp_path: Path) -> None:
    _fill(store)
    sealed = backup.create(store, _state_dir(tmp_path), PASSPHRASE)
    target = tmp_path / "new-host"
    with pytest.raises(errors.Integrity) as wrong:
        backup.restore(sealed, "not the passphrase", target)
    assert wrong.value.code == "backup-unreadable"
    damaged = bytearray(sealed)
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(errors.Integrity):
        backup.restore(bytes(damaged), PASSPHRASE, target)
    with pytest.raises(errors.InvalidInput):
        backup.restore(b"hello", PASSPHRASE, target)
    assert not target.exists()
    with pytest.raises(errors.InvalidInput) as short:
        backup.create(store, _state_dir(tmp_path / "x"), "short")
    assert short.value.code == "backup-passphrase-short"


def test_restore_refuses_a_state_dir_or_store_that_is_in_use(store: Store, store_url: str, tmp_path: Path) -> None:
    _fill(store)
    state = _state_dir(tmp_path)
    sealed = backup.create(store, state, PASSPHRASE)
    with pytest.raises(errors.Conflict) as in_use:
        backup.restore(sealed, PASSPHRASE, state)
    assert in_use.value.code == "state-dir-not-empty"
    with pytest.raises(errors.Conflict) as not_empty:
        backup.restore(sealed, PASSPHRASE, tmp_path / "other", store_url=store_url)
    assert not_empty.value.code == "store-not-empty"
    assert not (tmp_path / "other" / "pki").exists(), "nothing is written when the store refuses"
