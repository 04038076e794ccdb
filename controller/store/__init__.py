"""The configuration server's state store: one interface, SQLite and PostgreSQL behind it.

`open_store(url)` is the way in; `base` has the records and the interface.
"""

from siterecovery.controller.store.base import (
    ROLES,
    JobRecord,
    MachineRecord,
    PairRecord,
    PairReport,
    ServerRecord,
    StepRecord,
    Store,
    TagRequestRecord,
    VcenterInventory,
    VcenterRecord,
)
from siterecovery.controller.store.sql import SqlStore, open_store

__all__ = [
    "ROLES",
    "JobRecord",
    "MachineRecord",
    "PairRecord",
    "PairReport",
    "ServerRecord",
    "SqlStore",
    "StepRecord",
    "Store",
    "TagRequestRecord",
    "VcenterInventory",
    "VcenterRecord",
    "open_store",
]
