"""The Azure part of the store contract: sites, their encrypted secret, and removal while in use."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.jobs import states
from siterecovery.controller.store import AzureSiteRecord, MachineRecord, PairRecord, ServerRecord, Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SETTINGS = {
    "subscription_id": "11111111-2222-3333-4444-555555555555",
    "tenant_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    "client_id": "99999999-8888-7777-6666-555555555555",
    "resource_group": "rg-dr",
    "region": "westeurope",
    "vnet": "vnet-dr",
    "subnet": "workloads",
    "storage_account": "srdrstore",
    "container": "siterecovery",
    "vnet_resource_group": "",
    "blob_endpoint": "",
}


def azure_site(sid: str = "az-1", name: str = "dr-west", **kw) -> AzureSiteRecord:
    values = {
        "id": sid,
        "name": name,
        "settings": dict(SETTINGS),
        "secret": "v1:ciphertext",
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(kw)
    return AzureSiteRecord(**values)


def test_add_get_list_round_trip(store: Store) -> None:
    added = store.add_azure_site(azure_site())
    assert added == azure_site()
    assert store.get_azure_site("dr-west") == added == store.get_azure_site("az-1")
    store.add_azure_site(azure_site("az-0", "a-first"))
    assert [s.name for s in store.list_azure_sites()] == ["a-first", "dr-west"]
    assert "ciphertext" not in repr(added)


@pytest.mark.parametrize("clash", [{"sid": "az-1", "name": "other"}, {"sid": "az-2", "name": "dr-west"}])
def test_same_id_or_name_is_a_conflict_and_changes_nothing(store: Store, clash: dict) -> None:
    store.add_azure_site(azure_site())
    with pytest.raises(Conflict) as caught:
        store.add_azure_site(azure_site(**clash, secret="v1:other"))
    assert caught.value.code == "azure-site-exists"
    assert store.list_azure_sites() == [azure_site()]


@pytest.mark.parametrize("bad", [{"name": ""}, {"id": ""}, {"secret": ""}, {"settings": {"x": {1, 2}}}])
def test_bad_site_is_refused_and_nothing_stored(store: Store, bad: dict) -> None:
    with pytest.raises(InvalidInput):
        store.add_azure_site(replace(azure_site(), **bad))
    assert store.list_azure_sites() == []


def test_update_credentials_replaces_client_id_and_secret_only(store: Store) -> None:
    store.add_azure_site(azure_site())
    later = T0 + timedelta(hours=1)
    new_client = "12345678-1234-1234-1234-123456789abc"
    updated = store.update_azure_site_credentials("dr-west", client_id=new_client, secret="v1:new", now=later)
    assert updated.secret == "v1:new" and updated.updated_at == later and updated.created_at == T0
    assert updated.settings == {**SETTINGS, "client_id": new_client}
    assert store.get_azure_site("az-1") == updated
    with pytest.raises(InvalidInput):
        store.update_azure_site_credentials("dr-west", client_id=new_client, secret="", now=later)
    with pytest.raises(NotFound):
        store.update_azure_site_credentials("nope", client_id=new_client, secret="v1:x", now=later)
    assert store.get_azure_site("az-1") == updated


def test_remove_and_not_found(store: Store) -> None:
    store.add_azure_site(azure_site())
    store.remove_azure_site("dr-west")
    assert store.list_azure_sites() == []
    with pytest.raises(NotFound) as caught:
        store.get_azure_site("dr-west")
    assert caught.value.code == "azure-site-not-found"
    with pytest.raises(NotFound):
        store.remove_azure_site("az-1")


def test_a_site_an_active_job_uses_is_not_removed(store: Store) -> None:
    store.add_azure_site(azure_site())
    store.add_azure_site(azure_site("az-2", "other"))
    job = store.create_job(
        kind="azure-deploy-process-server", target="web1", step_names=["a"], params={"site_id": "az-1"}, now=T0
    )
    # Another kind, or a job of another site, does not count.
    store.create_job(kind="discover-vcenter", target="x", step_names=["a"], params={"site_id": "az-1"}, now=T0)
    with pytest.raises(Conflict) as caught:
        store.remove_azure_site("dr-west", unless_used_by_kinds={"azure-deploy-process-server"})
    assert caught.value.code == "azure-site-in-use" and job.id in caught.value.message
    assert [s.name for s in store.list_azure_sites()] == ["dr-west", "other"]
    store.remove_azure_site("other", unless_used_by_kinds={"azure-deploy-process-server"})
    # Once the job has finished, the site can go.
    assert store.set_job_status(job.id, expected={states.PENDING}, new=states.CANCELLED, now=T0)
    store.remove_azure_site("dr-west", unless_used_by_kinds={"azure-deploy-process-server"})
    assert store.list_azure_sites() == []


def test_a_site_holding_a_pairs_page_blob_is_not_removed(store: Store) -> None:
    store.add_server(
        ServerRecord(id="src-1", role="source", hostname="src-1", cert_serial="01", cert_fingerprint="sha256:00", enrolled_at=T0)
    )
    store.add_server(
        ServerRecord(id="ps-1", role="process-server", hostname="ps-1", cert_serial="02", cert_fingerprint="sha256:01", enrolled_at=T0)
    )
    store.upsert_machine(MachineRecord(id="src-1", server_id="src-1", hostname="web1", os="Linux"))
    store.add_azure_site(azure_site())
    store.add_azure_site(azure_site("az-2", "other"))
    store.create_pair(
        PairRecord(
            id="pair-1", machine_id="src-1", source_server_id="src-1", disk_name="disk0", disk_identity="d0",
            disk_size_bytes=2**30, mode="nbd", process_server_id="ps-1", master_target_id="ps-1",
            target_path="https://srdrstore.blob.core.windows.net/siterecovery/web1-src-1/disk0.vhd", journal_dir="",
            created_at=T0, updated_at=T0, target_kind="azure-page-blob",
            target_options={"azure_site_id": "az-1", "blob_name": "web1-src-1/disk0.vhd"},
        )
    )
    with pytest.raises(Conflict) as caught:
        store.remove_azure_site("dr-west")
    assert caught.value.code == "azure-site-in-use" and "pair-1" in caught.value.message
    store.remove_azure_site("other")  # a site no pair uses goes
    store.delete_pair("pair-1")
    store.remove_azure_site("dr-west")
    assert store.list_azure_sites() == []
