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
from tests.azurite import skip_or_fail_without_azurite, start_azurite
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


@pytest.fixture(scope="module")
def azurite():
    skip_or_fail_without_azurite()
    with start_azurite() as server:
        yield server


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


def test_a_process_server_refuses_to_start_with_a_storage_credential_others_may_read(rsite, azurite):
    rsite.start_config_server()
    credential = write_credential(rsite.root / "azure.conn", azurite.port)
    os.chmod(credential, 0o644)
    result = rsite.run_agent("process-server", "ps-loose", azure_storage_connection_string_file=str(credential))
    assert result.returncode != 0
    assert "may be read by others" in result.stderr and f"chmod 600 {credential}" in result.stderr
    assert "AccountKey" not in result.stderr + result.stdout
