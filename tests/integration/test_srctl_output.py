"""Every srctl command against a real site: with --output yaml it prints parseable YAML equal to the
JSON of the same answer; where the site refuses it, the error is one YAML document on stderr
carrying its code (`error.code`) and the exit code of its class, and no traceback. (The two lines
people see without --output are checked in tests/unit/test_doctor_checks.py.)

The command list is walked from the typer app: a command missing from `STEPS`
fails the test. Commands that succeed run in this process (typer's runner),
so the document each printed is also captured as JSON from the one renderer
(`output.emit` / `emit_item`) and compared with the YAML on stdout: one run per
command, which is what lets commands that change things (rotate the
passphrase, remove a group) be checked too. Refusals run as a subprocess,
through the console script's error handling. `lab up` and `drill` start a
whole lab: tests/integration/test_lab.py runs `lab up --output yaml`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from siterecovery.controller.cli import output
from siterecovery.controller.cli.main import app
from tests.unit.test_srctl_commands import commands

from .failback_site import VM, FailbackSite

NOT_HERE = {"lab up": "test_lab.py", "drill": "test_lab.py (the drill tests)"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _private(path: Path, text: str) -> str:
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


def steps(site: FailbackSite, ctx: dict) -> list[tuple[Callable[[], list[str]], int]]:
    """(arguments, expected exit code), in order; arguments are made when the step runs."""
    root = site.root
    secret = _private(root / "sp.secret", "not-a-real-secret")
    password = _private(root / "vc.pw", "not-a-real-password")
    backup_pass = _private(root / "backup.pass", "a long enough backup passphrase")
    key = root / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG8dZ1iVQjtqV0lxbtRQK1Nm7p0Xzvq8rS0eQ8uHkGkN test\n")
    nolab = str(root / "no-lab")
    azure = ["--subscription", "00000000-0000-0000-0000-000000000001", "--tenant",
             "00000000-0000-0000-0000-000000000002", "--client-id", "00000000-0000-0000-0000-000000000003",
             "--secret-file", secret, "--resource-group", "rg", "--region", "westeurope", "--vnet", "vnet",
             "--subnet", "sub", "--storage-account", "srstore"]

    def s(*args: str) -> Callable[[], list[str]]:
        return lambda: [a.format(**ctx) for a in args]

    return [
        (s("doctor", "--machine", VM, "--master-target", "mt-onprem"), 0),
        (s("servers", "list"), 0), (s("machines", "list"), 0),
        (s("jobs", "list"), 0), (s("jobs", "show", "{job}"), 0), (s("jobs", "watch", "{job}"), 0),
        (s("job", "list"), 0), (s("job", "show", "{job}"), 0), (s("job", "watch", "{job}"), 0),
        (s("jobs", "show", "no-such-job"), 3),
        (s("passphrase", "show"), 0), (s("passphrase", "rotate"), 0),
        (s("replication", "status"), 0), (s("replication", "pause", "{pair}"), 0),
        (s("replication", "resume", "{pair}"), 0), (s("replication", "enable", VM), 2),
        (s("replication", "disable", "no-such-machine"), 3),
        (s("recovery-points", "create", VM), 0), (s("recovery-points", "list", VM), 0),
        (s("recovery-points", "materialize", VM), 0),
        (s("recovery-points", "open-view", VM), 0), (s("recovery-points", "close-view", VM), 0),
        (s("vcenter", "list"), 0),
        (s("vcenter", "add", "vc9", "--host", "127.0.0.1", "--port", str(_closed_port()), "--user", "u",
           "--password-file", password, "--insecure"), 6),
        (s("vcenter", "update-credentials", "nope", "--user", "u", "--password-file", password), 3),
        (s("vcenter", "remove", "nope"), 3), (s("vcenter", "discover", "nope"), 3), (s("vcenter", "inventory", "nope"), 3),
        (s("azure", "add", "dr1", *azure), 0), (s("azure", "list"), 0),
        (s("azure", "update-credentials", "dr1", "--secret-file", secret), 0), (s("azure", "remove", "dr1"), 0),
        (s("process-server", "deploy", "azure", "dr1", "--name", "ps9", "--subnet", "sub", "--private-ip",
           "10.1.3.4", "--ssh-public-key", str(key)), 3),
        (s("user", "add", "bob", "--role", "reader", "--out", str(root / "bob")), 0), (s("user", "list"), 0),
        (s("--config", str(root / "bob" / "srctl.toml"), "passphrase", "rotate"), 9),
        (s("user", "remove", "bob", "--yes"), 0),
        (s("backup", "create", "--out", str(root / "cs.srbackup"), "--passphrase-file", backup_pass), 0),
        (s("backup", "restore", str(root / "cs.srbackup"), "--passphrase-file", backup_pass, "--state-dir",
           str(root / "restored")), 0),
        (s("group", "create", "PG2"), 0), (s("group", "list"), 0), (s("group", "remove", "PG2"), 0),
        (s("machine", "list"), 0), (s("machine", "failback-status", VM), 0),
        (s("machine", "protect", VM, "--group", "PG1"), 4), (s("machine", "failover", "no-such-machine"), 3),
        (s("machine", "unprotect", "no-such-machine"), 3),
        (s("machine", "reprotect", VM), 5), (s("machine", "failback", VM), 5), (s("machine", "delete-cloud-vm", VM), 5),
        (s("plan", "create", "P1", "--group", VM, "--pause-before", "1:check the network"), 0),
        (s("plan", "list"), 0), (s("plan", "show", "P1"), 0),
        (s("plan", "failover", "P1", "--direction", "to-onprem"), 5), (s("plan", "reprotect", "P1"), 5),
        (s("plan", "test-failover", "P1", "--no-wait"), 0),
        (s("jobs", "resume", "{last_job}"), 0),  # follows the test failover to its end
        (s("machine", "test-cleanup", VM), 0),
        (s("machine", "test-failover", VM, "--no-wait"), 0), (s("jobs", "watch", "{last_job}"), 0),
        # The plan pauses before its group every time: the cleanup waits for its resume too.
        (s("plan", "test-cleanup", "P1", "--no-wait"), 0), (s("job", "resume", "{last_job}"), 0),
        (s("plan", "remove", "P1"), 0),
        (s("lab", "status", "--dir", nolab), 3), (s("lab", "down", "--dir", nolab), 3),
        (s("servers", "remove", "ps-cloud", "--yes"), 0),
    ]


def _command_of(args: list[str], names: set[str]) -> str:
    words = [a for a in (args[2:] if args[0] == "--config" else args) if not a.startswith("-")]
    for n in (3, 2, 1):
        if " ".join(words[:n]) in names:
            return " ".join(words[:n])
    raise AssertionError(f"no command in {args}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_command_prints_yaml_equal_to_its_json_or_an_error_document(protected: FailbackSite, monkeypatch):
    names = {name for name, _ in commands()}
    ctx: dict = {"job": protected.machine()["job"], "pair": protected.machine()["pairs"][0]["pair_id"]}
    emitted: list[str] = []
    real_emit, real_item = output.emit, output.emit_item

    def emit(fmt, data, table=None):
        emitted.append(output.to_json(data))
        real_emit(fmt, data, table)

    def emit_item(fmt, data):
        emitted.append(output.to_json(data))
        real_item(fmt, data)

    monkeypatch.setattr(output, "emit", emit)
    monkeypatch.setattr(output, "emit_item", emit_item)
    runner = CliRunner()
    covered = set()
    for make, expected in steps(protected, ctx):
        args = make()
        print("srctl", *args, flush=True)
        covered.add(_command_of(args, names))
        if expected:
            _refused(protected, args, expected)
            continue
        emitted.clear()
        config = [] if args[0] == "--config" else ["--config", str(protected.profile)]
        result = runner.invoke(app, [*config, *args, "--output", "yaml"])
        assert result.exit_code == 0, f"srctl {' '.join(args)}: {result.exception!r}\n{result.output}"
        documents = list(yaml.safe_load_all(result.stdout))
        assert documents and documents == [json.loads(e) for e in emitted], f"srctl {' '.join(args)}"
        last = documents[-1]
        if isinstance(last, dict) and isinstance(last.get("job"), str):
            ctx["last_job"] = last["job"]
    missing = names - covered - set(NOT_HERE)
    assert not missing, f"commands never run here: {sorted(missing)}"


def _refused(site: FailbackSite, args: list[str], expected: int) -> None:
    config = [] if args[0] == "--config" else ["--config", str(site.profile)]
    env = {**os.environ, "COLUMNS": "200", "HOME": str(site.root / "home")}
    result = subprocess.run([str(Path(sys.executable).parent / "srctl"), *config, *args, "--output", "yaml"],
                            capture_output=True, text=True, timeout=120, env=env)
    where = f"srctl {' '.join(args)} -> {result.returncode}\n{result.stderr}"
    assert result.returncode == expected, where
    error = yaml.safe_load(result.stderr)["error"]
    assert error["exit_code"] == expected and error["code"] and error["message"] and error["hint"], where
    assert result.stdout == "", where
