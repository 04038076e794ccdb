"""Azure job kinds as the configuration server wires them: the site and its secret come
from a real SQLite store at step time, the passphrase from the vault, and the real
JobRunner drives the real SDK clients over recorded responses.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from siterecovery.common import errors
from siterecovery.common.azure.site import ClientSecret
from siterecovery.controller import azure_sites
from siterecovery.controller.enrollment import PassphraseVault
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import JobRunner, registry
from siterecovery.controller.providers.azure import steps
from siterecovery.controller.secrets import SecretBox
from siterecovery.controller.store import open_store
from tests.azure_replay import ReplayTransport, load
from tests.unit.azure.test_compute import SITE, VALUES, StaticToken

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "sp-secret-that-must-stay-secret"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx test@example"


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


@pytest.fixture
def box(tmp_path):
    return SecretBox.load_or_create(tmp_path)


@pytest.fixture
def vault(tmp_path):
    v = PassphraseVault(tmp_path / "passphrase.json")
    v.load_or_create()
    return v


@pytest.fixture
def transport():
    t = ReplayTransport()
    yield t
    assert t.done, f"recorded responses left unused: {[e['request'] for e in t.exchanges]}"


class Credentials:
    """The connector's credential factory: records which secret each step was given."""

    def __init__(self) -> None:
        self.secrets: list[str] = []

    def __call__(self, site, secret: ClientSecret):
        self.secrets.append(secret.reveal())
        return StaticToken()


@pytest.fixture
def credentials():
    return Credentials()


@pytest.fixture
def kinds(box, vault, transport, credentials):
    connector = azure_sites.AzureConnector(
        transport=transport, credential=credentials, polling_interval=0, sleep=transport.sleep
    )
    return registry(azure_sites.kinds(box, vault, connector))


def run(store, kinds, job):
    runner = JobRunner(store, kinds=list(kinds.values()), lease_seconds=30)
    for _ in range(10):  # bounded: each round drives the job as far as it goes
        runner.run_once()
        job = store.get_job(job.id)
        if job.status in states.TERMINAL_JOB_STATUSES:
            return job
    raise AssertionError(f"job did not finish: {job}")


def deployment(**kw) -> azure_sites.ProcessServerDeployment:
    values = {
        "site": "dr-west",
        "name": "web1",
        "subnet": "infra",
        "private_ip": "10.1.2.10",
        "ssh_public_key": SSH_KEY,
        "config_server": "cs.example:443",
    }
    values.update(kw)
    return azure_sites.ProcessServerDeployment(**values)


def first(name):
    return load(name, VALUES)[:1]


def test_the_secret_is_stored_encrypted_and_bound_to_its_site(store, box):
    record = azure_sites.add(store, box, "dr-west", SITE, ClientSecret(SECRET), now=NOW)
    assert SECRET not in record.secret and SECRET not in repr(record)
    assert azure_sites.site_of(record) == SITE
    assert azure_sites.secret_of(record, box).reveal() == SECRET
    # Copied onto another row, the ciphertext does not decrypt.
    with pytest.raises(errors.Integrity):
        azure_sites.secret_of(replace(record, id="other"), box)


def test_bad_input_and_duplicates_change_nothing(store, box):
    azure_sites.add(store, box, "dr-west", SITE, ClientSecret(SECRET), now=NOW)
    with pytest.raises(errors.Conflict):
        azure_sites.add(store, box, "dr-west", SITE, ClientSecret("other"), now=NOW)
    with pytest.raises(errors.InvalidInput):
        azure_sites.add(store, box, "bad name", SITE, ClientSecret(SECRET), now=NOW)
    with pytest.raises(errors.InvalidInput):
        azure_sites.update_credentials(store, box, "dr-west", "not-a-guid", ClientSecret("new"), now=NOW)
    [only] = store.list_azure_sites()
    assert azure_sites.secret_of(only, box).reveal() == SECRET and only.settings == SITE.to_dict()


def test_deploy_process_server_reads_site_secret_and_passphrase_at_step_time(
    store, box, vault, kinds, transport, credentials
):
    azure_sites.add(store, box, "dr-west", SITE, ClientSecret("old-secret"), now=NOW)
    job = azure_sites.deploy_process_server(store, kinds[steps.DEPLOY_PROCESS_SERVER], deployment(), now=NOW)
    # Rotated after the job was created: the step must use what is current when it runs.
    azure_sites.update_credentials(store, box, "dr-west", "", ClientSecret(SECRET), now=NOW)
    passphrase = vault.rotate()

    transport.queue(first("nic_create") + load("nic_create", VALUES))
    transport.queue(first("vm_create") + load("vm_create", VALUES))
    job = run(store, kinds, job)

    assert job.status == states.SUCCEEDED, job.error_message
    assert credentials.secrets and set(credentials.secrets) == {SECRET}
    nic_put, vm_put = [r for r in transport.requests if r.method == "PUT"]
    subnet_id = nic_put.body["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
    assert subnet_id == replace(SITE, subnet="infra").subnet_id
    assert nic_put.body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"] == "10.1.2.10"
    cloud_init = base64.b64decode(vm_put.body["properties"]["osProfile"]["customData"]).decode()
    assert passphrase in cloud_init and "--server cs.example:443" in cloud_init
    assert vm_put.body["tags"]["sr-role"] == "process-server"
    # The default image: Ubuntu 24.04 LTS, whose Python meets requires-python.
    assert vm_put.body["properties"]["storageProfile"]["imageReference"] == {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
    stored = store.get_job(job.id)
    assert stored.params["site_id"] == store.get_azure_site("dr-west").id
    for text in (repr(stored.params), *(s.message + repr(s.output) for s in stored.steps)):
        assert passphrase not in text and SECRET not in text


def test_a_job_whose_site_was_removed_fails_with_not_found_and_calls_nothing(store, box, kinds, transport):
    azure_sites.add(store, box, "dr-west", SITE, ClientSecret(SECRET), now=NOW)
    job = azure_sites.deploy_process_server(store, kinds[steps.DEPLOY_PROCESS_SERVER], deployment(), now=NOW)
    with pytest.raises(errors.Conflict) as caught:  # an active job uses it
        azure_sites.remove(store, "dr-west")
    assert caught.value.code == "azure-site-in-use"
    # A job that outlives its site (created on another replica in the window): a clear failure.
    site_id = store.get_azure_site("dr-west").id
    store.remove_azure_site(site_id)
    job = run(store, kinds, job)
    assert job.status in (states.FAILED, states.COMPENSATED)
    assert job.error_code == "azure-site-not-found"
    assert transport.requests == []


@pytest.mark.parametrize(
    "bad, code",
    [
        ({"private_ip": "10.1.2"}, "azure-deploy-invalid"),
        ({"private_ip": "127.0.0.1"}, "azure-deploy-invalid"),
        ({"name": "web_1!"}, "azure-deploy-invalid"),
        ({"subnet": "has space"}, "azure-settings"),
        ({"ssh_public_key": "not a key"}, "azure-deploy-invalid"),
        ({"size": "4 cores"}, "azure-deploy-invalid"),
        ({"config_server": ""}, "azure-deploy-invalid"),
    ],
)
def test_a_bad_deployment_request_starts_nothing(store, box, kinds, bad, code):
    azure_sites.add(store, box, "dr-west", SITE, ClientSecret(SECRET), now=NOW)
    with pytest.raises(errors.InvalidInput) as caught:
        azure_sites.deploy_process_server(store, kinds[steps.DEPLOY_PROCESS_SERVER], deployment(**bad), now=NOW)
    assert caught.value.code == code
    assert store.list_jobs() == []


def test_a_second_deployment_of_the_same_vm_is_a_conflict(store, box, kinds):
    azure_sites.add(store, box, "dr-west", SITE, ClientSecret(SECRET), now=NOW)
    kind = kinds[steps.DEPLOY_PROCESS_SERVER]
    first_job = azure_sites.deploy_process_server(store, kind, deployment(), now=NOW)
    with pytest.raises(errors.Conflict) as caught:
        azure_sites.deploy_process_server(store, kind, deployment(private_ip="10.1.2.11"), now=NOW)
    assert first_job.id in caught.value.message
    with pytest.raises(errors.NotFound):
        azure_sites.deploy_process_server(store, kind, deployment(site="nope"), now=NOW)
    assert [j.id for j in store.list_jobs()] == [first_job.id]


def test_a_refused_credential_names_the_command_that_replaces_it():
    from azure.core.exceptions import ClientAuthenticationError

    from siterecovery.common.azure.errors import translate

    error = translate("read VM web1", ClientAuthenticationError("AADSTS7000215: Invalid client secret provided."))
    assert isinstance(error, errors.Unauthenticated) and error.code == "azure-unauthenticated"
    assert "srctl azure update-credentials" in error.hint


def test_the_workflows_get_the_sites_container_with_its_secret_at_each_call(store, box):
    record = azure_sites.add(store, box, "dr-west", replace(SITE, container="replicas"), ClientSecret(SECRET), now=NOW)
    seen: list[str] = []

    def storage_credential(site, secret):
        seen.append(secret.reveal())
        return {"account_name": site.storage_account, "account_key": base64.b64encode(b"k" * 32).decode()}

    clients = azure_sites.SiteClients(box, azure_sites.AzureConnector(storage_credential=storage_credential))
    container = clients.container(record)
    assert (container.account_name, container.container_name) == (SITE.storage_account, "replicas")
    assert container.url == f"https://{SITE.storage_account}.blob.core.windows.net/replicas"
    assert seen == [SECRET]


def test_the_only_azure_job_kind_is_the_process_server_deployment(box, vault):
    kinds = registry(azure_sites.kinds(box, vault))
    assert list(kinds) == [steps.DEPLOY_PROCESS_SERVER]
    assert [s.name for s in kinds[steps.DEPLOY_PROCESS_SERVER].steps] == ["create-nic", "create-vm"]
