"""The failover's copy-points step against a real Azurite, run by the real job engine.

A replica page blob with two recovery points (snapshots taken as the process
server takes them); the step copies the chosen one into a blob of its own,
server-side, and create-disks imports that copy. Compute has no emulator, so the
whole azure-failover job runs with the recorded-responses transport for the
management calls and Azurite for storage.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import pytest
from azure.storage.blob import ContainerClient

from siterecovery.common.azure import points
from siterecovery.common.azure.pageblob import PageBlobDisk
from siterecovery.controller.jobs import states
from siterecovery.controller.jobs.engine import FunctionStep, JobKind, JobRunner, create_job
from siterecovery.controller.providers.azure import steps
from siterecovery.controller.providers.azure.compute import AzureCompute
from siterecovery.controller.store import open_store
from tests.azure_replay import ReplayTransport, load
from tests.unit.azure.test_compute import SITE, VALUES, StaticToken

from .blob_support import connection_string

MiB = 1024 * 1024
SIZE = 3 * MiB
BLOB = "web1-abcdef12/disk0.vhd"


@pytest.fixture
def container(azurite):
    client = ContainerClient.from_connection_string(connection_string(azurite.port), f"c{uuid.uuid4().hex[:16]}")
    client.create_container()
    yield client
    client.delete_container()


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path}/store.db")
    yield opened
    opened.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replica(container: ContainerClient) -> dict[str, str]:
    """A replica blob with points t1 and t2, and the disk's hash at each."""
    disk = PageBlobDisk.open_or_create(container, BLOB, SIZE)
    hashes = {}
    image = bytearray(SIZE)
    for tag, (offset, fill) in (("t1", (4096, 0x11)), ("t2", (MiB + 512, 0x22))):
        data = bytes([fill]) * (MiB // 2)
        disk.write(offset, data)
        image[offset : offset + len(data)] = data
        points.create_point(disk, tag, "crash-consistent", datetime.now(UTC), extra={"sr_pair_id": "pair-1"})
        hashes[tag] = _sha(bytes(image))
    disk.write(0, b"\x99" * 4096)  # the replica moves on after the last point
    return hashes


def _run(store, kind: JobKind, params: dict):
    job = create_job(store, kind, target="web1", params=params)
    runner = JobRunner(store, kinds=[kind], lease_seconds=30)
    for _ in range(10):
        runner.run_once()
        job = store.get_job(job.id)
        if job.status in states.TERMINAL_JOB_STATUSES:
            return job
    raise AssertionError(f"job did not finish: {job}")


def _content(container: ContainerClient, name: str) -> bytes:
    return container.get_blob_client(name).download_blob(offset=0, length=SIZE).readall()


def _names(container: ContainerClient) -> set[str]:
    return {b.name for b in container.list_blobs()}


def test_copy_points_copies_the_chosen_snapshot_into_a_blob_of_its_own_and_records_it(store, container):
    hashes = _replica(container)
    waits: list[float] = []
    step = steps.CopyPoints(lambda ctx: container, poll_seconds=0.5, sleep=waits.append)
    kind = JobKind("copy-test", [step])
    params = {"disks": [{"name": "web1-disk0", "point": {"blob": BLOB, "tag_id": "t1"}}]}
    job = _run(store, kind, params)
    assert job.status == states.SUCCEEDED, job.error_message
    copy = steps.copy_blob_name({"blob": BLOB, "tag_id": "t1"})
    assert copy == "web1-abcdef12/disk0-failover-t1.vhd"
    output = job.outputs()["copy-points"]
    assert output["copies"] == [copy] and output["source_uris"]["web1-disk0"].endswith(f"/{container.container_name}/{copy}")
    assert _sha(_content(container, copy)) == hashes["t1"]
    # What it created is on record (the step's message; it named the blob before creating it too).
    assert copy in job.steps[0].message
    # The copy carries the VHD footer of the snapshot: Azure can import it.
    assert container.get_blob_client(copy).get_blob_properties().size == container.get_blob_client(BLOB).get_blob_properties().size

    # Idempotent: the same step again keeps the copy (a copy of the same snapshot).
    again = _run(store, kind, params)
    assert again.status == states.SUCCEEDED and again.outputs()["copy-points"] == output
    assert _sha(_content(container, copy)) == hashes["t1"]


def test_a_point_that_is_gone_fails_the_step_and_creates_nothing(store, container):
    _replica(container)
    before = _names(container)
    kind = JobKind("copy-test", [steps.CopyPoints(lambda ctx: container, poll_seconds=0, sleep=lambda s: None)])
    job = _run(store, kind, {"disks": [{"name": "d", "point": {"blob": BLOB, "tag_id": "expired"}}]})
    assert job.status in (states.FAILED, states.COMPENSATED) and job.error_code == "point-not-found"
    assert _names(container) == before


def test_a_failover_that_fails_later_deletes_its_copies(store, container):
    _replica(container)
    before = _names(container)

    def refuse(ctx):
        from siterecovery.common import errors

        raise errors.PreconditionFailed("a later step refused", code="later")

    kind = JobKind(
        "copy-test",
        [steps.CopyPoints(lambda ctx: container, poll_seconds=0, sleep=lambda s: None), FunctionStep("later", refuse)],
    )
    job = _run(store, kind, {"disks": [{"name": "d", "point": {"blob": BLOB, "tag_id": "t2"}}]})
    assert job.status == states.COMPENSATED and job.error_code == "later"
    assert _names(container) == before


def test_the_failover_imports_the_copy_not_the_moving_replica(store, container):
    hashes = _replica(container)
    copy = steps.copy_blob_name({"blob": BLOB, "tag_id": "t2"})
    source_uri = container.get_blob_client(copy).url
    values = {**VALUES, "source_uri": source_uri}
    transport = ReplayTransport()
    transport.queue(load("disk_create", values)[:1] + load("disk_create", values))
    transport.queue(load("nic_create", values)[:1] + load("nic_create", values))
    transport.queue(load("vm_create", values)[:1] + load("vm_create", values))
    azure = AzureCompute.connect(SITE, StaticToken(), transport=transport, polling_interval=0, sleep=transport.sleep)
    kind = steps.failover_kind(lambda ctx: azure, lambda ctx: container, poll_seconds=0, sleep=lambda s: None)
    params = {
        "disks": [{"name": "web1-disk0", "point": {"blob": BLOB, "tag_id": "t2"}, "os_type": "Linux"}],
        "nic": {"name": "web1-nic0", "private_ip": "10.1.2.10"},
        "vm": {"name": "web1", "size": "Standard_D2s_v3"},
    }
    job = _run(store, kind, params)
    assert job.status == states.SUCCEEDED, job.error_message
    assert transport.done
    disk_put = next(r for r in transport.requests if r.method == "PUT" and "/disks/" in r.path)
    assert disk_put.body["properties"]["creationData"]["sourceUri"] == source_uri
    assert _sha(_content(container, copy)) == hashes["t2"]
