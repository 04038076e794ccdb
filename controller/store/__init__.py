"""The configuration server's state store: one interface, SQLite and PostgreSQL behind it.

`open_store(url)` is the way in; `base` has the records and the interface.
"""

from siterecovery.controller.store.base import (
    ROLES,
    AzureSiteRecord,
    ChangeCounters,
    Heartbeat,
    JobRecord,
    MachineRecord,
    OperatorRecord,
    PairRecord,
    PairReport,
    ProtectedItemRecord,
    ProtectionGroupRecord,
    RecoveryPlanRecord,
    ServerRecord,
    StepRecord,
    Store,
    TagRequestRecord,
    VcenterInventory,
    VcenterRecord,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from siterecovery.controller.store.sql import SqlStore, open_store


def __getattr__(name: str):
    """SQLAlchemy and alembic load only when a store is opened: `srctl`, which
    only needs the record types, starts half a second sooner."""
    if name in ("SqlStore", "open_store"):
        from siterecovery.controller.store import sql

        return getattr(sql, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ROLES",
    "AzureSiteRecord",
    "ChangeCounters",
    "Heartbeat",
    "JobRecord",
    "MachineRecord",
    "OperatorRecord",
    "PairRecord",
    "PairReport",
    "ProtectedItemRecord",
    "ProtectionGroupRecord",
    "RecoveryPlanRecord",
    "ServerRecord",
    "SqlStore",
    "StepRecord",
    "Store",
    "TagRequestRecord",
    "VcenterInventory",
    "VcenterRecord",
    "open_store",
]
