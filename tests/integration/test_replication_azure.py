"""Forward protection to Azure end to end: real daemons, a real Azurite, real NBD clients.

A source agent in nbd mode, a process server with its Azure Storage setting (a 0600
connection string file for Azurite) and no master target: the pair's target kind is
azure-page-blob, so the process server writes the disk into a page blob and takes
recovery points as snapshots. Every check hashes the blob's (or a snapshot's) first
disk-size bytes against the source image.
"""

from __future__ import annotations

import json
import os
import random

import pytest
from azure.storage.blob import ContainerClient

from siterecovery.common.azure import vhd
from tests.conftest import needs_tools

from .blob_support import connection_string, sha256, write_credential
from .conftest import wait_for
from .replication_site import MiB, ReplicatingSite
from .replication_site import sha256 as file_sha256

pytestmark = pytest.mark.slow

SITE = "dr-azure"
CONTAINER = "replicas"
SEED = int(os.environ.get("SR_FAULT_SEED", "20261128"))
WINDOW = 8 * MiB  # the source's in-flight window in these tests
CHUNK = 1 * MiB


def _start(rsite: ReplicatingSite, azurite, **kw) -> ContainerClient:
    credential = write_credential(rsite.root / "secrets" / "azure-storage.conn", azurite.port)
    rsite.start(ps_extra={"azure_storage_connection_string_file": str(credential)}, master_target=False, **kw)
    rsite.add_azure_site(SITE, storage_account="devstoreaccount1", container=CONTAINER)
    return ContainerClient.from_connection_string(connection_string(azurite.port), CONTAINER)


def _blob(container: ContainerClient, name: str, size: int, snapshot: str | None = None) -> bytes:
    return container.get_blob_client(name, snapshot=snapshot).download_blob(offset=0, length=size).readall()


def _snapshots(container: ContainerClient, name: str) -> dict[str, str]:
    """tag id → snapshot id, for the blob's recovery points."""
    return {
        (b.metadata or {})["sr_tag_id"]: b.snapshot
        for b in container.list_blobs(name_starts_with=name, include=["snapshots", "metadata"])
        if b.name == name and b.snapshot and (b.metadata or {}).get("sr_tag_id")
    }


@needs_tools("qemu-io", "fio")
def test_writes_through_nbd_reach_the_page_blob_and_every_point_is_an_exact_snapshot(rsite, azurite):
    size = 64 * MiB
    container = _start(rsite, azurite, disk_size=size, data_bytes=8 * MiB)
    pair = rsite.enable("--azure-site", SITE)
    name = f"{rsite.srctl_json('machines', 'list')[0]['hostname']}-{rsite.machine[:8]}/disk0.vhd"
    assert pair["target_path"].endswith(f"/{CONTAINER}/{name}")
    assert pair["master_target_id"] == pair["process_server_id"]
    rsite.wait_replicating()
    rsite.wait_caught_up()
    assert sha256(_blob(container, name, size)) == file_sha256(rsite.disk)
    footer = container.get_blob_client(name).download_blob(offset=vhd.virtual_size(size), length=512).readall()
    assert vhd.parse(footer) == {"current_size": size, "disk_type": 2, "checksum_ok": 1}

    expected: dict[str, str] = {}
    rsite.qemu_io("write -P 0x5a 0 1M", "write -P 0xa5 5M 64k", "write -z 2M 512k", "discard 8M 1M",
                  "write -P 0x11 3000 1000", "flush")
    expected[rsite.create_point()] = file_sha256(rsite.disk)
    rsite.fio(size="4M", seed=7)
    expected[rsite.create_point()] = file_sha256(rsite.disk)
    assert len(set(expected.values())) == 2

    listed = [p["point"]["tag_id"] for p in rsite.points()]
    assert [t for t in listed if t in expected] == list(expected)
    snapshots = _snapshots(container, name)
    for tag_id, digest in expected.items():
        assert sha256(_blob(container, name, size, snapshots[tag_id])) == digest, f"point {tag_id}"
    view = rsite.wait_caught_up()
    assert sha256(_blob(container, name, size)) == file_sha256(rsite.disk)
    assert int(view["recovery_points"]) >= 2 and int(view["applied_seq"]) == int(view["source_seq"])

    # A master target's materialisation does not apply: the refusal says where the points are.
    refused = rsite.srctl("recovery-points", "materialize", rsite.machine, "--point", "latest")
    assert refused.returncode != 0 and "snapshots" in refused.stderr


@needs_tools("qemu-io")
def test_kill9_of_the_process_server_mid_sync_resumes_from_its_saved_seq(rsite, azurite):
    rng = random.Random(f"{SEED}-azure-sync")
    size, data = 256 * MiB, 96 * MiB
    container = _start(rsite, azurite, disk_size=size, data_bytes=data, seed=rng.randrange(1 << 30),
                       source_extra={"send_window_bytes": WINDOW})
    pair = rsite.enable("--azure-site", SITE)
    state_file = rsite.root / "process-server" / "azure-pairs" / f"{pair['pair_id']}.json"

    def saved_seq() -> int:
        try:
            return json.loads(state_file.read_text())["applied_seq"]
        except (FileNotFoundError, ValueError):
            return 0

    threshold = rng.uniform(0.2, 0.6)
    wait_for(lambda: rsite.pair().get("sync_progress", 0) >= threshold and saved_seq() > 0, timeout=180,
             what=f"sync past {threshold:.0%}")
    rsite.kill9("process-server")
    saved = saved_seq()
    log = rsite.root / "logs" / "process-server.log"
    seen = log.read_text().count("writing page blob")
    rsite.restart("process-server")
    rsite.wait_replicating()
    after = rsite.wait_caught_up()
    name = after["target_path"].split(f"/{CONTAINER}/", 1)[1]
    assert sha256(_blob(container, name, size)) == file_sha256(rsite.disk)
    # The source did not send the disk again, and the restarted process server began
    # after what its state file held, not at the start.
    sent = int(after["source_bytes_sent"])
    assert sent <= data + WINDOW + CHUNK, f"{sent} bytes sent for {data} bytes of data"
    resumed = [json.loads(line) for line in log.read_text().splitlines() if "writing page blob" in line][seen:]
    assert resumed and resumed[0]["from_seq"] == saved + 1 > 1, resumed[:1]
    assert int(after["applied_bytes_total"]) <= data + WINDOW + CHUNK

    # Steady replication after the restart still ends in exact points.
    rsite.qemu_io("write -P 0x77 0 128k", "write -P 0x78 100M 1M")
    tag = rsite.create_point()
    at_tag = file_sha256(rsite.disk)
    rsite.wait_caught_up()
    assert sha256(_blob(container, name, size, _snapshots(container, name)[tag])) == at_tag
    print(f"[fault] kill -9 process-server at {threshold:.0%} of an Azure initial sync (seed {SEED}): "
          f"resumed at seq {saved + 1}")


BLOCK = 64 * 1024
DIGEST = 16


def _change_blocks(image, rng: random.Random, *, fraction: float, zeroed: int) -> tuple[int, int]:
    """Overwrite a random `fraction` of the image's 64 KiB blocks with random data and zero
    `zeroed` of its data blocks, in place (the source agent keeps its disk file); returns the
    bytes of the blocks that now differ and hold data (they travel) and of those that differ and
    read as zeros (zero ranges, no data)."""
    blocks = image.stat().st_size // BLOCK
    with open(image, "r+b") as f:
        before = [f.read(BLOCK) for _ in range(blocks)]
        overwrite = rng.sample(range(blocks), max(1, int(blocks * fraction)))
        data_blocks = [b for b in range(blocks) if any(before[b]) and b not in overwrite]
        for block in overwrite:
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
        for block in rng.sample(data_blocks, zeroed):
            f.seek(block * BLOCK)
            f.write(bytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        after = [f.read(BLOCK) for _ in range(blocks)]
    differ = [b for b in range(blocks) if before[b] != after[b]]
    data = sum(BLOCK for b in differ if any(after[b]))
    return data, len(differ) * BLOCK - data


@needs_tools("qemu-io")
def test_reprotect_onto_the_blob_an_earlier_pair_left_moves_only_the_changed_blocks(rsite, azurite):
    rng = random.Random(f"{SEED}-azure-delta")
    size = 64 * MiB
    container = _start(rsite, azurite, disk_size=size, data_bytes=48 * MiB, seed=rng.randrange(1 << 30))
    first = rsite.enable("--azure-site", SITE)
    rsite.wait_replicating()
    rsite.wait_caught_up()
    name = first["target_path"].split(f"/{CONTAINER}/", 1)[1]
    assert sha256(_blob(container, name, size)) == file_sha256(rsite.disk)
    disabled = rsite.srctl("replication", "disable", rsite.machine)
    assert disabled.returncode == 0, disabled.stderr

    # The machine ran elsewhere meanwhile (a failover and a failback): ~1 % of its blocks changed.
    data, zeros = _change_blocks(rsite.disk, rng, fraction=0.01, zeroed=3)
    assert data and zeros
    pair = rsite.enable("--azure-site", SITE, "--sync", "delta", "--target-path", first["target_path"])
    assert pair["pair_id"] != first["pair_id"] and pair["sync_kind"] == "delta"
    assert pair["target_path"] == first["target_path"] and pair["master_target_id"] == pair["process_server_id"]
    rsite.wait_replicating()
    done = rsite.wait_caught_up()
    assert sha256(_blob(container, name, size)) == file_sha256(rsite.disk)

    # What travelled and what the process server wrote into the blob: the differing blocks
    # (as for a master target: tests/integration/test_delta_resync.py), far below the disk.
    bound = 1.05 * data + MiB
    sent, applied, moved = (int(done[k]) for k in ("source_bytes_sent", "applied_bytes_total", "sync_sent_bytes"))
    assert data <= moved <= bound and sent <= bound and applied <= bound, (sent, applied, moved, data)
    assert applied < size // 10 and moved < size // 10
    assert int(done["sync_differing_bytes"]) == data + zeros
    assert int(done["sync_compared_bytes"]) == size
    assert int(done["sync_hash_bytes"]) == size // BLOCK * DIGEST
    print(f"[azure delta] {size // MiB} MiB disk, {(data + zeros) // BLOCK} blocks differ "
          f"({data / MiB:.2f} MiB of data): source sent {sent / MiB:.2f} MiB, the process server wrote "
          f"{applied / MiB:.2f} MiB into the blob, {int(done['sync_hash_bytes']) / 1024:.0f} KiB of digests")

    # From here on an ordinary Azure pair: its points are snapshots of the same blob.
    rsite.qemu_io("write -P 0x3c 2M 128k", "flush")
    tag = rsite.create_point()
    at_tag = file_sha256(rsite.disk)
    rsite.wait_caught_up()
    assert tag in [p["point"]["tag_id"] for p in rsite.points()]
    assert sha256(_blob(container, name, size, _snapshots(container, name)[tag])) == at_tag


def test_a_process_server_refuses_to_start_with_a_storage_credential_others_may_read(rsite, azurite):
    rsite.start_config_server()
    credential = write_credential(rsite.root / "azure.conn", azurite.port)
    os.chmod(credential, 0o644)
    result = rsite.run_agent("process-server", "ps-loose", azure_storage_connection_string_file=str(credential))
    assert result.returncode != 0
    assert "may be read by others" in result.stderr and f"chmod 600 {credential}" in result.stderr
    assert "AccountKey" not in result.stderr + result.stdout
