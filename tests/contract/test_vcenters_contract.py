"""The vCenter part of the store contract: endpoints, discovery bookkeeping, inventories."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common.errors import Conflict, InvalidInput, NotFound
from siterecovery.controller.store import Store, VcenterRecord

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def vcenter(vid: str = "vc-1", name: str = "vc01", host: str = "vc01.example", **kw) -> VcenterRecord:
    values = {
        "id": vid,
        "name": name,
        "host": host,
        "port": 443,
        "username": "svc-dr@vsphere.local",
        "secret": "v1:ciphertext",
        "trust": {"ca_pem": "", "thumbprint": "AB" * 32, "insecure": False},
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(kw)
    return VcenterRecord(**values)


def test_add_get_list_round_trip(store: Store) -> None:
    added = store.add_vcenter(vcenter())
    assert added == vcenter()
    assert store.get_vcenter("vc01") == added == store.get_vcenter("vc-1")
    store.add_vcenter(vcenter("vc-0", "a-first", "esx1.example"))
    assert [v.name for v in store.list_vcenters()] == ["a-first", "vc01"]
    assert "ciphertext" not in repr(added)


@pytest.mark.parametrize(
    "clash",
    [
        {"vid": "vc-1", "name": "other", "host": "h2"},
        {"vid": "vc-2", "name": "vc01", "host": "h2"},
        {"vid": "vc-2", "name": "other", "host": "vc01.example"},
    ],
)
def test_same_id_name_or_address_is_a_conflict(store: Store, clash: dict) -> None:
    store.add_vcenter(vcenter())
    with pytest.raises(Conflict):
        store.add_vcenter(vcenter(**clash))
    assert len(store.list_vcenters()) == 1


@pytest.mark.parametrize("bad", [{"name": ""}, {"host": ""}, {"port": 0}, {"username": ""}, {"secret": ""}])
def test_bad_endpoint_is_refused_and_nothing_stored(store: Store, bad: dict) -> None:
    with pytest.raises(InvalidInput):
        store.add_vcenter(replace(vcenter(), **bad))
    assert store.list_vcenters() == []


def test_update_credentials_and_remove(store: Store) -> None:
    store.add_vcenter(vcenter())
    later = T0 + timedelta(hours=1)
    updated = store.update_vcenter_credentials(
        "vc01", username="new@vsphere.local", secret="v1:other", now=later
    )
    assert (updated.username, updated.secret, updated.updated_at) == ("new@vsphere.local", "v1:other", later)
    with pytest.raises(InvalidInput):
        store.update_vcenter_credentials("vc01", username="", secret="x", now=later)
    with pytest.raises(NotFound):
        store.update_vcenter_credentials("nope", username="u", secret="x", now=later)
    store.record_discovery("vc-1", now=later, document={"vms": []})
    store.remove_vcenter("vc01")
    assert store.list_vcenters() == []
    with pytest.raises(NotFound):
        store.get_vcenter_inventory("vc-1")
    with pytest.raises(NotFound):
        store.remove_vcenter("vc01")


def test_request_discovery_is_compare_and_set(store: Store) -> None:
    store.add_vcenter(vcenter())
    interval = timedelta(minutes=15)
    assert store.request_discovery("vc-1", due_before=T0 - interval, now=T0)
    assert not store.request_discovery("vc-1", due_before=T0 + timedelta(minutes=1) - interval, now=T0)
    later = T0 + interval + timedelta(seconds=1)
    assert store.request_discovery("vc-1", due_before=later - interval, now=later)
    assert store.request_discovery("vc-1", due_before=None, now=later)  # on demand: always
    assert store.get_vcenter("vc01").discovery_requested_at == later
    with pytest.raises(NotFound):
        store.request_discovery("nope", due_before=None, now=T0)


def test_record_discovery_keeps_the_last_good_inventory(store: Store) -> None:
    store.add_vcenter(vcenter())
    with pytest.raises(NotFound):
        store.get_vcenter_inventory("vc01")
    doc = {"api_type": "VirtualCenter", "vms": [{"name": "web01", "disks": [{"capacity": 2**40}]}]}
    ok = store.record_discovery("vc-1", now=T0, document=doc)
    assert (ok.discovery_status, ok.discovered_at, ok.discovery_error) == ("ok", T0, "")
    failed = store.record_discovery("vc-1", now=T0 + timedelta(minutes=15), error="connection refused")
    assert (failed.discovery_status, failed.discovered_at, failed.discovery_error) == (
        "failed",
        T0,
        "connection refused",
    )
    inventory = store.get_vcenter_inventory("vc01")
    assert inventory.document == doc and inventory.discovered_at == T0
    with pytest.raises(InvalidInput):
        store.record_discovery("vc-1", now=T0, document=doc, error="both")
    with pytest.raises(InvalidInput):
        store.record_discovery("vc-1", now=T0)
