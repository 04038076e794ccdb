"""A workflow step that waits for what agents report looks again after one heartbeat interval."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.controller.protection.environment import Environment
from siterecovery.controller.protection.steps import POLL, poll_delay


@pytest.mark.parametrize(("heartbeat", "delay"), [(10.0, POLL), (POLL, POLL), (0.3, 0.3)])
def test_one_heartbeat_interval_and_at_most_poll(heartbeat: float, delay: float) -> None:
    env = Environment(credentials=None, heartbeat_interval=heartbeat, scripts_dir=Path("."))
    assert poll_delay(env) == delay
