"""An Azure site: where failed-over machines run, and the credential to reach it.

`AzureSite` holds the non-secret settings (subscription, tenant, service
principal client id, resource group, region, virtual network and subnet,
storage account and container). The service principal's secret is a separate
`ClientSecret`, which never shows in a repr, a str or a log line; it is read
from a file (`ClientSecret.from_file`) and handed only to azure-identity's
`ClientSecretCredential` (`make_credential`). Storing it encrypted is the
store's job (issue 5 wiring); nothing here writes it anywhere.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.common.errors import InvalidInput

_RESOURCE_GROUP = re.compile(r"[-\w._()]{1,90}")
_STORAGE_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,78}[A-Za-z0-9_]?")
_REGION = re.compile(r"[a-z0-9]{2,40}")


def _guid(name: str, value: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise InvalidInput(
            f"{name} {value!r} is not a GUID",
            hint=f"copy the {name} from the Azure portal (it looks like 00000000-0000-0000-0000-000000000000)",
            code="azure-settings",
        ) from None


def _match(name: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
    if not pattern.fullmatch(value):
        raise InvalidInput(f"{name} {value!r} is not valid: {rule}", code="azure-settings")


@dataclass(frozen=True)
class AzureSite:
    """Everything about an Azure site except the secret."""

    subscription_id: str
    tenant_id: str
    client_id: str
    resource_group: str
    region: str
    vnet: str
    subnet: str
    storage_account: str
    container: str = "siterecovery"
    # The network may live in another resource group than the VMs.
    vnet_resource_group: str = ""
    # Blob endpoint override (sovereign clouds, or the emulator in tests); empty = public cloud.
    blob_endpoint: str = ""
    # An isolated subnet of `vnet` where test failovers put their VMs; empty: test failover refused.
    test_subnet: str = ""

    def __post_init__(self) -> None:
        _guid("subscription id", self.subscription_id)
        _guid("tenant id", self.tenant_id)
        _guid("client id", self.client_id)
        for name, value in (("resource group", self.resource_group), ("vnet resource group", self.vnet_resource_group)):
            if value or name == "resource group":
                _match(name, value, _RESOURCE_GROUP, "1-90 letters, digits, '-', '_', '.', '(' or ')'")
        _match("region", self.region, _REGION, "a region name such as westeurope (lower case, no spaces)")
        _match("virtual network", self.vnet, _NAME, "2-64 letters, digits, '-', '_' or '.'")
        _match("subnet", self.subnet, _NAME, "1-80 letters, digits, '-', '_' or '.'")
        if self.blob_endpoint:
            endpoint = urllib.parse.urlsplit(self.blob_endpoint)
            local = endpoint.scheme == "http" and endpoint.hostname in ("127.0.0.1", "localhost", "::1")
            if not (endpoint.scheme == "https" or local) or not endpoint.hostname or endpoint.query:
                raise InvalidInput(
                    f"blob endpoint {self.blob_endpoint!r} is not valid: an https URL "
                    "(plain http only for an emulator on this host)", code="azure-settings",
                )
        if self.test_subnet:
            _match("test subnet", self.test_subnet, _NAME, "1-80 letters, digits, '-', '_' or '.'")
            if self.test_subnet == self.subnet:
                raise InvalidInput(
                    f"the test subnet must not be the production subnet {self.subnet}",
                    hint="name an isolated subnet of the same network (a test VM must not meet production)",
                    code="azure-settings",
                )
        _match("storage account", self.storage_account, _STORAGE_ACCOUNT, "3-24 lower-case letters and digits")
        _match("container", self.container, _CONTAINER, "3-63 lower-case letters, digits and single '-'")

    @property
    def resource_group_id(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"

    @property
    def subnet_id(self) -> str:
        group = self.vnet_resource_group or self.resource_group
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{group}"
            f"/providers/Microsoft.Network/virtualNetworks/{self.vnet}/subnets/{self.subnet}"
        )

    @property
    def storage_account_id(self) -> str:
        return f"{self.resource_group_id}/providers/Microsoft.Storage/storageAccounts/{self.storage_account}"

    @property
    def account_url(self) -> str:
        return self.blob_endpoint or f"https://{self.storage_account}.blob.core.windows.net"

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class ClientSecret:
    """A service principal's secret; shows as *** everywhere except `reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise InvalidInput("the client secret is empty", hint="put the secret alone in the secret file", code="azure-secret")
        self._value = value

    @classmethod
    def from_file(cls, path: Path) -> ClientSecret:
        """Read the secret from a file that only its owner may read (0600 or stricter)."""
        try:
            mode = os.stat(path).st_mode
            text = Path(path).read_text()
        except FileNotFoundError:
            raise InvalidInput(f"secret file {path} does not exist", code="azure-secret") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InvalidInput(
                f"secret file {path} may be read by others (mode {stat.S_IMODE(mode):04o})",
                hint=f"chmod 600 {path}, then retry",
                code="azure-secret",
            )
        return cls(text)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ClientSecret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientSecret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # no pickling a secret into a queue or a file by accident
        raise TypeError("a ClientSecret cannot be pickled")


def make_credential(site: AzureSite, secret: ClientSecret, **kwargs: Any) -> Any:
    """The service principal's credential (azure-identity), for every Azure client we build."""
    from azure.identity import ClientSecretCredential

    return ClientSecretCredential(site.tenant_id, site.client_id, secret.reveal(), **kwargs)
