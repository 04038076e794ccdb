"""The vSphere on-premises site logs in once per `with site:` block, not once per call."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from siterecovery.controller.protection.onprem import VsphereOnprem
from siterecovery.controller.providers.vsphere import operations


def test_one_login_for_the_calls_of_a_step_and_one_per_call_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    logins: list[str] = []
    closed: list[str] = []

    @contextmanager
    def open_session(record):
        logins.append(record.name)
        try:
            yield SimpleNamespace(number=len(logins))
        finally:
            closed.append(record.name)

    used: list[int] = []
    monkeypatch.setattr(operations, "find_vm", lambda session, vm: used.append(session.number) or "vm-1")
    monkeypatch.setattr(operations, "power_state", lambda session, vm_id: "poweredOff")
    monkeypatch.setattr(operations, "set_extra_config", lambda session, vm_id, values: None)
    site = VsphereOnprem(store=None, vcenter=SimpleNamespace(name="vc01", id="vc-1"), open_session=open_session)

    with site:
        assert site.vm_exists("app01") and not site.is_running("app01")
        site.before_overwrite("app01", "job-1")
        assert logins == ["vc01"] and closed == []
    assert closed == ["vc01"] and used == [1, 1, 1], "every call of the block used the one session"
    assert site.vm_exists("app01") and logins == ["vc01", "vc01"] and closed == ["vc01", "vc01"]
