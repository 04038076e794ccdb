"""A TCP proxy the tests put between two daemons, to cut and stall the link.

`TcpProxy` listens on 127.0.0.1 (port 0) and forwards every connection to
`target`, which may be set after the proxy started (the target daemon binds
port 0 and is told to advertise the proxy's port). `cut()` resets every open
connection; `stall()` stops moving bytes in both directions (connections stay
open, new ones are accepted and wait too) until `resume()`. It counts what it
did, for the test to print.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    stalls: int = 0
    bytes_forwarded: int = 0
    log: list[str] = field(default_factory=list)


class TcpProxy:
    CHUNK = 256 * 1024

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.stats = ProxyStats()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    # -- controls ---------------------------------------------------------------------
    def cut(self) -> int:
        """Reset every open connection (RST, as a dropped link looks); returns how many."""
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            self.stats.cuts += 1
        for sock in sockets:
            _reset(sock)
        self.stats.log.append(f"cut {len(sockets) // 2} connection(s)")
        return len(sockets) // 2

    def stall(self) -> None:
        self._flowing.clear()
        self.stats.stalls += 1
        self.stats.log.append("stalled")

    def resume(self) -> None:
        self._flowing.set()
        self.stats.log.append("resumed")

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        self.cut()

    # -- plumbing -----------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.target is None:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
                self.stats.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(self.CHUNK)
                if not data:
                    break
                self._flowing.wait()
                sink.sendall(data)
                self.stats.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _reset(sock)
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)


def _reset(sock: socket.socket) -> None:
    """Abort a connection with an RST. close() alone does not wake a pump thread blocked in
    recv() on the socket (Linux keeps the socket open for the call), so nothing was reset
    until data happened to flow: an idle link "cut" stayed up, and the test waiting for a
    reconnect timed out. shutdown(SHUT_RD) wakes the reader without sending a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
