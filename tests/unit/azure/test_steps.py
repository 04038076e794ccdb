"""The Azure job kind (process server deployment) run by the real job engine on a SQLite store, against recorded responses."""

from __future__ import annotations

import pytest

from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import JobRunner, create_job
from siterecovery.controller.providers.azure import steps
from siterecovery.controller.providers.azure.compute import AzureCompute
from siterecovery.controller.store import open_store
from tests.azure_replay import ReplayTransport, load
from tests.unit.azure.test_compute import RG_ID, SITE, VALUES, StaticToken


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


@pytest.fixture
def transport():
    t = ReplayTransport()
    yield t
    assert t.done, f"recorded responses left unused: {[e['request'] for e in t.exchanges]}"


@pytest.fixture
def compute_for(transport):
    azure = AzureCompute.connect(SITE, StaticToken(), transport=transport, polling_interval=0, sleep=transport.sleep)
    return lambda ctx: azure


def run(store, kind, params):
    job = create_job(store, kind, target="web1", params=params)
    runner = JobRunner(store, kinds=[kind], lease_seconds=30)
    for _ in range(10):  # bounded: each round drives the job as far as it goes
        runner.run_once()
        job = store.get_job(job.id)
        if job.status in states.TERMINAL_JOB_STATUSES:
            return job
    raise AssertionError(f"job did not finish: {job}")


def first(name):
    """The recording's first exchange: the step's own look-up before it creates anything."""
    return load(name, VALUES)[:1]


def methods(transport):
    return [(r.method, r.path.removeprefix(RG_ID)) for r in transport.requests if r.method != "GET"]


def test_deploy_process_server_sends_cloud_init_that_never_enters_params(store, transport, compute_for):
    secret = "correct-horse-battery-staple"
    cloud_init = steps.process_server_cloud_init(
        config_server="10.1.0.4:443", passphrase=secret, install_command="pip install siterecovery"
    )
    kind = steps.deploy_process_server_kind(compute_for, lambda ctx: cloud_init)
    params = {
        "nic": {"name": "web1-nic0", "private_ip": "10.1.2.10"},
        "vm": {
            "name": "web1",
            "size": "Standard_D2s_v3",
            "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
            "admin_username": "sradmin",
            "ssh_public_key": "ssh-ed25519 AAAAC3Nza test",
        },
    }
    transport.queue(first("nic_create") + load("nic_create", VALUES))
    transport.queue(first("vm_create") + load("vm_create", VALUES))
    job = run(store, kind, params)
    assert job.status == states.SUCCEEDED, job.error_message
    import base64

    vm_put = [r for r in transport.requests if r.method == "PUT"][-1]
    sent = base64.b64decode(vm_put.body["properties"]["osProfile"]["customData"]).decode()
    assert sent.startswith("#cloud-config\n") and "permissions: '0600'" in sent and secret in sent
    assert "--passphrase-file /etc/siterecovery/passphrase" in sent
    stored = store.get_job(job.id)
    assert secret not in repr(stored.params) and all(secret not in (s.message + repr(s.output)) for s in stored.steps)
