"""The shared shape of every agent daemon's entry point: flags + TOML → settings → run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from siterecovery.common import errors, settings

T = TypeVar("T")


def parse(prog: str, description: str, cls: type[T], argv: list[str] | None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--state-dir", dest="state_dir")
    parser.add_argument("--server", help="configuration server, host:port")
    parser.add_argument("--passphrase-file", dest="passphrase_file", help="file holding the connection passphrase")
    parser.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--listen", help="address to listen on")
    parser.add_argument("--port", type=int, help="port to listen on (0 picks a free one)")
    parser.add_argument("--advertise", help="name or address peers use to reach this agent")
    parser.add_argument("--metrics-listen", dest="metrics_listen",
                        help="serve Prometheus metrics on host:port (0 picks a free port)")
    args: dict[str, Any] = vars(parser.parse_args(argv))
    config = args.pop("config")
    return settings.load(cls, config, args)


def main(prog: str, run: Callable[[Any], int], cls: type, description: str, argv: list[str] | None) -> None:
    try:
        sys.exit(run(parse(prog, description, cls, argv)))
    except errors.SiteRecoveryError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
