"""A raw NBD client for the tests: the corners real clients never reach, and
writers whose every request the test orders itself (one write acknowledged before
the next is sent)."""

from __future__ import annotations

import socket
import struct
from urllib.parse import urlsplit

from siterecovery.common import nbd


class Raw:
    def __init__(self, port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None) -> None:
        """`rcvbuf`: a small receive buffer, set before connecting, for a client slow to read."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, port))
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert flags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        self.sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)

    def reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
        assert (magic, opt) == (nbd.OPT_REPLY_MAGIC, option)
        return kind, self.recv(length)

    def go(self, name: str = "disk0") -> dict[int, bytes]:
        raw = name.encode()
        self.option(nbd.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE))
        infos = {}
        while True:
            kind, data = self.reply(nbd.OPT_GO)
            if kind == nbd.REP_ACK:
                return infos
            assert kind == nbd.REP_INFO, hex(kind)
            infos[struct.unpack_from(">H", data)[0]] = data[2:]

    def request(self, command: int, offset: int, length: int, payload: bytes = b"", flags: int = 0,
                handle: int = 7) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length) + payload)

    def simple_reply(self, length: int = 0) -> tuple[int, bytes]:
        magic, error, _handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return error, self.recv(length) if not error and length else b""

    def write(self, offset: int, payload: bytes, handle: int = 7) -> None:
        """One WRITE, acknowledged by the server before this returns."""
        self.request(nbd.CMD_WRITE, offset, len(payload), payload, handle=handle)
        error, _ = self.simple_reply()
        if error:
            raise OSError(error, f"NBD write at {offset} failed")

    def close(self) -> None:
        try:
            self.request(nbd.CMD_DISC, 0, 0)
        finally:
            self.sock.close()

    @classmethod
    def open(cls, uri: str) -> Raw:
        """Connect to `nbd://host:port/export` and select the export."""
        parts = urlsplit(uri)
        client = cls(parts.port or 10809, parts.hostname or "127.0.0.1")
        client.go(parts.path.lstrip("/"))
        return client
