"""Structured logging for every process.

JSON lines when stderr is not a terminal, a readable console renderer when it
is. A processor masks values whose key names a secret, so a passphrase, key or
password passed as log context never reaches the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

SECRET_WORDS = ("passphrase", "password", "secret", "private_key", "token", "proof", "credential")
MASK = "***"


def mask_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if any(word in key.lower() for word in SECRET_WORDS):
            event[key] = MASK
    return event


class _CurrentStderr:
    """Whatever `sys.stderr` is at the moment of writing.

    Loggers are cached on first use, so a stream captured at configure time
    outlives any replacement of `sys.stderr` (a CLI test runner's capture, a
    daemon re-pointing it). Looking it up per write keeps every cached logger
    writing somewhere that is open.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(*, level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog once per process, at the start of `run()`."""
    stream = stream or _CurrentStderr()
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
