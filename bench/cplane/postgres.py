"""A throwaway PostgreSQL cluster for the control-plane benchmark.

The same binaries the test harness uses (tests/conftest.py), but with the
server's default durability (fsync and synchronous_commit on): the benchmark
measures what a production store costs, not the test suite's shortcut. It
listens on a unix socket only, in a private temporary directory that is
removed afterwards. As root, the cluster is owned by and run as `postgres`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

USER = "postgres"


@dataclass(frozen=True)
class Cluster:
    data_dir: Path
    socket_dir: Path
    port: int
    version: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def processes(self) -> list[psutil.Process]:
        """The postmaster and every backend and helper it runs now."""
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]


def bin_dir() -> Path:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl): run deploy/install.sh, or use --store sqlite")


def _version_key(path: str) -> list[int]:
    return [int(x) if x.isdigit() else 0 for x in Path(path).parent.name.split(".")]


def _free_unix_port(socket_dir: Path) -> int:
    # The "port" of a unix-socket-only cluster names its socket file; any free number will do.
    port = 5432
    while (socket_dir / f".s.PGSQL.{port}").exists():
        port += 1
    return port


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    binaries = bin_dir()
    owner = pwd.getpwnam(USER) if os.geteuid() == 0 else None
    as_owner = ["runuser", "-u", USER, "--"] if owner else []
    base = Path(tempfile.mkdtemp(prefix="sr-bench-pg-"))
    data, log = base / "data", base / "server.log"
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    port = _free_unix_port(base)
    _run([*as_owner, str(binaries / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
          "-E", "UTF8", "--locale=C"], log)
    options = f"-k {base} -p {port} -c listen_addresses=''"
    try:
        _run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
              "-o", options, "start"], log)
        version = subprocess.run([str(binaries / "postgres"), "--version"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        yield Cluster(data_dir=data, socket_dir=base, port=port, version=version)
    finally:
        subprocess.run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _run(cmd: list[str], log: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")
