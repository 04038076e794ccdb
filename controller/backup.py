"""Backup and restore of the configuration server: its store, CA, keys and passphrase.

A backup is everything a new host needs to *be* this configuration server, so
that agents keep working against it at the same address:

    manifest.json        format, time, schema revision, row counts, source host
    store.json           every row of every table, read in one snapshot
    files/pki/...        the CA, the serving and controller-client certificates and
                         keys, secrets.key (vCenter passwords and Azure secrets are sealed with it)
    files/passphrase.json, files/admin/{ca.crt,client.crt,client.key}

packed as a tar, then sealed as a whole::

    b"SRBACKUP1\\n" | salt (16) | nonce (12) | AES-256-GCM(key, nonce, tar, aad=magic)

with key = scrypt(passphrase, salt, n=2**15, r=8, p=1). A wrong passphrase and
a damaged or altered file look the same to AES-GCM, and are refused the same
way, before anything is written.

Online and consistent: the rows come from one read transaction; the files
change only when an operator rotates the passphrase or the CA, which a backup
taken a moment earlier or later captures whole (each file is read at once).

Restore (`srctl backup restore`) runs on the new host with the configuration
server stopped: it refuses a state directory that already holds a server,
migrates a new store to the backup's schema revision, inserts the rows, migrates
to this version's newest revision, and writes the files (keys 0600). Then
`sr-config-server` starts with the same advertised names and port.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from siterecovery.common import errors, pki
from siterecovery.common.logging import get_logger
from siterecovery.controller.store.schema import UtcDateTime, metadata
from siterecovery.controller.store.sql import SqlStore, head_revision, known_revisions

log = get_logger(__name__)

MAGIC = b"SRBACKUP1\n"
FORMAT = 1
SALT_BYTES = 16
NONCE_BYTES = 12
MIN_PASSPHRASE = 12
# Files of the state directory that make up the server's identity and secrets.
STATE_FILES = ("passphrase.json", "admin/ca.crt", "admin/client.crt", "admin/client.key")
STATE_DIRS = ("pki",)


# -- sealing ---------------------------------------------------------------------------


def check_passphrase(passphrase: str) -> str:
    if len(passphrase) < MIN_PASSPHRASE:
        raise errors.InvalidInput(
            f"a backup passphrase needs at least {MIN_PASSPHRASE} characters",
            hint="keep it apart from the backups; without it they cannot be restored",
            code="backup-passphrase-short",
        )
    return passphrase


def _key(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())


def seal(passphrase: str, plain: bytes) -> bytes:
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    return MAGIC + salt + nonce + AESGCM(_key(check_passphrase(passphrase), salt)).encrypt(nonce, plain, MAGIC)


def unseal(passphrase: str, sealed: bytes) -> bytes:
    if not sealed.startswith(MAGIC):
        raise errors.InvalidInput("this is not a siterecovery backup", code="backup-format")
    salt = sealed[len(MAGIC) : len(MAGIC) + SALT_BYTES]
    nonce = sealed[len(MAGIC) + SALT_BYTES : len(MAGIC) + SALT_BYTES + NONCE_BYTES]
    try:
        return AESGCM(_key(passphrase, salt)).decrypt(nonce, sealed[len(MAGIC) + SALT_BYTES + NONCE_BYTES :], MAGIC)
    except Exception as exc:  # InvalidTag: no message of its own
        raise errors.Integrity(
            "the backup does not open: wrong passphrase, or the file is damaged",
            hint="check the passphrase file; a damaged backup cannot be used, take another from the schedule",
            code="backup-unreadable",
        ) from exc


# -- rows to JSON and back, by column type --------------------------------------------


def _datetime_columns() -> dict[str, set[str]]:
    return {
        t.name: {c.name for c in t.columns if isinstance(c.type, (UtcDateTime, sa.DateTime))}
        for t in metadata.sorted_tables
    }


def _rows_to_json(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    stamps = _datetime_columns()
    out = {}
    for name, rows in tables.items():
        columns = stamps.get(name, set())
        out[name] = [
            {k: (v.isoformat() if k in columns and v is not None else v) for k, v in row.items()} for row in rows
        ]
    return out


def _rows_from_json(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    stamps = _datetime_columns()
    out = {}
    for name, rows in tables.items():
        columns = stamps.get(name, set())
        out[name] = [
            {k: (datetime.fromisoformat(v) if k in columns and v is not None else v) for k, v in row.items()}
            for row in rows
        ]
    return out


# -- create ------------------------------------------------------------------------------


def create(store: SqlStore, state_dir: Path, passphrase: str, *, now: datetime | None = None) -> bytes:
    """A sealed backup of the running server (store snapshot + identity files)."""
    check_passphrase(passphrase)
    revision, tables = store.export_tables()
    files = {}
    for relative in STATE_FILES:
        path = state_dir / relative
        if path.is_file():
            files[relative] = path.read_bytes()
    for directory in STATE_DIRS:
        for path in sorted((state_dir / directory).glob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                files[f"{directory}/{path.name}"] = path.read_bytes()
    manifest = {
        "format": FORMAT,
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "schema_revision": revision,
        "rows": {name: len(rows) for name, rows in tables.items()},
        "files": sorted(files),
        "hostname": socket.gethostname(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
        _add(tar, "store.json", json.dumps(_rows_to_json(tables)).encode())
        for relative, data in files.items():
            _add(tar, f"files/{relative}", data)
    return seal(passphrase, buffer.getvalue())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def write_file(path: Path, data: bytes) -> None:
    """Atomically, 0600: a crash leaves the old file or the new one, never half of one."""
    pki.write_private(path, data)


# -- restore -----------------------------------------------------------------------------


def read(sealed: bytes, passphrase: str) -> tuple[dict, dict[str, list[dict[str, Any]]], dict[str, bytes]]:
    """(manifest, tables, files) of a backup; refuses anything unexpected inside."""
    plain = unseal(passphrase, sealed)
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
        for info in tar.getmembers():
            if not info.isfile() or info.name.startswith("/") or ".." in Path(info.name).parts:
                raise errors.Integrity(f"the backup holds an unexpected entry {info.name!r}", code="backup-format")
            extracted = tar.extractfile(info)
            assert extracted is not None
            members[info.name] = extracted.read()
    try:
        manifest = json.loads(members.pop("manifest.json"))
        tables = _rows_from_json(json.loads(members.pop("store.json")))
    except (KeyError, ValueError) as exc:
        raise errors.Integrity("the backup has no readable manifest or store", code="backup-format") from exc
    if manifest.get("format") != FORMAT:
        raise errors.InvalidInput(f"backup format {manifest.get('format')} is not {FORMAT}", code="backup-format")
    files = {}
    for name, data in members.items():
        relative = name.removeprefix("files/")
        allowed = relative in STATE_FILES or any(
            relative.startswith(f"{d}/") and relative.count("/") == 1 for d in STATE_DIRS
        )
        if not name.startswith("files/") or not allowed:
            raise errors.Integrity(f"the backup holds an unexpected entry {name!r}", code="backup-format")
        files[relative] = data
    return manifest, tables, files


def restore(sealed: bytes, passphrase: str, state_dir: Path, *, store_url: str = "") -> dict:
    """Make `state_dir` (and the store) this backup's server. Returns the manifest.

    Checks everything before writing anything: the passphrase, the contents, a
    state directory without a server in it, a store this version can migrate.
    """
    manifest, tables, files = read(sealed, passphrase)
    revision = manifest.get("schema_revision")
    state_dir = Path(state_dir)
    if (state_dir / "pki" / "ca.key").exists() or (state_dir / "store.db").exists():
        raise errors.Conflict(
            f"{state_dir} already holds a configuration server",
            hint="restore into an empty state directory (stop and move the old one away first)",
            code="state-dir-not-empty",
        )
    if revision not in known_revisions():
        raise errors.PreconditionFailed(
            f"the backup's schema revision {revision} is unknown to this version (newest {head_revision()})",
            hint="restore with the siterecovery version that made the backup, or a newer one",
            code="backup-too-new",
        )
    url = store_url or f"sqlite:///{state_dir / 'store.db'}"
    pki.make_private_dir(state_dir)
    store = SqlStore(url)
    try:
        store.migrate(revision)
        store.import_tables(tables)
        store.migrate("head")
    except BaseException:
        store.close()
        if not store_url:  # our own SQLite file: leave no half-restored store behind
            for leftover in state_dir.glob("store.db*"):
                leftover.unlink(missing_ok=True)
        raise
    else:
        store.close()
    for relative, data in sorted(files.items()):
        write_file(state_dir / relative, data)
    log.info("backup restored", state_dir=str(state_dir), revision=revision, created_at=manifest.get("created_at"))
    return manifest


# -- the schedule --------------------------------------------------------------------------


class BackupSchedule:
    """Every `interval` seconds, a backup into `directory`; the newest `keep` are kept."""

    PREFIX = "config-server-"
    SUFFIX = ".srbackup"

    def __init__(self, store: SqlStore, state_dir: Path, *, directory: Path, passphrase_file: Path,
                 interval: float, keep: int, stop: threading.Event) -> None:
        self._store, self._state_dir = store, state_dir
        self.directory, self._passphrase_file = Path(directory), Path(passphrase_file)
        self._interval, self._keep, self._stop = interval, keep, stop
        self.last_error = ""

    def passphrase(self) -> str:
        return read_passphrase(self._passphrase_file)

    def run_once(self, now: datetime | None = None) -> Path:
        now = now or datetime.now(UTC)
        data = create(self._store, self._state_dir, self.passphrase(), now=now)
        path = self.directory / f"{self.PREFIX}{now:%Y%m%dT%H%M%SZ}{self.SUFFIX}"
        pki.make_private_dir(self.directory)
        write_file(path, data)
        backups = sorted(self.directory.glob(f"{self.PREFIX}*{self.SUFFIX}"))
        for old in backups[: max(len(backups) - self._keep, 0)]:
            old.unlink(missing_ok=True)
        log.info("backup written", path=str(path), bytes=len(data))
        return path

    def loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
                self.last_error = ""
            except (errors.SiteRecoveryError, OSError) as exc:
                self.last_error = str(exc)
                log.error("scheduled backup failed", error=str(exc))


def read_passphrase(path: Path) -> str:
    """The backup passphrase: the first line of a file only its owner can read."""
    path = Path(path)
    try:
        if path.stat().st_mode & 0o077:
            raise errors.InvalidInput(
                f"the backup passphrase file {path} can be read by others", hint=f"chmod 600 {path}",
                code="passphrase-file-mode",
            )
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidInput(f"cannot read the backup passphrase file {path}: {exc}", code="passphrase-file") from exc
    return check_passphrase(lines[0].strip() if lines else "")
