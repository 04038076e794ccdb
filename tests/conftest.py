"""Fixtures shared by every test directory.

PostgreSQL harness: `postgres_server` (session) starts a throwaway cluster from
the Debian/PATH binaries (initdb + pg_ctl) in a private temporary directory,
listening on a unix socket only, and stops it when the session ends.
`postgres_url` (per test) creates a fresh, empty database on it and drops it
afterwards. When no PostgreSQL binaries exist the fixtures skip, unless the
environment variable CI is "true": then they fail, so CI cannot silently lose
the PostgreSQL half of the contract suite.

initdb refuses to run as root; as root the cluster is owned by, and run as,
the `postgres` system user (via runuser).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway PostgreSQL cluster reachable on a unix socket."""

    bin_dir: Path
    base_dir: Path
    socket_dir: Path
    port: int
    user: str = PG_USER

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) for `database`."""
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"

    def conninfo(self, database: str = "postgres") -> str:
        """A libpq connection string, for psycopg.connect()."""
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits, _")
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _find_pg_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL harness unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as_owner(cmd: list[str], run_as: str | None, log: Path | None = None) -> None:
    full = ["runuser", "-u", run_as, "--", *cmd] if run_as else cmd
    result = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        pytest.fail(
            f"{' '.join(full)} exited with {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nserver log: {tail}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _find_pg_bin_dir()
    if bin_dir is None:
        _unavailable("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(PG_USER)
        except KeyError:
            _unavailable(f"running as root and there is no {PG_USER!r} user to run initdb as")
        run_as = PG_USER

    base = Path(tempfile.mkdtemp(prefix="sr-pg-"))
    data, log = base / "data", base / "server.log"
    if run_as:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    server = PostgresServer(bin_dir=bin_dir, base_dir=base, socket_dir=base, port=port)
    started = False
    try:
        _run_as_owner(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                PG_USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            run_as,
        )
        options = (
            f"-k {base} -p {port} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = True
        _run_as_owner(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            run_as,
            log,
        )
        yield server
    finally:
        if started:
            subprocess.run(
                [
                    *(["runuser", "-u", run_as, "--"] if run_as else []),
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database for this test (dropped afterwards), as a SQLAlchemy URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


def needs_tools(*names: str) -> pytest.MarkDecorator:
    """Skip a test when a command-line tool is missing, except in CI, where that fails it.

    deploy/install.sh installs every tool the tests use, so in CI a missing one is
    a broken install, not a reason to test less.
    """
    import shutil

    missing = [n for n in names if shutil.which(n) is None]
    if missing and os.environ.get("CI", "").lower() == "true":
        return pytest.mark.usefixtures()  # run it and let it fail where the tool is called
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (bash deploy/install.sh installs it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests first, then the other files that start daemons, then the rest,
    each group in collection order and each file's tests kept together.

    deploy/test.sh runs the suite on two xdist workers, a file at a time per worker in
    this order (`--dist loadfile --no-loadscope-reorder`): the long files start early
    and the many short ones fill in at the end, so the workers finish close together
    instead of one running a several-minute file alone at the end."""

    def weight(item: pytest.Item) -> int:
        if any(i.get_closest_marker("slow") for i in by_file[item.path]):
            return 0
        return 1 if {"integration", "fuzz"} & set(item.path.parts) else 2

    by_file: dict[Path, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    items.sort(key=weight)  # stable: the order within each group is kept
