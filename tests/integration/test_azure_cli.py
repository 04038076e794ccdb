"""srctl azure … and srctl process-server deploy azure … against a real configuration server.

Sites are managed through a configuration server started as a subprocess, as
in production: the secret goes in from a 0600 file and never comes out (not in
srctl's output, the store or the server's log). No emulator exists for Azure
Compute, so the deployment test runs the real configuration server in this
process (`daemon.run(..., azure=connector)`) with the recorded-responses
transport, and drives it with the real srctl as a subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.common import daemon as common_daemon
from siterecovery.controller import azure_sites
from siterecovery.controller import daemon as config_server
from siterecovery.controller.enrollment import PassphraseVault
from siterecovery.controller.settings import ConfigServerSettings
from tests.azure_replay import ReplayTransport, load
from tests.integration.conftest import Site, wait_for
from tests.unit.azure.test_compute import SITE, VALUES, StaticToken

SECRET = "Az-sp-secret-not-in-any-log~42"
NEW_SECRET = "Az-sp-second-secret-also-hidden~43"


def _secret_file(site: Site, text: str, mode: int = 0o600) -> Path:
    path = site.root / f"secret-{abs(hash(text))}-{mode:o}"
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def _add(site: Site, name: str, secret_file: Path, *extra: str, region: str = SITE.region, config: Path | None = None):
    return site.srctl(
        "azure",
        "add",
        name,
        "--subscription",
        SITE.subscription_id,
        "--tenant",
        SITE.tenant_id,
        "--client-id",
        SITE.client_id,
        "--secret-file",
        str(secret_file),
        "--resource-group",
        SITE.resource_group,
        "--region",
        region,
        "--vnet",
        SITE.vnet,
        "--subnet",
        SITE.subnet,
        "--storage-account",
        SITE.storage_account,
        *extra,
        config=config,
    )


def test_add_list_update_remove_and_the_secret_never_comes_out(site: Site) -> None:
    site.start_config_server()
    good = _secret_file(site, SECRET)
    added = _add(site, "dr-west", good, "--output", "json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["settings"]["region"] == "westeurope"

    # Refused, and nothing changes: the same name, a bad region, a secret file others may read.
    duplicate = _add(site, "dr-west", good)
    assert duplicate.returncode == 4 and "update-credentials" in duplicate.stderr
    bad_region = _add(site, "dr-2", good, region="West Europe")
    assert bad_region.returncode == 2 and "region" in bad_region.stderr
    readable = _add(site, "dr-3", _secret_file(site, SECRET, 0o644))
    assert readable.returncode == 2 and "chmod 600" in readable.stderr
    [listed] = site.srctl_json("azure", "list")
    assert (listed["name"], listed["settings"]["resource_group"], listed["settings"]["container"]) == (
        "dr-west",
        "rg-dr",
        "siterecovery",
    )

    # A reader may list, not change.
    reader_dir = site.root / "reader"
    assert site.srctl("user", "add", "rita", "--role", "reader", "--out", str(reader_dir)).returncode == 0
    reader = reader_dir / "srctl.toml"
    assert site.srctl("azure", "list", config=reader).returncode == 0
    assert _add(site, "dr-r", good, config=reader).returncode == 9
    assert site.srctl("azure", "remove", "dr-west", config=reader).returncode == 9

    updated = site.srctl(
        "azure", "update-credentials", "dr-west", "--secret-file", str(_secret_file(site, NEW_SECRET)),
        "--output", "json",
    )
    assert updated.returncode == 0, updated.stderr
    assert site.srctl("azure", "update-credentials", "nope", "--secret-file", str(good)).returncode == 3

    # Secrets at rest and in every output: never in clear.
    key = site.cs_dir / "pki" / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    outputs = [added.stdout, updated.stdout, site.srctl("azure", "list", "--output", "json").stdout,
               site.srctl("azure", "list").stdout]
    for text in outputs:
        assert SECRET not in text and NEW_SECRET not in text and "secret" not in text.lower()
    for path in [site.cs_dir / "store.db", *site.cs_dir.glob("store.db-*"), *(site.root / "logs").glob("*.log")]:
        data = path.read_bytes()
        assert SECRET.encode() not in data and NEW_SECRET.encode() not in data, path

    assert site.srctl("azure", "remove", "dr-west").returncode == 0
    assert site.srctl("azure", "remove", "dr-west").returncode == 3
    assert site.srctl_json("azure", "list") == []


@pytest.fixture
def in_process_server(tmp_path: Path) -> Iterator[tuple[Path, ReplayTransport]]:
    """The real configuration server in a thread, its Azure clients answered by recordings."""
    transport = ReplayTransport()
    connector = azure_sites.AzureConnector(
        transport=transport, credential=lambda site, secret: StaticToken(), polling_interval=0, sleep=transport.sleep
    )
    state_dir = tmp_path / "config-server"
    cfg = ConfigServerSettings(state_dir=state_dir, listen="127.0.0.1", port=0, job_poll_interval=0.05, log_json=True)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(config_server.run(cfg, stop, azure=connector)), daemon=True)
    thread.start()
    state = common_daemon.state_file_path(state_dir, config_server.DAEMON)
    wait_for(lambda: state.exists() or not thread.is_alive(), what="the configuration server to be ready")
    assert thread.is_alive(), "the configuration server stopped while starting"
    yield state_dir, transport
    stop.set()
    thread.join(timeout=30)
    assert result == [0]


def test_deploy_process_server_runs_the_job_with_the_vaults_passphrase(
    tmp_path: Path, in_process_server: tuple[Path, ReplayTransport]
) -> None:
    state_dir, transport = in_process_server
    site = Site(tmp_path)
    profile = state_dir / "admin" / "srctl.toml"
    assert _add(site, "dr-west", _secret_file(site, SECRET), config=profile).returncode == 0
    key = tmp_path / "id_test.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx admin@example\n")
    passphrase = PassphraseVault(state_dir / "passphrase.json").current()

    def deploy(*extra: str):
        return site.srctl(
            "process-server", "deploy", "azure", "dr-west", "--name", "web1", "--subnet", "infra",
            "--private-ip", "10.1.2.10", "--ssh-public-key", str(key), *extra, config=profile,
        )

    # Bad input is refused before any job exists.
    assert deploy("--size", "4 cores").returncode == 2
    assert site.srctl("process-server", "deploy", "azure", "nope", "--name", "web1", "--subnet", "infra",
                      "--private-ip", "10.1.2.10", "--ssh-public-key", str(key), config=profile).returncode == 3

    first = load("nic_create", VALUES)[:1]
    transport.queue(first + load("nic_create", VALUES))
    transport.queue(load("vm_create", VALUES)[:1] + load("vm_create", VALUES))
    watched = deploy("--wait", "--output", "json")
    assert watched.returncode == 0, watched.stderr
    final = json.loads(watched.stdout.strip().splitlines()[-1])
    assert (final["kind"], final["status"]) == ("azure-deploy-process-server", "succeeded")
    assert [s["name"] for s in final["steps"]] == ["create-nic", "create-vm"]
    assert transport.done

    vm_put = [r for r in transport.requests if r.method == "PUT"][-1]
    cloud_init = base64.b64decode(vm_put.body["properties"]["osProfile"]["customData"]).decode()
    assert passphrase in cloud_init
    # No --image: the server's default, Ubuntu 24.04 LTS (Python 3.12; requires-python is >= 3.11).
    assert vm_put.body["properties"]["storageProfile"]["imageReference"] == {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
    # The passphrase is in the VM's custom data only: not in the job, its steps or the store.
    shown = site.srctl("jobs", "show", final["id"], "--output", "json", config=profile).stdout
    assert passphrase not in shown and passphrase not in watched.stdout
    assert passphrase.encode() not in (state_dir / "store.db").read_bytes()
    for wal in state_dir.glob("store.db-*"):
        assert passphrase.encode() not in wal.read_bytes()
