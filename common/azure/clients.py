"""Building the storage clients the page-blob code uses.

SDK retries are off (`retry_total=0`): `errors.call` is the one retry loop,
so waits honour `Retry-After` under our policy and are never doubled.
`transport` lets tests route requests through a transport of their own.
"""

from __future__ import annotations

from typing import Any

from azure.storage.blob import ContainerClient

from siterecovery.common.azure.site import AzureSite


def container_client(site: AzureSite, credential: Any, *, transport: Any = None, **kwargs: Any) -> ContainerClient:
    """The site's blob container (where disk blobs live), authenticated by `credential`.

    `credential` is a token credential (`site.make_credential`) in production;
    shared-key dicts and SAS strings work too (the emulator uses a shared key).
    """
    extra: dict[str, Any] = {"retry_total": 0, **kwargs}
    if transport is not None:
        extra["transport"] = transport
    return ContainerClient(site.account_url, site.container, credential=credential, **extra)
