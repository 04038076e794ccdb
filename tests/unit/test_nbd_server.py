"""The source agent's NBD server against real clients (nbdinfo, qemu-io, fio, nbdcopy)
and, for the corners real clients never reach, a raw-socket client.

The export is a `DiskCapture` with no pair attached (writes go straight to the file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from siterecovery.agents.source.capture import DiskCapture
from siterecovery.common import nbd
from tests.conftest import needs_tools
from tests.nbd_raw import Raw

MiB = 1024 * 1024
SIZE = 64 * MiB
READ_BACKLOG = 16 * MiB  # a read reply larger than the two sockets' buffers together

needs = needs_tools("nbdinfo", "qemu-io", "fio", "nbdcopy")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    image = tmp_path / "disk0.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    disk = DiskCapture("disk0", image)
    server = nbd.NbdServer("127.0.0.1", 0)
    server.add_export("disk0", disk)
    server.start()
    try:
        yield server, disk, image
    finally:
        server.stop()
        disk.close()


def run(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs
def test_nbdinfo_shows_the_export_size_and_what_it_supports(served):
    server, _disk, _image = served
    info = json.loads(run("nbdinfo", "--json", server.uri("disk0")))
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["export-name"] == "disk0"
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[can] is True, can
    assert export["is_read_only"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1, 4096, 32 * MiB,
    )
    listed = json.loads(run("nbdinfo", "--json", "--list", f"nbd://127.0.0.1:{server.port}/"))
    assert [e["export-name"] for e in listed["exports"]] == ["disk0"]


@needs
def test_qemu_io_writes_zeroes_discards_and_flushes(served):
    server, _disk, image = served
    expected = bytearray(SIZE)
    expected[0:MiB] = b"\x5a" * MiB
    expected[5 * MiB:5 * MiB + 65536] = b"\xa5" * 65536
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 {2 * MiB} {MiB}", "-c", f"write -P 0x22 {8 * MiB} {MiB}",
        server.uri("disk0"))
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 5M 64k", "-c", "write -z 2M 1M", "-c", "discard 8M 1M",
        "-c", "flush", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 2M 1M", "-c", "read -P 0 8M 1M",
        server.uri("disk0"),
    )
    assert "error" not in out.lower() and "pattern verification failed" not in out.lower(), out
    assert hashlib.sha256(image.read_bytes()).hexdigest() == hashlib.sha256(bytes(expected)).hexdigest()


@needs
def test_fio_nbd_engine_writes_land_in_the_file_and_verify(served, tmp_path):
    server, _disk, image = served
    out = run(
        "fio", "--name=w", "--ioengine=nbd", f"--uri={server.uri('disk0')}", "--rw=randwrite", "--bs=16k",
        "--size=8M", "--iodepth=8", "--randseed=5", "--refill_buffers", "--verify=crc32c", "--do_verify=1",
        "--verify_state_save=0",
        timeout=120,
    )
    assert "err= 0" in out
    # What a client reads back over NBD is the file, byte for byte.
    copy = tmp_path / "copy.img"
    run("nbdcopy", server.uri("disk0"), str(copy))
    assert sha(copy) == sha(image)
    assert image.read_bytes()[: 8 * MiB] != bytes(8 * MiB)


@needs
def test_nbdcopy_round_trip(served, tmp_path):
    server, _disk, image = served
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(1).randbytes(16 * MiB) + bytes(16 * MiB) + random.Random(2).randbytes(32 * MiB))
    run("nbdcopy", "--flush", str(source), server.uri("disk0"))
    assert sha(image) == sha(source)


def test_options_unknown_ones_are_refused_and_structured_replies_too(served):
    server, _disk, _image = served
    client = Raw(server.port)
    client.option(nbd.OPT_STRUCTURED_REPLY)
    assert client.reply(nbd.OPT_STRUCTURED_REPLY)[0] == nbd.REP_ERR_UNSUP
    client.option(99, b"whatever")
    assert client.reply(99)[0] == nbd.REP_ERR_UNSUP
    client.option(nbd.OPT_STARTTLS)
    assert client.reply(nbd.OPT_STARTTLS)[0] == nbd.REP_ERR_UNSUP
    client.option(nbd.OPT_LIST)
    assert client.reply(nbd.OPT_LIST) == (nbd.REP_SERVER, struct.pack(">I", 5) + b"disk0")
    assert client.reply(nbd.OPT_LIST)[0] == nbd.REP_ACK
    client.option(nbd.OPT_LIST, b"x")
    assert client.reply(nbd.OPT_LIST)[0] == nbd.REP_ERR_INVALID
    client.option(nbd.OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert client.reply(nbd.OPT_INFO)[0] == nbd.REP_ERR_UNKNOWN
    client.option(nbd.OPT_INFO, struct.pack(">I", 50) + b"short")
    assert client.reply(nbd.OPT_INFO)[0] == nbd.REP_ERR_INVALID
    infos = client.go("")  # the default export: the only one
    size, flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
    assert size == SIZE and flags == nbd.TRANSMISSION_FLAGS
    assert struct.unpack(">III", infos[nbd.INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
    client.request(nbd.CMD_DISC, 0, 0)
    assert client.sock.recv(1) == b""


def test_abort_and_export_name(served):
    server, _disk, _image = served
    client = Raw(server.port)
    client.option(nbd.OPT_ABORT)
    assert client.reply(nbd.OPT_ABORT)[0] == nbd.REP_ACK
    assert client.sock.recv(1) == b""
    client = Raw(server.port)
    client.option(nbd.OPT_EXPORT_NAME, b"disk0")
    size, flags = struct.unpack(">QH", client.recv(10))  # no 124 zero bytes: NO_ZEROES was agreed
    assert (size, flags) == (SIZE, nbd.TRANSMISSION_FLAGS)
    client.request(nbd.CMD_WRITE, 4096, 5, b"hello")
    assert client.simple_reply() == (0, b"")
    client.request(nbd.CMD_READ, 4096, 5)
    assert client.simple_reply(5) == (0, b"hello")
    client = Raw(server.port)
    client.option(nbd.OPT_EXPORT_NAME, b"missing")
    assert client.sock.recv(1) == b""  # the protocol has no way to refuse it but to hang up


def test_bad_requests_get_errors_and_leave_the_connection_usable(served):
    server, _disk, image = served
    before = sha(image)
    client = Raw(server.port)
    client.go()
    client.request(nbd.CMD_READ, SIZE - 10, 20)
    assert client.simple_reply(20)[0] == errno.EINVAL
    client.request(nbd.CMD_WRITE, SIZE - 2, 4, b"abcd")
    assert client.simple_reply()[0] == errno.ENOSPC
    client.request(nbd.CMD_WRITE_ZEROES, SIZE, 1)
    assert client.simple_reply()[0] == errno.ENOSPC
    client.request(nbd.CMD_TRIM, SIZE - 1, 2)
    assert client.simple_reply()[0] == errno.EINVAL
    client.request(nbd.CMD_READ, 0, 32 * MiB + 1)
    assert client.simple_reply()[0] == errno.EOVERFLOW
    client.request(nbd.CMD_WRITE, 0, 32 * MiB + 1, b"\x01" * (32 * MiB + 1))
    assert client.simple_reply()[0] == errno.EOVERFLOW
    client.request(42, 0, 0)
    assert client.simple_reply()[0] == errno.EINVAL
    assert sha(image) == before, "a refused request wrote something"
    # Still usable: a write, a FUA write, a flush, and reads.
    client.request(nbd.CMD_WRITE, MiB, 4, b"good")
    assert client.simple_reply() == (0, b"")
    client.request(nbd.CMD_WRITE, 2 * MiB, 4, b"fua!", flags=nbd.CMD_FLAG_FUA)
    assert client.simple_reply() == (0, b"")
    client.request(nbd.CMD_FLUSH, 0, 0)
    assert client.simple_reply() == (0, b"")
    client.request(nbd.CMD_READ, MiB, 4)
    assert client.simple_reply(4) == (0, b"good")
    with open(image, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4) == b"fua!"
    # A broken request header ends the connection.
    client.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, nbd.CMD_READ, 1, 0, 1))
    assert client.sock.recv(16) == b""


def test_bad_option_magic_and_unknown_client_flags_close_the_connection(served):
    server, _disk, _image = served
    client = Raw(server.port)
    client.sock.sendall(struct.pack(">QII", 0x1234, nbd.OPT_LIST, 0))
    assert client.sock.recv(1) == b""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.recv(18)
    sock.sendall(struct.pack(">I", 1 << 7))
    assert sock.recv(1) == b""


def test_pipelined_requests_each_get_their_own_reply(served):
    server, _disk, _image = served
    client = Raw(server.port)
    client.go()
    blocks = {h: os.urandom(4096) for h in range(1, 33)}
    for handle, data in blocks.items():
        client.request(nbd.CMD_WRITE, handle * 4096, 4096, data, handle=handle)
    seen = set()
    for _ in blocks:
        magic, error, handle = struct.unpack(">IIQ", client.recv(16))
        assert (magic, error) == (nbd.SIMPLE_REPLY_MAGIC, 0)
        seen.add(handle)
    assert seen == set(blocks)
    for handle, data in blocks.items():
        client.request(nbd.CMD_READ, handle * 4096, 4096, handle=handle)
        assert client.simple_reply(4096) == (0, data)


def test_a_client_that_does_not_read_its_replies_stalls_only_itself(served):
    """The disk's committer sends every connection's write replies: one client that stops
    reading (its replies back up) must not hold up the writes of another."""
    server, disk, _image = served
    slow = Raw(server.port, rcvbuf=4096)
    slow.go()
    block = os.urandom(4096)
    disk.hold()  # its WRITE waits at the committer ...
    try:
        slow.request(nbd.CMD_WRITE, 0, len(block), block, handle=1)
        # ... while its READ's reply (more than the sockets hold: the sender's buffer grows to
        # 4 MiB at most) is sent and backs up.
        slow.request(nbd.CMD_READ, 0, READ_BACKLOG, handle=2)
        readable, _, _ = select.select([slow.sock], [], [], 30)
        assert readable, "the server never began the read's reply"
    finally:
        disk.release()  # the committer writes the block and now has a reply for a client not reading
    other = Raw(server.port)
    other.go()
    other.sock.settimeout(30)
    other.write(SIZE - 4096, block, handle=3)  # timed out here when the committer was stuck
    other.request(nbd.CMD_READ, 0, 4096, handle=4)
    assert other.simple_reply(4096) == (0, block)
    other.close()
    # The slow client gets both replies, whole and in order, once it reads.
    slow.sock.settimeout(30)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    magic, error, handle = struct.unpack(">IIQ", slow.recv(16))
    assert (magic, error, handle) == (nbd.SIMPLE_REPLY_MAGIC, 0, 2)
    data = bytearray(READ_BACKLOG)
    view, got = memoryview(data), 0
    while got < READ_BACKLOG:
        n = slow.sock.recv_into(view[got:])
        assert n, "the server closed the connection"
        got += n
    assert struct.unpack(">IIQ", slow.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 1)
    slow.close()


def test_a_read_only_unlisted_server_refuses_writes_lists_nothing_and_has_no_default(tmp_path):
    """The master target's point views use a server made read_only and not listable."""
    image = tmp_path / "disk0.img"
    image.write_bytes(b"\x5a" * (1 * MiB))
    disk = DiskCapture("disk0", image)
    server = nbd.NbdServer("127.0.0.1", 0, read_only=True, listable=False)
    server.add_export("view-secret", disk)
    server.start()
    try:
        client = Raw(server.port)
        client.option(nbd.OPT_LIST)
        assert client.reply(nbd.OPT_LIST)[0] == nbd.REP_ERR_POLICY
        client.option(nbd.OPT_INFO, struct.pack(">I", 0) + struct.pack(">H", 0))
        assert client.reply(nbd.OPT_INFO)[0] == nbd.REP_ERR_UNKNOWN  # the empty name is no default
        infos = client.go("view-secret")
        size, flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
        assert size == 1 * MiB and flags == nbd.READ_ONLY_FLAGS and flags & nbd.TFLAG_READ_ONLY
        for command, payload in ((nbd.CMD_WRITE, b"hello"), (nbd.CMD_WRITE_ZEROES, b""), (nbd.CMD_TRIM, b"")):
            client.request(command, 0, 5, payload)
            assert client.simple_reply()[0] == errno.EPERM
        client.request(nbd.CMD_READ, 0, 5)
        assert client.simple_reply(5) == (0, b"\x5a" * 5)
        client.request(nbd.CMD_DISC, 0, 0)
    finally:
        server.stop()
        disk.close()
    assert image.read_bytes() == b"\x5a" * (1 * MiB)
