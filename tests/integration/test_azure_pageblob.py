"""Page-blob disks and snapshot recovery points against a real Azurite.

Each test gets a fresh container in one Azurite started for the module (port
0, in memory). Equality is checked by hashing the blob against a local image
that received the same writes.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.common import errors
from siterecovery.common.azure import points, vhd
from siterecovery.common.azure.clients import container_client
from siterecovery.common.azure.pageblob import MAX_PUT, PAGE, PageBlobDisk, blob_size
from siterecovery.common.azure.site import AzureSite
from tests.azurite import Azurite

MiB = 1024 * 1024
NO_SLEEP: list[float] = []


def site_for(server: Azurite, container: str) -> AzureSite:
    return AzureSite(
        subscription_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        client_id=str(uuid.uuid4()),
        resource_group="rg-dr",
        region="westeurope",
        vnet="vnet-dr",
        subnet="default",
        storage_account="devstoreaccount1",
        container=container,
        blob_endpoint=server.account_url,
    )


class PutRecorder:
    """Records the page writes the SDK sends (a raw request hook; it changes nothing)."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, int, int]] = []

    def __call__(self, request) -> None:
        http = request.http_request
        if http.method == "PUT" and "x-ms-page-write" in http.headers:
            first, last = (http.headers.get("x-ms-range") or http.headers["Range"]).removeprefix("bytes=").split("-")
            self.puts.append((http.headers["x-ms-page-write"], int(first), int(last) - int(first) + 1))


@pytest.fixture
def recorder():
    return PutRecorder()


@pytest.fixture
def container(azurite, recorder):
    name = f"t{uuid.uuid4().hex[:20]}"
    client = container_client(site_for(azurite, name), azurite.credential, raw_request_hook=recorder)
    client.create_container()
    yield client
    client.delete_container()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def test_random_writes_land_exactly(container, recorder):
    disk_size = 9 * MiB + 3 * PAGE  # not a whole MiB: the padding before the footer is exercised too
    disk = PageBlobDisk.open_or_create(container, "pair-1.vhd", disk_size, metadata={"sr_pair": "pair-1"})
    image = bytearray(disk_size)
    rng = random.Random(5)
    for _ in range(60):
        offset = rng.randrange(disk_size)
        length = rng.randint(1, min(disk_size - offset, rng.choice([700, 64 * 1024, 5 * MiB])))
        if rng.random() < 0.2:
            disk.zero(offset, length)
            image[offset : offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            disk.write(offset, data)
            image[offset : offset + length] = data
    # the last byte of the disk, and a write ending exactly at the end
    disk.write(disk_size - 1, b"\xaa")
    image[-1] = 0xAA

    assert sha(disk.read(0, disk_size)) == sha(image)
    props = container.get_blob_client("pair-1.vhd").get_blob_properties()
    assert props.size == blob_size(disk_size) == 10 * MiB + vhd.FOOTER_SIZE
    assert props.metadata["sr_pair"] == "pair-1"
    blob = container.get_blob_client("pair-1.vhd")
    padding = blob.download_blob(offset=disk_size, length=10 * MiB - disk_size).readall()
    assert padding == bytes(len(padding))
    footer = vhd.parse(blob.download_blob(offset=10 * MiB, length=vhd.FOOTER_SIZE).readall())
    assert footer == {"current_size": 10 * MiB, "disk_type": vhd.FIXED, "checksum_ok": 1}
    # every page write was aligned and within the service's 4 MiB limit
    assert recorder.puts
    for kind, first, length in recorder.puts:
        assert first % PAGE == 0 and length % PAGE == 0, (kind, first, length)
        if kind == "update":
            assert length <= MAX_PUT


def test_large_write_is_split_and_zero_pieces_are_cleared(container, recorder):
    disk = PageBlobDisk.open_or_create(container, "big.vhd", 16 * MiB)
    recorder.puts.clear()
    data = bytearray(random.Random(1).randbytes(12 * MiB))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # the middle piece is all zeros
    disk.write(MiB, data)
    assert recorder.puts == [
        ("update", MiB, MAX_PUT),
        ("clear", 5 * MiB, MAX_PUT),
        ("update", 9 * MiB, MAX_PUT),
    ]
    assert sha(disk.read(MiB, 12 * MiB)) == sha(data)


def test_unaligned_write_merges_edge_pages(container, recorder):
    disk = PageBlobDisk.open_or_create(container, "edges.vhd", MiB)
    disk.write(0, b"\x11" * 4096)
    recorder.puts.clear()
    disk.write(1000, b"\x22" * 100)  # inside one page: read it, merge, write that page back
    assert recorder.puts == [("update", 512, 1024)]
    expected = bytearray(b"\x11" * 4096)
    expected[1000:1100] = b"\x22" * 100
    assert disk.read(0, 4096) == expected


def test_zero_clears_whole_pages_and_rewrites_edges(container, recorder):
    disk = PageBlobDisk.open_or_create(container, "zero.vhd", MiB)
    disk.write(0, b"\x33" * 8192)
    recorder.puts.clear()
    disk.zero(100, 5000)
    assert ("clear", 512, 4096) in recorder.puts
    expected = bytearray(b"\x33" * 8192)
    expected[100:5100] = bytes(5000)
    assert disk.read(0, 8192) == expected


def test_reopen_keeps_data_and_a_size_mismatch_changes_nothing(container):
    disk = PageBlobDisk.open_or_create(container, "d.vhd", 2 * MiB)
    disk.write(4096, b"keep me")
    again = PageBlobDisk.open_or_create(container, "d.vhd", 2 * MiB)
    assert again.read(4096, 7) == b"keep me"
    assert PageBlobDisk.open(container, "d.vhd").disk_size == 2 * MiB
    with pytest.raises(errors.Conflict) as caught:
        PageBlobDisk.open_or_create(container, "d.vhd", 4 * MiB)
    assert "delete it or pick another name" in caught.value.hint
    assert container.get_blob_client("d.vhd").get_blob_properties().size == blob_size(2 * MiB)
    assert again.read(4096, 7) == b"keep me"


def test_writes_outside_the_disk_are_refused(container):
    disk = PageBlobDisk.open_or_create(container, "small.vhd", MiB)
    with pytest.raises(errors.InvalidInput):
        disk.write(MiB - 1, b"ab")
    with pytest.raises(errors.InvalidInput):
        PageBlobDisk.open_or_create(container, "odd.vhd", MiB + 1)


def test_missing_blob_is_not_found(container):
    with pytest.raises(errors.NotFound) as caught:
        PageBlobDisk.open(container, "nope.vhd")
    assert caught.value.code == "azure-not-found"


def test_snapshots_are_recovery_points(container):
    disk_size = 4 * MiB
    disk = PageBlobDisk.open_or_create(container, "vm1-disk0.vhd", disk_size)
    image = bytearray(disk_size)
    rng = random.Random(7)
    t0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    images: dict[str, bytes] = {}
    for index, kind in enumerate(["crash-consistent", "app-consistent", "multi-vm-consistent"]):
        for _ in range(10):
            offset = rng.randrange(disk_size - 70000)
            data = rng.randbytes(rng.randint(1, 70000))
            disk.write(offset, data)
            image[offset : offset + len(data)] = data
        point = points.create_point(disk, f"tag-{index}", kind, t0 + timedelta(minutes=5 * index))
        assert point.tag_id == f"tag-{index}" and point.kind == kind
        images[point.tag_id] = bytes(image)
    disk.write(0, b"after the last point")

    listed = points.list_points(container, "vm1-disk0.vhd")
    assert [(p.tag_id, p.kind, p.captured_at) for p in listed] == [
        ("tag-0", "crash-consistent", t0),
        ("tag-1", "app-consistent", t0 + timedelta(minutes=5)),
        ("tag-2", "multi-vm-consistent", t0 + timedelta(minutes=10)),
    ]
    for point in listed:
        at_point = points.open_point(container, point)
        assert sha(at_point.read(0, disk_size)) == sha(images[point.tag_id]), point.tag_id
    assert disk.read(0, 20) == b"after the last point"

    # Taking the same point again (a retried step) returns the existing snapshot.
    again = points.create_point(disk, "tag-1", "app-consistent", t0 + timedelta(minutes=5))
    assert again == listed[1]
    assert len(points.list_points(container, "vm1-disk0.vhd")) == 3

    assert points.delete_point(container, listed[0]) is True
    assert points.delete_point(container, listed[0]) is False
    assert [p.tag_id for p in points.list_points(container, "vm1-disk0.vhd")] == ["tag-1", "tag-2"]


def test_a_point_copies_into_an_importable_blob(container):
    disk = PageBlobDisk.open_or_create(container, "src.vhd", 2 * MiB)
    disk.write(12345, b"at the point")
    point = points.create_point(disk, "t1", "crash-consistent", datetime.now(UTC))
    disk.write(12345, b"after point!")
    url = points.copy_to_blob(container, point, "src-failover-t1.vhd")
    assert url.endswith("/src-failover-t1.vhd")
    assert points.copy_to_blob(container, point, "src-failover-t1.vhd") == url  # idempotent
    assert points.copy_status(container, "src-failover-t1.vhd") == "success"
    copy = PageBlobDisk.open(container, "src-failover-t1.vhd")
    assert copy.read(12345, 12) == b"at the point"
    footer = container.get_blob_client("src-failover-t1.vhd").download_blob(offset=2 * MiB, length=512).readall()
    assert vhd.parse(footer)["checksum_ok"] == 1
