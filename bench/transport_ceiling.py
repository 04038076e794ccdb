"""Issue 7 item 1's ceiling: how fast bytes cross mutual-TLS hops on this machine when nothing
else is done to them, against rsync and iperf3 in the same run.

    .venv/bin/python -m bench.transport_ceiling [--size 4G] [--dir DIR]

A full sync moves every byte source agent → process server → master target:
two mutual-TLS gRPC hops, three processes on two cores, a spool written and
fsynced on the way and the target written and fsynced at the end. This script
runs that shape with no logic at all — no frames, no checksums, no state —
so the rows bound what any design on this transport can reach:

- `grpc 1 hop`, `grpc 2 hops`: 1 MiB messages of random bytes from a sender
  (through a relay) to a sink, each its own process, with our channel and
  server options and certificates from our CA; bytes in, bytes out (no
  protobuf);
- `grpc 2 hops + disk`: the same, the sender reading an uncached image, the
  relay appending every message to a spool file (fdatasync every 64 MiB), the
  sink writing the target file and fsyncing it: the full sync's shape;
- `grpc 2 hops + target`: the same without the spool — what a design that
  forwards the initial sync's chunks without spooling them could reach;
- `tls 1 hop`, `tls 2 hops`: the same bytes over Python `ssl` sockets
  (recv_into one buffer, sendall), to show what gRPC's framing costs;
- peers: `iperf3` on loopback (plain TCP: the kernel's ceiling) and
  `rsync -W --inplace` of the image to a local file, then fsynced.

Per row: seconds, MB/s (10^6 bytes), and each process's CPU-seconds per GiB
(user + system, from setup done to the last byte). The last line compares the
full-sync shape with rsync: item 1 needs ours ≥ 1.0 × rsync, and ours does
more than this row does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import ssl
import subprocess
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from siterecovery.common import pki
from siterecovery.common.channels import secure_channel
from siterecovery.common.grpcserver import SERVER_OPTIONS

from . import common
from .common import GiB, MiB, mbps, own_cpu_seconds

MESSAGE = MiB
SPOOL_SYNC_BYTES = 64 * MiB
SERVICE, METHOD = "ceiling.Pipe", "Push"
CERT_ID = "ceiling"


@dataclass(frozen=True)
class Tls:
    """One CA, one certificate used by every process (each side checks the other's)."""

    ca: bytes
    key: bytes
    cert: bytes

    @property
    def name(self) -> str:
        return pki.agent_dns_name(CERT_ID)


def make_tls(directory: Path) -> Tls:
    ca = pki.CertificateAuthority.load_or_create(directory / "ca")
    key, cert = ca.issue_keypair(pki.Identity(CERT_ID, pki.PROCESS_SERVER))
    return Tls(ca.cert_pem, key, cert)


# -- gRPC ------------------------------------------------------------------------------------
def _grpc_serve(tls: Tls, handler) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=list(SERVER_OPTIONS))
    method = grpc.stream_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})])
    credentials = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _grpc_push(tls: Tls, port: int):  # type: ignore[no-untyped-def]
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    channel = secure_channel(f"127.0.0.1:{port}", credentials, target_name=tls.name)
    return channel.stream_unary(f"/{SERVICE}/{METHOD}")


# -- TLS sockets -----------------------------------------------------------------------------
def _contexts(tls: Tls, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = directory / f"leaf-{os.getpid()}.crt", directory / f"leaf-{os.getpid()}.key"
    cert.write_bytes(tls.cert)
    key.write_bytes(tls.key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in (server, client):
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cadata=tls.ca.decode())
    server.verify_mode = ssl.CERT_REQUIRED
    return server, client


def _tls_listen() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    return listener, listener.getsockname()[1]


def _tls_connect(context: ssl.SSLContext, port: int, name: str) -> ssl.SSLSocket:
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)


# -- the three roles, each in its own process ------------------------------------------------
def sink(transport: str, tls: Tls, directory: Path, target: Path | None, ports: mp.Queue, results: mp.Queue) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if target else -1

    def consume(blocks) -> int:  # type: ignore[no-untyped-def]
        total = 0
        for block in blocks:
            total += len(block)
            if fd >= 0:
                os.write(fd, block)
        if fd >= 0:
            os.fsync(fd)
        return total

    if transport == "grpc":
        server, port = _grpc_serve(tls, lambda requests, _context: str(_measured(results, consume, requests)).encode())
        ports.put(port)
        time.sleep(3600)  # terminated by the parent once the sender is done
    else:
        server_context, _ = _contexts(tls, directory)
        listener, port = _tls_listen()
        ports.put(port)
        raw, _ = listener.accept()
        with server_context.wrap_socket(raw, server_side=True) as conn:
            total = _measured(results, consume, _received(conn, _recv_exact(conn, 8)))
            conn.sendall(total.to_bytes(8, "big"))


def relay(transport: str, tls: Tls, directory: Path, spool: Path | None, downstream: int, ports: mp.Queue,
          results: mp.Queue) -> None:
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if spool else -1

    def spooled(blocks):  # type: ignore[no-untyped-def]
        unsynced = 0
        for block in blocks:
            if fd >= 0:
                os.write(fd, block)
                unsynced += len(block)
                if unsynced >= SPOOL_SYNC_BYTES:
                    os.fdatasync(fd)
                    unsynced = 0
            yield block

    if transport == "grpc":
        push = _grpc_push(tls, downstream)
        server, port = _grpc_serve(tls, lambda requests, _context: _measured(results, lambda r: push(spooled(r)), requests))
        ports.put(port)
        time.sleep(3600)
    else:
        server_context, client_context = _contexts(tls, directory)
        listener, port = _tls_listen()
        ports.put(port)
        raw, _ = listener.accept()
        with server_context.wrap_socket(raw, server_side=True) as upstream, \
                _tls_connect(client_context, downstream, tls.name) as down:

            def forward(header: bytes) -> bytes:
                down.sendall(header)
                for block in spooled(_received(upstream, header)):
                    down.sendall(block)
                return _recv_exact(down, 8)

            upstream.sendall(_measured(results, forward, _recv_exact(upstream, 8)))


def _recv_exact(conn: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += conn.recv(n - len(data)) or b""
    return data


def _received(conn: ssl.SSLSocket, header: bytes):  # type: ignore[no-untyped-def]
    """The blocks of one transfer: `header` holds its length (TLS sockets cannot be half-closed)."""
    left = int.from_bytes(header, "big")
    buffer = bytearray(MESSAGE)
    view = memoryview(buffer)
    while left:
        n = conn.recv_into(buffer, min(left, MESSAGE))
        if not n:
            raise ConnectionError("the peer closed before the end of the transfer")
        left -= n
        yield view[:n]


def _measured(results: mp.Queue, work, argument):  # type: ignore[no-untyped-def]
    started = own_cpu_seconds()
    outcome = work(argument)
    results.put((os.getpid(), own_cpu_seconds() - started))
    return outcome


def sender(transport: str, tls: Tls, directory: Path, image: Path | None, size: int, port: int,
           results: mp.Queue) -> None:
    payload = common.keystream(1)(MESSAGE)

    def blocks():  # type: ignore[no-untyped-def]
        if image is None:
            for _ in range(size // MESSAGE):
                yield payload
            return
        with open(image, "rb", buffering=0) as f:
            while block := f.read(MESSAGE):
                yield block

    cpu, started = own_cpu_seconds(), time.monotonic()
    if transport == "grpc":
        reply = int(_grpc_push(tls, port)(blocks()))
    else:
        _, client_context = _contexts(tls, directory)
        with _tls_connect(client_context, port, tls.name) as conn:
            conn.sendall(size.to_bytes(8, "big"))
            for block in blocks():
                conn.sendall(block)
            reply = int.from_bytes(_recv_exact(conn, 8), "big")
    results.put(("sender", time.monotonic() - started, own_cpu_seconds() - cpu, reply))


@dataclass
class Row:
    name: str
    seconds: float
    cpu: dict[str, float]  # CPU-seconds per role


def run_row(name: str, transport: str, hops: int, tls: Tls, root: Path, size: int, *, disk: bool,
            spool: bool = True) -> Row:
    spawn = mp.get_context("spawn")
    ports, results = spawn.Queue(), spawn.Queue()
    image = root / "image" if disk else None
    if image:
        common.uncache(image)
    procs = {"sink": spawn.Process(target=sink, args=(transport, tls, root, root / "target" if disk else None,
                                                       ports, results))}
    procs["sink"].start()
    port = ports.get(timeout=60)
    if hops == 2:
        procs["relay"] = spawn.Process(target=relay, args=(transport, tls, root, root / "spool" if disk and spool else None,
                                                           port, ports, results))
        procs["relay"].start()
        port = ports.get(timeout=60)
    procs["sender"] = spawn.Process(target=sender, args=(transport, tls, root, image, size, port, results))
    procs["sender"].start()
    by_pid = {p.pid: role for role, p in procs.items()}
    cpu: dict[str, float] = {}
    seconds = 0.0
    try:
        for _ in procs:
            item = results.get(timeout=3600)
            if item[0] == "sender":
                _, seconds, cpu["sender"], received = item
                if received != size:
                    raise SystemExit(f"{name}: the sink received {received} of {size} bytes")
            else:
                cpu[by_pid[item[0]]] = item[1]
    finally:
        for p in procs.values():
            p.terminate()
            p.join()
        for leftover in ("target", "spool"):
            (root / leftover).unlink(missing_ok=True)
    return Row(name, seconds, cpu)


def iperf3(size: int) -> float:
    """Loopback TCP throughput in bytes per second (iperf3 cannot report a port it chose, so
    one is picked free first; the client is retried while the server starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            client = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(size), "-J"],
                                    capture_output=True, text=True, check=False)
            if client.returncode == 0:
                received = json.loads(client.stdout)["end"]["sum_received"]
                return received["bytes"] / received["seconds"]
            time.sleep(0.1)  # the server is not listening yet
        raise SystemExit(f"iperf3 failed: {client.stdout[-500:]} {client.stderr[-500:]}")
    finally:
        server.kill()
        server.wait()


def main() -> None:
    args = common.arguments("Mutual-TLS transport ceiling against rsync and iperf3 (issue 7 item 1)").parse_args()
    common.need_tools("rsync", "iperf3")
    size = args.size
    with common.work_dir(args.dir, keep=args.keep, needs=4 * size + 512 * MiB) as root:
        for fact in common.machine_facts(root):
            print(fact)
        tls = make_tls(Path(tempfile.mkdtemp(dir=root)))
        image = root / "image"
        common.write_image(image, size, seed=args.seed)
        rows = [
            run_row("grpc 1 hop", "grpc", 1, tls, root, size, disk=False),
            run_row("grpc 2 hops", "grpc", 2, tls, root, size, disk=False),
            run_row("grpc 2 hops + disk", "grpc", 2, tls, root, size, disk=True),
            run_row("grpc 2 hops + target", "grpc", 2, tls, root, size, disk=True, spool=False),
            run_row("tls 1 hop", "tls", 1, tls, root, size, disk=False),
            run_row("tls 2 hops", "tls", 2, tls, root, size, disk=False),
            run_row("tls 2 hops + disk", "tls", 2, tls, root, size, disk=True),
        ]
        common.uncache(image)
        rsync_seconds, _ = common.timed(["rsync", "-W", "--inplace", str(image), str(root / "copy")],
                                        fsync=root / "copy")
        loopback = iperf3(size)
        (root / "copy").unlink()
        print(f"{'row':<22} {'s':>6} {'MB/s':>7}  CPU-s per GiB (sender / relay / sink), share of 2 cores")
        for row in rows:
            per_gib = " / ".join(f"{row.cpu.get(role, 0) * GiB / size:.2f}" for role in ("sender", "relay", "sink"))
            share = sum(row.cpu.values()) / row.seconds / 2
            print(f"{row.name:<22} {row.seconds:6.1f} {mbps(size, row.seconds):7.0f}  {per_gib}, {share:.0%}")
        rsync = mbps(size, rsync_seconds)
        print(f"{'rsync -W --inplace':<22} {rsync_seconds:6.1f} {rsync:7.0f}")
        print(f"{'iperf3 (plain TCP)':<22} {size / loopback:6.1f} {loopback / 1e6:7.0f}")
        shape = next(r for r in rows if r.name == "grpc 2 hops + disk")
        ratio = mbps(size, shape.seconds) / rsync
        print(f"transport ceiling: gRPC mTLS 2 hops + spool + target, no logic: {mbps(size, shape.seconds):.0f} MB/s "
              f"= {ratio:.2f} x rsync ({rsync:.0f} MB/s); item 1 needs ours >= 1.00 x rsync")


if __name__ == "__main__":
    main()
