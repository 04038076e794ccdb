"""The process server's Azure Storage credential file: refused unless private, never quoted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.agents.process_server.azure_storage import StorageCredentialFile, redact
from siterecovery.agents.settings import ProcessServerSettings
from siterecovery.common import errors, settings

KEY = "c2VjcmV0LWtleS1ub3QtcmVhbA=="
CONN = f"DefaultEndpointsProtocol=https;AccountName=srdrstore;AccountKey={KEY};EndpointSuffix=core.windows.net"


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "azure.conn"
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_a_private_file_gives_the_account_and_a_client_for_it(tmp_path):
    storage = StorageCredentialFile(_file(tmp_path, CONN))
    assert storage.check() == "srdrstore"
    client = storage.container("srdrstore", "replicas")
    assert (client.account_name, client.container_name) == ("srdrstore", "replicas")
    assert KEY not in repr(storage)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_others_may_read_is_refused_with_the_fix(tmp_path, mode):
    path = _file(tmp_path, CONN, mode)
    with pytest.raises(errors.InvalidInput) as caught:
        StorageCredentialFile(path).check()
    assert caught.value.code == "azure-storage-credential-mode"
    assert f"{mode:04o}" in caught.value.message and f"chmod 600 {path}" in caught.value.hint
    assert KEY not in str(caught.value)


@pytest.mark.parametrize("text", ["", "not a connection string", f"AccountKey={KEY}"])
def test_a_file_without_a_connection_string_is_refused_without_quoting_it(tmp_path, text):
    with pytest.raises(errors.InvalidInput) as caught:
        StorageCredentialFile(_file(tmp_path, text)).check()
    assert caught.value.code == "azure-storage-credential"
    assert KEY not in str(caught.value) and KEY not in caught.value.hint
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_missing_file_and_another_account_are_refused(tmp_path):
    with pytest.raises(errors.InvalidInput, match="does not exist"):
        StorageCredentialFile(tmp_path / "nope").check()
    with pytest.raises(errors.PreconditionFailed) as caught:
        StorageCredentialFile(_file(tmp_path, CONN)).container("otheraccount", "replicas")
    assert caught.value.code == "azure-storage-account-mismatch"


def test_redact_hides_sas_signatures_and_account_keys():
    text = f"url: /c/b?comp=page&sv=2024-01-01&sig=abc%2Fdef%3D&se=x ({CONN})"
    cleaned = redact(text)
    assert "abc%2Fdef" not in cleaned and KEY not in cleaned
    assert "sig=***" in cleaned and "AccountKey=***" in cleaned and "comp=page" in cleaned


def test_the_setting_is_declared(tmp_path):
    config = tmp_path / "ps.toml"
    config.write_text(f'server = "cs:443"\nazure_storage_connection_string_file = "{tmp_path}/azure.conn"\n')
    loaded = settings.load(ProcessServerSettings, config)
    assert loaded.azure_storage_connection_string_file == tmp_path / "azure.conn"
