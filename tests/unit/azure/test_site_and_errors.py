"""Azure site settings, the secret that never shows, the VHD footer, error mapping."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime

import pytest
import structlog
from azure.core.exceptions import ServiceRequestError

from siterecovery.common import errors
from siterecovery.common.azure import vhd
from siterecovery.common.azure.errors import AzureRetryPolicy, call
from siterecovery.common.azure.site import AzureSite, ClientSecret, make_credential
from siterecovery.common.logging import configure
from tests.unit.azure.test_compute import SITE


def test_site_ids_and_validation():
    assert SITE.subnet_id == (
        f"/subscriptions/{SITE.subscription_id}/resourceGroups/rg-dr"
        "/providers/Microsoft.Network/virtualNetworks/vnet-dr/subnets/workloads"
    )
    assert SITE.storage_account_id.endswith("/providers/Microsoft.Storage/storageAccounts/srdrstore")
    with pytest.raises(errors.InvalidInput, match="subscription id 'nope' is not a GUID"):
        AzureSite(**{**SITE.to_dict(), "subscription_id": "nope"})
    with pytest.raises(errors.InvalidInput, match="storage account"):
        AzureSite(**{**SITE.to_dict(), "storage_account": "Has_Upper"})


def test_secret_never_shows(tmp_path):
    path = tmp_path / "secret"
    path.write_text("s3cr3t-value\n")
    path.chmod(0o644)
    with pytest.raises(errors.InvalidInput, match="chmod 600"):
        ClientSecret.from_file(path)
    path.chmod(0o600)
    secret = ClientSecret.from_file(path)
    assert secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret) and "s3cr3t" not in f"{secret}"
    credential = make_credential(SITE, secret)
    assert "s3cr3t" not in repr(credential)
    stream = io.StringIO()
    configure(json=True, stream=stream)
    try:
        structlog.get_logger("t").info("azure site added", site=SITE.to_dict(), client_secret=secret.reveal(), s=secret)
    finally:
        structlog.reset_defaults()
    assert "s3cr3t" not in stream.getvalue()
    assert json.loads(stream.getvalue())["site"]["client_id"] == SITE.client_id


def test_vhd_footer_is_fixed_and_checksummed():
    footer = vhd.footer(10 * vhd.MiB, uuid.UUID(int=1), datetime(2025, 1, 1, tzinfo=UTC))
    assert len(footer) == 512 and footer[:8] == b"conectix"
    assert vhd.parse(footer) == {"current_size": 10 * vhd.MiB, "disk_type": vhd.FIXED, "checksum_ok": 1}
    assert vhd.parse(footer[:100] + b"\x01" + footer[101:])["checksum_ok"] == 0
    assert vhd.virtual_size(10 * vhd.MiB + 512) == 11 * vhd.MiB
    # the specification's worked limits: a small disk gets 17 sectors per track and at least 4 heads
    assert vhd.geometry(10 * vhd.MiB) == (301, 4, 17)
    with pytest.raises(ValueError):
        vhd.footer(vhd.MiB + 512, uuid.UUID(int=1), datetime.now(UTC))


def test_connection_failures_are_retried_then_unavailable():
    slept: list[float] = []

    def broken():
        raise ServiceRequestError("connection refused")

    with pytest.raises(errors.Unavailable) as caught:
        call("read VM web1", broken, AzureRetryPolicy(max_attempts=3, initial_backoff=1, max_backoff=8), sleep=slept.append)
    assert slept == [1, 2]
    assert caught.value.retryable and "after 3 attempts" in caught.value.message


def test_policy_is_validated():
    with pytest.raises(errors.InvalidInput):
        AzureRetryPolicy(max_attempts=0)
    with pytest.raises(errors.InvalidInput):
        AzureRetryPolicy(initial_backoff=5, max_backoff=1)
