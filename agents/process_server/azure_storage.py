"""The process server's own credential for Azure Storage (forward protection to page blobs).

**Choice.** The process server writes the page blobs of azure-page-blob pairs
with a credential of its own, named by its setting
`azure_storage_connection_string_file`: a file holding one Azure Storage
connection string, readable by its owner only (0600 or stricter). A
connection string carries the blob endpoint and either an account key or a
SAS token, so the same setting serves Azurite in tests, an account key, or
(better in production) a SAS limited to the replica container with read,
add, create, write, delete and list permissions and an expiry the operator
rotates. The service principal secret of the Azure site never leaves the
configuration server: no heartbeat, assignment or log line carries a storage
credential, and the assignment names only the account, container and blob.

Why not azure-identity here: a process server in a DMZ or on premises often
has no managed identity, and a service principal secret on it would give it
the whole subscription's reach (the site's principal manages VMs), where a
SAS reaches one container.

The file is checked when the daemon starts (`check`: the daemon refuses to
start with a file others may read, or one that holds no connection string)
and read again at the start of every forwarding session (`container`), so a
rotated key or SAS takes effect without a restart. The connection string is
never logged, never put in an error message, and never kept longer than it
takes to build a client.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.common import errors

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient

SETTING = "azure_storage_connection_string_file"
# A SAS signature or an account key inside a URL or connection string (an SDK
# connection error quotes the request URL, SAS query included).
_SECRET_PARTS = re.compile(r"(?i)\b(sig|accountkey|sharedaccesssignature)=[^&;\s'\")]+")


def redact(text: str) -> str:
    """`text` with any SAS signature or account key replaced by ***."""
    return _SECRET_PARTS.sub(lambda m: f"{m.group(1)}=***", text)


class StorageCredentialFile:
    """A connection string file; `container(account, name)` builds a client from it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StorageCredentialFile({str(self.path)!r})"

    def _read(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise errors.InvalidInput(
                f"{SETTING} {self.path} does not exist",
                hint="put the storage account's connection string in that file (chmod 600)",
                code="azure-storage-credential",
            ) from None
        except OSError as exc:
            raise errors.InvalidInput(
                f"{SETTING} {self.path} cannot be read: {exc.strerror}",
                hint="it must be a regular file the process server's user owns and may read (chmod 600)",
                code="azure-storage-credential",
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise errors.InvalidInput(
                    f"{SETTING} {self.path} is not a regular file", code="azure-storage-credential"
                )
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise errors.InvalidInput(
                    f"{SETTING} {self.path} may be read by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                    "it holds a storage account key or SAS",
                    hint=f"chmod 600 {self.path}, then start the process server again",
                    code="azure-storage-credential-mode",
                )
            with os.fdopen(fd, "r", closefd=False) as handle:
                return handle.read().strip()
        finally:
            os.close(fd)

    def _client(self, container: str, **kwargs: Any) -> ContainerClient:
        # Imported here: the SDK is a third of the process server's start-up, and most
        # process servers (every one without an Azure pair) never need it.
        from azure.storage.blob import ContainerClient

        text = self._read()
        try:
            # SDK retries off: errors.call is the one retry loop (it honours Retry-After).
            return ContainerClient.from_connection_string(text, container, retry_total=0, **kwargs)
        except (ValueError, KeyError, TypeError):
            # The SDK's message could quote the string; ours never does.
            raise errors.InvalidInput(
                f"{SETTING} {self.path} does not hold an Azure Storage connection string",
                hint="it looks like DefaultEndpointsProtocol=https;AccountName=…;AccountKey=… "
                "or BlobEndpoint=https://…;SharedAccessSignature=…",
                code="azure-storage-credential",
            ) from None

    def check(self) -> str:
        """Refuse a file others may read or one without a connection string; the account it names."""
        return self._client("check").account_name or ""

    def container(self, account: str, container: str, **kwargs: Any) -> ContainerClient:
        """The container of a pair's blob, checked to be in the account the pair names."""
        client = self._client(container, **kwargs)
        if account and client.account_name != account:
            raise errors.PreconditionFailed(
                f"the pair's blob is in storage account {account}, but {SETTING} {self.path} "
                f"is for account {client.account_name}",
                hint="give this process server the connection string of the Azure site's storage account",
                code="azure-storage-account-mismatch",
            )
        return client


def with_storage_hint(exc: errors.SiteRecoveryError, storage: StorageCredentialFile) -> errors.SiteRecoveryError:
    """A refused storage credential is the process server's own, not the site's service principal."""
    if exc.code not in ("azure-unauthenticated", "azure-forbidden"):
        return exc
    out = type(exc)(
        exc.message.replace("the service principal", "the process server's storage credential"),
        hint=f"check the connection string in {storage.path} (the process server's {SETTING}): the account "
        "key may have been rotated, or the SAS expired or lacks read, add, create, write, delete or list "
        "permission on the container; the next attempt reads the file again",
        code=exc.code,
    )
    out.__cause__ = exc.__cause__
    return out


def redacted(exc: errors.SiteRecoveryError) -> errors.SiteRecoveryError:
    """`exc` with any SAS signature or account key in its message or hint replaced by ***, for a peer to see."""
    message, hint = redact(exc.message), redact(exc.hint or "")
    if message == exc.message and hint == (exc.hint or ""):
        return exc
    out = type(exc)(message, hint=hint, code=exc.code)
    out.__cause__ = exc.__cause__
    return out
