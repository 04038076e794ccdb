"""A plan fails every machine of a group over to one multi-VM-consistent point, chosen up front."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from siterecovery.common import errors
from siterecovery.common.pb import replication_pb2 as rpb
from siterecovery.controller.protection.steps import common_multi_vm_points
from siterecovery.controller.store.base import PairRecord

MVC = rpb.RECOVERY_POINT_KIND_MULTI_VM_CONSISTENT
CRASH = rpb.RECOVERY_POINT_KIND_CRASH_CONSISTENT
NOW = datetime(2026, 11, 29, tzinfo=UTC)


def _pair(pair_id: str, group: str) -> PairRecord:
    return PairRecord(
        id=pair_id, machine_id=f"m-{pair_id}", source_server_id="s", disk_name="disk0", disk_identity="",
        disk_size_bytes=1, mode="nbd", process_server_id="ps", master_target_id="mt", target_path="/t",
        journal_dir="/j", created_at=NOW, updated_at=NOW, group_id=group,
    )


def _points(*tags: tuple[str, int]) -> list[rpb.RecoveryPoint]:
    return [rpb.RecoveryPoint(tag_id=tag, kind=kind) for tag, kind in tags]


def test_the_newest_point_every_pair_of_a_group_holds_is_chosen_per_group() -> None:
    chosen = common_multi_vm_points([
        # app01 already has g3, db01 not yet: g2 is the newest cut both hold.
        (_pair("app01", "PG1"), _points(("g1", MVC), ("g2", MVC), ("c9", CRASH), ("g3", MVC))),
        (_pair("db01", "PG1"), _points(("g1", MVC), ("g2", MVC))),
        (_pair("web01", "PG2"), _points(("w1", MVC), ("c1", CRASH))),
    ])
    assert chosen == {"PG1": "g2", "PG2": "w1"}


def test_a_group_without_a_common_point_is_refused_with_the_command_that_takes_one() -> None:
    with pytest.raises(errors.PreconditionFailed) as err:
        common_multi_vm_points([
            (_pair("app01", "PG1"), _points(("g1", MVC))),
            (_pair("db01", "PG1"), _points(("c1", CRASH), ("g2", MVC))),
        ])
    assert err.value.code == "no-common-multi-vm-point"
    assert "srctl recovery-points create --group PG1" in err.value.hint
