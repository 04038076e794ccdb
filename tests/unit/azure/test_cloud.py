"""The cloud side's pure parts: VM UUID forms, names, and the Azure site settings it relies on."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from siterecovery.common import errors
from siterecovery.controller.protection import cloud
from tests.unit.azure.test_compute import SITE


def test_a_vm_id_matches_in_both_byte_orders() -> None:
    vm_id = "0f47b100-583c-48e3-a4c0-aefc2c9bbcc1"
    swapped = str(uuid.UUID(bytes_le=uuid.UUID(vm_id).bytes))
    assert swapped == "00b1470f-3c58-e348-a4c0-aefc2c9bbcc1"
    assert cloud.uuid_forms(vm_id) == cloud.uuid_forms(swapped.upper()) == {vm_id, swapped}
    assert cloud.uuid_forms("") == set()
    assert cloud.uuid_forms("not-a-uuid") == {"not-a-uuid"}


def test_resource_and_copy_names() -> None:
    assert cloud.azure_name("app01", "disk 0/x") == "app01-disk-0-x"
    assert len(cloud.azure_name("a" * 70, "b" * 30)) == 80
    assert cloud.copy_name("h-1/disk0.vhd", "od/1", test=False) == "h-1/disk0-failover-od%2F1.vhd"
    assert cloud.copy_name("h-1/disk0.vhd", "t1", test=True) == "h-1/disk0-test-t1.vhd"


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ({"test_subnet": "isolated"}, True),
        ({"test_subnet": SITE.subnet}, False),  # a test VM must not join production
        ({"test_subnet": "bad name!"}, False),
        ({"blob_endpoint": "https://acct.blob.core.chinacloudapi.cn"}, True),
        ({"blob_endpoint": "http://127.0.0.1:10000/devstoreaccount1"}, True),
        ({"blob_endpoint": "http://storage.example.com"}, False),  # plain http only on this host
        ({"blob_endpoint": "ftp://x"}, False),
    ],
)
def test_site_settings_for_test_failover_and_endpoints(change: dict, accepted: bool) -> None:
    if accepted:
        assert getattr(dataclasses.replace(SITE, **change), next(iter(change))) == next(iter(change.values()))
    else:
        with pytest.raises(errors.InvalidInput) as raised:
            dataclasses.replace(SITE, **change)
        assert raised.value.code == "azure-settings"
