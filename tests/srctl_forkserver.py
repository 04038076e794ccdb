"""srctl for the tests, as a process of its own per call, without Python's start-up cost.

The integration tests run srctl hundreds of times, most of them while polling
(`wait_for` a job, a sync, an agent). Started with `python -m`, every call
spends about a second of CPU importing grpc, typer, rich and the Azure SDK
before it sends one RPC; on a 2-core CI machine that competes with the
daemons under test and made up much of the suite's time.

`SrctlForkServer` starts one helper process that imports srctl once and then
forks a child per call. The child is a separate process exactly as
`python -m siterecovery.controller.cli.main ARGS` would be after its imports:
its own environment, working directory, stdin from /dev/null, stdout and
stderr captured, the exit code srctl chose (or 1 with a traceback, as Python
does for an uncaught exception), and the same program name in usage texts.
No channel and no thread exists in the helper before a fork (grpc is only
imported), so each child starts gRPC afresh.

What the child cannot differ in: module-level state computed at import, which
comes from the helper's environment (rich's console width from COLUMNS, for
example). `run` therefore refuses a call whose COLUMNS differs from the
helper's. `tests/unit/test_srctl_forkserver.py` compares its results with a
real `python -m` run.

Protocol, over a socket pair: the client sends one JSON line
{"args", "env", "cwd", "stdout", "stderr"} (the last two are file paths the
child writes); the helper answers "pid N" once the child runs, then "exit N".
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path

CLI_MODULE = "siterecovery.controller.cli.main"


class SrctlForkServer:
    """One helper process; `run` is safe to call from several threads (calls take turns)."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.env = dict(env)
        ours, theirs = socket.socketpair()
        self._sock = ours
        self._reader = ours.makefile("r", encoding="utf-8")
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.srctl_forkserver", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, pass_fds=[theirs.fileno()], cwd=Path(__file__).resolve().parent.parent,
            )
        theirs.close()
        ready = self._reader.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the srctl fork server did not start (said {ready!r}); its log: {log_path}")

    def run(
        self, args: list[str], *, env: dict[str, str], cwd: Path, output_dir: Path, timeout: float = 60.0,
    ) -> subprocess.CompletedProcess:
        """Run `srctl ARGS` in a forked child; the result is what `subprocess.run(..., text=True,
        capture_output=True)` of `python -m siterecovery.controller.cli.main ARGS` returns."""
        if env.get("COLUMNS") != self.env.get("COLUMNS"):
            raise ValueError("COLUMNS is read when srctl is imported: start a fork server with this COLUMNS")
        with self._lock:
            output_dir.mkdir(parents=True, exist_ok=True)
            out, err = output_dir / "srctl.stdout", output_dir / "srctl.stderr"
            request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            self._sock.sendall((json.dumps(request) + "\n").encode())
            pid = int(self._expect("pid"))
            self._sock.settimeout(timeout)
            try:
                code = int(self._expect("exit"))
            except TimeoutError:
                os.kill(pid, 9)
                self._sock.settimeout(None)
                self._expect("exit")
                raise subprocess.TimeoutExpired(["srctl", *args], timeout) from None
            finally:
                self._sock.settimeout(None)
            return subprocess.CompletedProcess(
                ["srctl", *args], code, out.read_text(errors="replace"), err.read_text(errors="replace"),
            )

    def _expect(self, word: str) -> str:
        line = self._reader.readline()
        if not line.startswith(word + " "):
            raise RuntimeError(f"the srctl fork server said {line!r}, expected {word!r} (did it die?)")
        return line.split(" ", 1)[1].strip()

    def close(self) -> None:
        """Hang up (the helper ends at end of input) and wait for the helper."""
        self._reader.close()  # the socket is only closed once its file object is too
        self._sock.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# -- the helper process -----------------------------------------------------------------------


def _child(request: dict) -> int:
    """Become `python -m siterecovery.controller.cli.main ARGS`; return its exit code."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    cli = sys.modules[CLI_MODULE]
    # As `python -m` sets them: click names the program after __main__'s package and
    # argv[0] ("python -m siterecovery.controller.cli.main" in usage texts).
    sys.argv = [cli.__file__, *request["args"]]
    sys.modules["__main__"] = cli
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def _warm_up() -> None:
    """Import srctl, and what it imports only when it parses its first command line
    (typer loads pydantic then), and build its click command once: typer builds it from
    the type hints of every command at each start, about a quarter of a second. The
    build is a pure function of the app, and each child gets its own copy by the fork.
    Nothing is run."""
    import typer.main

    cli = importlib.import_module(CLI_MODULE)
    typer.main.get_command(cli.app).make_context("srctl", ["servers", "list"], resilient_parsing=True)
    built = typer.main.get_command(cli.app)
    build = typer.main.get_command
    typer.main.get_command = lambda app: built if app is cli.app else build(app)


def serve(fd: int) -> None:
    _warm_up()
    sock = socket.socket(fileno=fd)
    reader = sock.makefile("r", encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    sock.sendall(b"ready\n")
    for line in reader:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            os._exit(_child(request))
        sock.sendall(f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        sock.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]))
