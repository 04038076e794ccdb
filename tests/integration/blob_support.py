"""Helpers of the blob forwarder tests: a spooled seeded stream, a forwarder on Azurite,
and the child process the crash test kills (`python -m tests.integration.blob_support child SPEC`).

The child opens the spool, runs a BlobForwarder until it has written everything
spooled, and prints `open <applied_seq>` first and `done <applied_seq>` last.
With `kill` in its spec it SIGKILLs itself right after Azure answered the N-th
request of a kind (a page write or a snapshot): the blob then holds more than
the forwarder's state file says, which is the case resuming must get right.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from siterecovery.agents.process_server.azure_storage import StorageCredentialFile
from siterecovery.agents.process_server.blob_forwarder import BlobForwarder, BlobPolicy
from siterecovery.agents.process_server.spool import Spool
from siterecovery.common.azure.errors import AzureRetryPolicy
from siterecovery.common.pb import replication_pb2 as rpb
from tests.azurite import ACCOUNT, ACCOUNT_KEY
from tests.unit.mt_support import make_stream

MiB = 1024 * 1024
FAST_RETRY = AzureRetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.1, max_retry_after=1.0)


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def write_credential(path: Path, port: int) -> Path:
    """A 0600 connection string file for Azurite on `port` (the process server's setting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(connection_string(port) + "\n")
    os.chmod(path, 0o600)
    return path


def assignment(pair_id: str, disk_size: int, container: str, blob: str, **extra: Any) -> rpb.PairAssignment:
    """An Azure pair ended by process server ps-1; `extra` adds or replaces fields."""
    fields: dict[str, Any] = dict(
        pair_id=pair_id,
        machine_id="src-1",
        disk_name="disk0",
        disk_size_bytes=disk_size,
        process_server_id="ps-1",
        master_target_id="ps-1",
        desired_state=rpb.PAIR_DESIRED_STATE_REPLICATING,
        target_kind=rpb.TARGET_KIND_AZURE_PAGE_BLOB,
        azure_blob=rpb.AzureBlobTarget(site="dr", storage_account=ACCOUNT, container=container, blob_name=blob),
    )
    fields.update(extra)
    return rpb.PairAssignment(**fields)


def spool_stream(spool_dir: Path, spec: dict) -> list[rpb.Frame]:
    """The spec's seeded stream, appended to the pair's spool log (in a few batches)."""
    stream = stream_of(spec)
    spool = Spool(spool_dir, limit_bytes=1 << 30)
    try:
        log = spool.log(spec["pair_id"])
        for start in range(0, len(stream), 17):
            log.append(stream[start : start + 17])
    finally:
        spool.close()
    return stream


def stream_of(spec: dict) -> list[rpb.Frame]:
    return make_stream(
        spec["pair_id"], seed=spec["seed"], disk_size=spec["disk_size"], count=spec["count"],
        done_at=spec["done_at"], t0=spec["t0"], max_write=spec["max_write"],
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_until_written(forwarder: BlobForwarder, last_seq: int, timeout: float = 60.0) -> rpb.PairStatus:
    """Start `forwarder` and poll its status (with a deadline) until it wrote `last_seq`."""
    forwarder.start()
    deadline = time.monotonic() + timeout
    while True:
        status = forwarder.status()
        if status.acked_seq >= last_seq:
            return status
        if status.state == rpb.PAIR_STATE_ERROR:
            raise AssertionError(f"forwarder failed: {status.reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"forwarder wrote up to {status.acked_seq} of {last_seq} in {timeout} s")
        time.sleep(0.02)


class KillAfter:
    """A raw response hook: SIGKILL this process after the N-th answered request of a kind."""

    def __init__(self, kind: str, count: int) -> None:
        self.kind, self.count, self.seen = kind, count, 0

    def __call__(self, response: Any) -> None:
        request = response.http_request
        if request.method != "PUT":
            return
        query = request.url.partition("?")[2]
        kind = "snapshot" if "comp=snapshot" in query else "page" if "comp=page" in query else "other"
        if kind == self.kind and response.http_response.status_code < 300:
            self.seen += 1
            if self.seen >= self.count:
                os.kill(os.getpid(), signal.SIGKILL)


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    pair_id = spec["pair_id"]
    spool = Spool(Path(spec["spool_dir"]), limit_bytes=1 << 30)
    options: dict[str, Any] = {}
    if spec.get("kill"):
        options["raw_response_hook"] = KillAfter(spec["kill"], spec["kill_count"])
    forwarder = BlobForwarder(
        assignment(pair_id, spec["disk_size"], spec["container"], spec["blob"]),
        spool,
        StorageCredentialFile(Path(spec["credential"])),
        Path(spec["state_dir"]),
        policy=BlobPolicy(batch_frames=spec["batch_frames"], retry=FAST_RETRY, prune_interval=1e9),
        client_options=options,
    )
    print("open", forwarder.state.applied_seq, flush=True)
    status = run_until_written(forwarder, spool.log(pair_id).last_seq)
    forwarder.stop()
    spool.close()
    print("done", status.acked_seq, forwarder.bytes_written, flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child_main(sys.argv[2:])
