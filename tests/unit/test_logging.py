"""Logging configuration: secrets masked, and loggers that outlive a swapped stderr."""

from __future__ import annotations

import io
import json
import sys

import pytest

from siterecovery.common import logging as sr_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    sr_logging.configure(level="warning")


def test_secret_keys_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    sr_logging.configure(level="info", json=True)
    sr_logging.get_logger("t").info("enrolled", passphrase="hunter2", client_secret="s", host="a")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["passphrase"] == sr_logging.MASK
    assert line["client_secret"] == sr_logging.MASK
    assert line["host"] == "a"


def test_logger_cached_under_a_replaced_stderr_writes_to_the_current_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A CLI runner replaces sys.stderr, srctl configures logging, the runner
    # closes its stream: a logger first used then must not write into it later.
    temporary = io.StringIO()
    monkeypatch.setattr(sys, "stderr", temporary)
    sr_logging.configure(level="info", json=True)
    log = sr_logging.get_logger("cached")
    log.info("during")
    monkeypatch.undo()
    temporary.close()
    log.info("after")
    assert json.loads(capsys.readouterr().err.strip())["event"] == "after"
