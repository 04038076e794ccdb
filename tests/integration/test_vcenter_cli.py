"""srctl vcenter … against a real configuration server and real vcsim.

The configuration server logs in before it stores an endpoint, keeps the
password encrypted, discovers on add, on demand and periodically, and
`srctl vcenter inventory` shows the result.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Site, wait_for
from tests.integration.vcsim import Vcsim, running_vcsim

PASSWORD = "Vc-pa55word-not-in-any-log"


@pytest.fixture(scope="module")
def vpx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("vpx", tmp_path_factory.mktemp("vpx")) as sim:
        yield sim


@pytest.fixture(scope="module")
def esx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    with running_vcsim("esx", tmp_path_factory.mktemp("esx"), username="root", password=PASSWORD) as sim:
        yield sim


def _password_file(site: Site, text: str) -> Path:
    path = site.root / f"pw-{abs(hash(text))}"
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return path


def _add(site: Site, sim: Vcsim, name: str, password: str, *extra: str, user: str = "admin"):
    return site.srctl(
        "vcenter",
        "add",
        name,
        "--host",
        sim.host,
        "--port",
        str(sim.port),
        "--user",
        user,
        "--password-file",
        str(_password_file(site, password)),
        *extra,
    )


def _discovery_jobs(site: Site, status: str = "succeeded") -> list[dict]:
    return [
        j
        for j in site.srctl_json("jobs", "list")
        if j["kind"] == "discover-vcenter" and j["status"] == status
    ]


def test_add_discover_inventory_update_remove(site: Site, vpx: Vcsim, esx: Vcsim) -> None:
    site.start_config_server()
    added = _add(site, vpx, "vc01", PASSWORD, "--ca-file", vpx.cert_file, "--output", "json")
    assert added.returncode == 0, added.stderr
    job = wait_for(lambda: _discovery_jobs(site), what="discovery on add")[0]
    assert job["target"] == "vCenter vc01"

    [listed] = site.srctl_json("vcenter", "list")
    assert (listed["name"], listed["trust"], listed["discovery_status"]) == ("vc01", "ca", "ok")
    inventory = site.srctl_json("vcenter", "inventory", "vc01")["inventory"]
    assert inventory["api_type"] == "VirtualCenter"
    assert len(inventory["hosts"]) == 4 and len(inventory["vms"]) == 4
    assert {d["name"] for d in inventory["datastores"]} == {"LocalDS_0"}
    table = site.srctl("vcenter", "inventory", "vc01")
    assert table.returncode == 0 and "DC0_C0_RP0_VM0" in table.stdout and "LocalDS_0" in table.stdout

    # On demand: a second discovery job.
    again = site.srctl_json("vcenter", "discover", "vc01", "--no-wait")["job"]
    wait_for(lambda: any(j["id"] == again for j in _discovery_jobs(site)), what="discovery on demand")

    # The same endpoint or name again: a conflict, nothing changes.
    duplicate = _add(site, vpx, "vc01-again", PASSWORD, "--ca-file", vpx.cert_file)
    assert duplicate.returncode == 4, duplicate.stderr
    # Bad input the server checks: exit 2.
    assert _add(site, esx, "bad name", PASSWORD, "--insecure", user="root").returncode == 2
    assert _add(site, esx, "esx01", PASSWORD, "--thumbprint", "not-hex", user="root").returncode == 2
    # A wrong password, an untrusted certificate: refused before anything is stored.
    wrong = _add(site, esx, "esx01", "not-the-password", "--thumbprint", esx.thumbprint, user="root")
    assert wrong.returncode == 8 and "update-credentials" in wrong.stderr
    untrusted = _add(site, esx, "esx01", PASSWORD, user="root")
    assert untrusted.returncode == 8 and "--thumbprint" in untrusted.stderr
    assert [v["name"] for v in site.srctl_json("vcenter", "list")] == ["vc01"]

    # A standalone host pinned by thumbprint.
    assert _add(site, esx, "esx01", PASSWORD, "--thumbprint", esx.thumbprint, user="root").returncode == 0
    wait_for(lambda: site.srctl("vcenter", "inventory", "esx01").returncode == 0, what="esx discovery")
    esx_inventory = site.srctl_json("vcenter", "inventory", "esx01")["inventory"]
    assert esx_inventory["api_type"] == "HostAgent" and esx_inventory["clusters"] == []

    # Credentials: a wrong new password is refused and the old account stays.
    bad = site.srctl(
        "vcenter",
        "update-credentials",
        "esx01",
        "--user",
        "root",
        "--password-file",
        str(_password_file(site, "wrong-again")),
    )
    assert bad.returncode == 8
    good = site.srctl(
        "vcenter",
        "update-credentials",
        "esx01",
        "--user",
        "root",
        "--password-file",
        str(_password_file(site, PASSWORD)),
        "--output",
        "json",
    )
    assert good.returncode == 0, good.stderr

    # Secrets at rest: a 0600 key beside the CA, no password in the store or the logs.
    key = site.cs_dir / "pki" / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for path in [
        site.cs_dir / "store.db",
        *site.cs_dir.glob("store.db-*"),
        *(site.root / "logs").glob("*.log"),
    ]:
        assert PASSWORD.encode() not in path.read_bytes(), path
    listed_text = site.srctl("vcenter", "list", "--output", "json").stdout
    assert PASSWORD not in listed_text and "secret" not in listed_text

    # Remove: the endpoint and its inventory are gone; unknown names are "not found".
    assert site.srctl("vcenter", "remove", "esx01").returncode == 0
    assert site.srctl("vcenter", "inventory", "esx01").returncode == 3
    assert site.srctl("vcenter", "remove", "esx01").returncode == 3
    assert site.srctl("vcenter", "discover", "nope").returncode == 3
    assert [v["name"] for v in site.srctl_json("vcenter", "list")] == ["vc01"]


def test_endpoints_are_discovered_again_periodically(site: Site, vpx: Vcsim) -> None:
    site.start_config_server(vcenter_discovery_interval=1.0)
    assert _add(site, vpx, "vc01", PASSWORD, "--insecure").returncode == 0
    # The add asked for one; a second one without asking is the schedule.
    wait_for(lambda: len(_discovery_jobs(site)) >= 2, timeout=30, what="a periodic discovery")
