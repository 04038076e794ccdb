"""A small NBD server: fixed newstyle negotiation, simple replies, one thread per connection.

Written from the protocol description (NetworkBlockDevice/nbd, doc/proto.md).
It knows nothing of replication: each export is a `Backend` (read, write,
write_zeroes, trim, flush) and the source agent's capture layer is one.

Negotiation: the server offers NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES and
understands NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT, NBD_OPT_INFO and
NBD_OPT_GO (replying NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE: minimum 1,
preferred 4096, maximum 32 MiB). Every other option, NBD_OPT_STRUCTURED_REPLY
and NBD_OPT_STARTTLS included, gets NBD_REP_ERR_UNSUP, so only simple replies
are ever sent. The empty export name means the only export, when there is one.

Transmission: READ, WRITE (FUA honoured), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE
honoured) and DISC. The transmission flags are HAS_FLAGS | SEND_FLUSH |
SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN; multi-conn is safe
because every connection to an export goes to the same backend object (one
file descriptor, one page cache), so a FLUSH or FUA on one connection covers
what every connection had completed.

A connection reads requests on its own thread, buffered (one `recv` takes
every request that has arrived, `_Receiver`), and runs READ and FLUSH there
itself (a pread, an fdatasync: no hand-off). A backend that can queue writes
(`QueuedBackend`: the source agent's capture layer) gets WRITE, TRIM and
WRITE_ZEROES handed over without waiting: its committer thread journals and
applies them and answers, sending the replies of one commit with one send.
That send never blocks the committer, which every connection to the disk
shares: when the socket does not take a reply whole at once (a client that
stops reading its replies), the rest waits in the connection's queue of unsent
replies and a flusher thread of that connection (started when first needed)
sends it; replies posted meanwhile, the reader's own included, queue behind
it, so none interleave. The reader stops taking requests while more than
`MAX_UNSENT_BYTES` of its own replies wait, and unsent write replies still
count against the budget below, so such a client stalls only itself. So a
client with a queue depth above one (fio's iodepth) has several writes in one
group commit, and a write costs one hand-off (reader to committer), not three.
Replies may therefore leave out of order, which the protocol allows (the handle
pairs a reply with its request). A connection holds at most
`MAX_QUEUED_REQUESTS` / `MAX_QUEUED_BYTES` of unanswered writes: beyond that the
reader waits, and so the client. A connection that ends (DISC or otherwise)
first waits for its queued writes to be answered. Any other backend runs every
request on the reader's thread, one at a time.

A server made `read_only` (the master target's point views) adds
NBD_FLAG_READ_ONLY to the transmission flags, offers neither FUA, TRIM nor
WRITE_ZEROES, and answers every write with EPERM. One that is not `listable`
answers NBD_OPT_LIST with NBD_REP_ERR_POLICY and gives no default export for
the empty name: its export names are not to be guessed (they are the only
thing standing between a client and the data).

A request the server refuses gets an error reply and leaves the connection
usable: past the end of the export → EINVAL (ENOSPC for writes, as the
protocol asks); longer than the maximum block size → EOVERFLOW (a write's
payload is read and dropped first); unknown command → EINVAL. Nothing is
written for a refused request. A request or option with a wrong magic number is
a broken client: the connection is closed.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from siterecovery.common.logging import get_logger

log = get_logger(__name__)

DEFAULT_PORT = 10809

# -- protocol constants (doc/proto.md, "Values") --------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_TOO_BIG = REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

TRANSMISSION_FLAGS = (
    TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN
)
READ_ONLY_FLAGS = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * 1024 * 1024
# Option data longer than this is dropped and refused (an export name is at most 4 KiB).
MAX_OPTION_DATA = 64 * 1024
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
# Errors passed to the client as they are; any other is EIO.
_PASSED_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EPERM, errno.ENOMEM)
# Bounds on the writes one connection has queued at its backend (their payloads are held until done).
MAX_QUEUED_REQUESTS = 256
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Replies a connection holds unsent (its client is not reading them) before its reader stops
# taking requests; the writes' replies count against the request budget instead.
MAX_UNSENT_BYTES = 1024 * 1024
_DRAIN_CHUNK = 1024 * 1024
# What one recv may take in the transmission phase (see `_Receiver`).
_RECEIVE_BUFFER = 256 * 1024


class Backend(Protocol):
    """What an export reads and writes. Methods raise OSError (errno is sent to the client)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes, *, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, fua: bool, punch: bool) -> None: ...

    def trim(self, offset: int, length: int, *, fua: bool) -> None: ...

    def flush(self) -> None: ...


@runtime_checkable
class QueuedBackend(Backend, Protocol):
    """A backend that takes writes without blocking and completes them on its own thread.

    `done(None)` (or `done(error)`) is called once the write is durable as the
    backend promises and visible to reads; `after()` is then called once for the
    writes it completed together (the connection sends their replies at once).
    """

    def submit_write(
        self, offset: int, data: bytes, *, fua: bool, done: Callable[[OSError | None], None],
        after: Callable[[], None] | None = None,
    ) -> None: ...

    def submit_zeroes(
        self, offset: int, length: int, *, fua: bool, punch: bool, done: Callable[[OSError | None], None],
        after: Callable[[], None] | None = None,
    ) -> None: ...


class _Closed(Exception):
    """The peer went away, or broke the protocol: drop the connection."""


def _recv_exact(sock: socket.socket, length: int) -> bytearray:
    buf = bytearray(length)
    _recv_into(sock, memoryview(buf))
    return buf


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`, however many recvs it takes."""
    got, length = 0, len(view)
    while got < length:
        n = sock.recv_into(view[got:], length - got)
        if n == 0:
            raise _Closed("peer closed the connection")
        got += n


def _drain(sock: socket.socket, length: int) -> None:
    while length > 0:
        chunk = min(length, _DRAIN_CHUNK)
        _recv_exact(sock, chunk)
        length -= chunk


class _Receiver:
    """Buffered reading of the transmission phase: one `recv` takes every request that has arrived.

    A client with a queue depth (fio's iodepth 16) sends many requests back to
    back; reading each header and payload with its own `recv` released and took
    the GIL twice per request, and with the committer and shipper threads busy,
    taking it back waits up to the interpreter's switch interval (5 ms) each
    time: most of a 16 KiB write's latency through the export was that
    (bench/RESULTS.md, continuous). A payload longer than the buffer is read
    straight into its own bytes.
    """

    def __init__(self, sock: socket.socket, size: int = _RECEIVE_BUFFER) -> None:
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _fill(self, length: int) -> None:
        """Have at least `length` (<= the buffer's size) bytes buffered."""
        buffered = self._end - self._start
        if self._start + length > len(self._buf):
            self._buf[:buffered] = self._view[self._start:self._end]
            self._start, self._end = 0, buffered
        while self._end - self._start < length:
            n = self.sock.recv_into(self._view[self._end:])
            if n == 0:
                raise _Closed("peer closed the connection")
            self._end += n

    def request(self) -> tuple[int, int, int, int, int, int]:
        self._fill(_REQUEST.size)
        fields = _REQUEST.unpack_from(self._buf, self._start)
        self._start += _REQUEST.size
        return fields

    def read(self, length: int) -> bytes:
        if length <= len(self._buf):
            self._fill(length)
            data = bytes(self._view[self._start:self._start + length])
            self._start += length
            return data
        out = bytearray(length)
        view = memoryview(out)
        got = self._end - self._start
        view[:got] = self._view[self._start:self._end]
        self._start = self._end = 0
        _recv_into(self.sock, view[got:])
        return bytes(out)

    def drain(self, length: int) -> None:
        while length > 0:
            chunk = min(length, len(self._buf))
            self._fill(chunk)
            self._start += chunk
            length -= chunk


class NbdServer:
    """Serves named exports on one TCP address. Thread-safe; exports may come and go.

    `start()` binds (port 0 picks a free one) and returns the bound port;
    `stop()` closes the listener and every connection and waits for them.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, read_only: bool = False, listable: bool = True
    ) -> None:
        self.host = host
        self.requested_port = port
        self.read_only = read_only
        self.listable = listable
        self.transmission_flags = READ_ONLY_FLAGS if read_only else TRANSMISSION_FLAGS
        self.port = 0
        self._exports: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()

    # -- exports ----------------------------------------------------------------
    def add_export(self, name: str, backend: Backend) -> None:
        with self._lock:
            self._exports[name] = backend

    def remove_export(self, name: str) -> None:
        """Forget an export and drop the connections using it."""
        with self._lock:
            self._exports.pop(name, None)
            victims = [c for c in self._connections if c.export_name == name]
        for connection in victims:
            connection.close()

    def export_names(self) -> list[str]:
        with self._lock:
            return sorted(self._exports)

    def lookup(self, name: str) -> Backend | None:
        with self._lock:
            if name == "" and len(self._exports) == 1 and self.listable:
                return next(iter(self._exports.values()))
            return self._exports.get(name)

    def uri(self, name: str) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{self.port}/{name}"

    # -- life -------------------------------------------------------------------
    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.requested_port))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()
        log.info("nbd listening", address=self.host, port=self.port)
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        for connection in connections:
            connection.join(timeout)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            connection = _Connection(self, sock, f"{peer[0]}:{peer[1]}")
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._connections.add(connection)
            connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


def _after(views: list[memoryview], sent: int) -> list[memoryview]:
    """What of `views` is left once their first `sent` bytes went out."""
    for i, view in enumerate(views):
        if sent < len(view):
            return [view[sent:], *views[i + 1 :]]
        sent -= len(view)
    return []


class _Connection:
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export_name: str | None = None
        self._send_lock = threading.Lock()
        # Writes queued at the backend and not yet answered (the reader waits on it when too many).
        self._budget = threading.Condition()
        self._queued_requests = 0
        self._queued_bytes = 0
        # Replies of a commit, collected on the committer's thread and sent at once.
        self._replies: list[bytes] = []
        self._completed_requests = 0
        self._completed_bytes = 0
        # Replies the socket did not take at once, oldest first, with the (requests, bytes) of the
        # budget each gives back once sent; a flusher thread (started when first needed) sends them.
        self._out = threading.Condition()
        self._unsent: deque[tuple[list[memoryview], int, int]] = deque()
        self._unsent_bytes = 0
        self._out_closed = False
        self._flusher: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name=f"nbd-{peer}", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            result = self._negotiate()
            if result is not None:
                name, backend = result
                self.export_name = name
                log.info("nbd client attached", peer=self.peer, export=name)
                self._transmit(backend)
        except _Closed as exc:
            log.debug("nbd connection closed", peer=self.peer, why=str(exc))
        except OSError as exc:
            log.debug("nbd connection failed", peer=self.peer, error=str(exc))
        finally:
            self._closed = True
            self.sock.close()
            self.server._forget(self)

    # -- negotiation --------------------------------------------------------------
    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        with self._send_lock:
            for part in parts:
                self.sock.sendall(part)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)) + data)

    def _negotiate(self) -> tuple[str, Backend] | None:
        self._send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv_exact(self.sock, 4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Closed(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", _recv_exact(self.sock, 16))
            if magic != IHAVEOPT:
                raise _Closed(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                _drain(self.sock, length)
                if option == OPT_EXPORT_NAME:
                    raise _Closed("export name too long")
                self._reply(option, REP_ERR_TOO_BIG, b"option data too long")
                continue
            data = bytes(_recv_exact(self.sock, length))
            if option == OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                backend = self.server.lookup(name)
                if backend is None:
                    raise _Closed(f"no export {name!r}")  # the protocol gives no way to say so
                flags = self.server.transmission_flags
                self._send(struct.pack(">QH", backend.size, flags) + (b"" if no_zeroes else bytes(124)))
                return name, backend
            if option == OPT_ABORT:
                self._reply(option, REP_ACK)
                return None
            if option == OPT_LIST:
                if data:
                    self._reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                if not self.server.listable:
                    self._reply(option, REP_ERR_POLICY, b"this server does not list its exports")
                    continue
                for name in self.server.export_names():
                    raw = name.encode()
                    self._reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                self._reply(option, REP_ACK)
                continue
            if option in (OPT_INFO, OPT_GO):
                chosen = self._info(option, data)
                if chosen is not None and option == OPT_GO:
                    return chosen
                continue
            self._reply(option, REP_ERR_UNSUP, b"not supported by this server")

    def _info(self, option: int, data: bytes) -> tuple[str, Backend] | None:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; the export chosen, or None after an error reply."""
        if len(data) < 6:
            self._reply(option, REP_ERR_INVALID, b"option data too short")
            return None
        (name_length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + name_length + 2:
            self._reply(option, REP_ERR_INVALID, b"export name overruns the option")
            return None
        name = data[4:4 + name_length].decode("utf-8", "replace")
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            self._reply(option, REP_ERR_INVALID, b"information request list has the wrong length")
            return None
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        backend = self.server.lookup(name)
        if backend is None:
            self._reply(option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, backend.size, self.server.transmission_flags))
        self._reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK))
        if INFO_NAME in wanted:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + name.encode())
        self._reply(option, REP_ACK)
        return name, backend

    # -- transmission -------------------------------------------------------------
    def _transmit(self, backend: Backend) -> None:
        queued = backend if isinstance(backend, QueuedBackend) else None
        receiver = _Receiver(self.sock)
        try:
            while True:
                magic, flags, command, handle, offset, length = receiver.request()
                if magic != REQUEST_MAGIC:
                    raise _Closed(f"bad request magic {magic:#x}")
                if command == CMD_DISC:
                    return  # the finally clause waits for the requests in flight
                payload: bytes | None = None
                if command == CMD_WRITE:
                    if length > MAX_BLOCK:
                        receiver.drain(length)
                        self._simple_reply(handle, errno.EOVERFLOW)
                        continue
                    payload = receiver.read(length)
                if self.server.read_only and command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                    self._simple_reply(handle, errno.EPERM)
                    continue
                if queued is not None and command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and length:
                    self._submit(queued, flags, command, handle, offset, length, payload)
                else:
                    self._execute(backend, flags, command, handle, offset, length, payload)
        finally:
            with self._budget:
                self._budget.wait_for(lambda: not self._queued_requests)
            with self._out:  # every reply was sent (or dropped with a failed socket): the flusher ends
                self._out.wait_for(lambda: not self._unsent or self._out_closed)
                self._close_out_locked()

    def _submit(
        self, backend: QueuedBackend, flags: int, command: int, handle: int, offset: int, length: int,
        payload: bytes | None,
    ) -> None:
        """Hand a write to the backend's committer, which sends the reply (see `_completed`)."""
        if offset + length > backend.size:
            return self._simple_reply(handle, errno.EINVAL if command == CMD_TRIM else errno.ENOSPC)
        cost = length if payload is not None else 4096
        with self._budget:
            while self._queued_requests and (
                self._queued_requests >= MAX_QUEUED_REQUESTS or self._queued_bytes + cost > MAX_QUEUED_BYTES
            ):
                self._budget.wait()
            self._queued_requests += 1
            self._queued_bytes += cost

        def done(error: OSError | None) -> None:
            self._completed(handle, error, cost, command, offset, length)

        fua = bool(flags & CMD_FLAG_FUA)
        try:
            if payload is not None:
                backend.submit_write(offset, payload, fua=fua, done=done, after=self._send_completed)
            else:
                punch = command == CMD_TRIM or not flags & CMD_FLAG_NO_HOLE
                backend.submit_zeroes(offset, length, fua=fua, punch=punch, done=done, after=self._send_completed)
        except OSError as exc:  # the backend is closing: answer here (the committer may be finishing)
            self._settle(1, cost)
            self._simple_reply(handle, exc.errno if exc.errno in _PASSED_ERRNOS else errno.EIO)

    def _completed(self, handle: int, error: OSError | None, cost: int, command: int, offset: int, length: int) -> None:
        """On the committer's thread: note the reply; `_send_completed` sends the commit's replies at once."""
        code = 0
        if error is not None:
            code = error.errno if error.errno in _PASSED_ERRNOS else errno.EIO
            log.warning("nbd request failed", peer=self.peer, command=command, offset=offset, length=length,
                        error=str(error))
        self._replies.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))
        self._completed_requests += 1
        self._completed_bytes += cost

    def _send_completed(self) -> None:
        """On the committer's thread: send the commit's replies without ever blocking it (a client
        that does not read its replies must not stall the disk's other writers)."""
        replies, self._replies = self._replies, []
        requests, self._completed_requests = self._completed_requests, 0
        cost, self._completed_bytes = self._completed_bytes, 0
        self._post([b"".join(replies)], requests, cost)

    def _simple_reply(self, handle: int, error: int, data: bytes = b"") -> None:
        """On the reader's thread: send a reply; wait (this connection only) while too much is unsent."""
        header = _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        self._post([header, data] if data else [header], 0, 0)
        with self._out:
            self._out.wait_for(lambda: self._unsent_bytes <= MAX_UNSENT_BYTES or self._out_closed)

    # -- replies that do not block the sender -------------------------------------------
    def _post(self, parts: list[bytes], requests: int, cost: int) -> None:
        """Send `parts` now if the socket takes them whole without blocking; queue the rest
        for the flusher. Replies never interleave: while any wait, new ones queue behind them."""
        views = [memoryview(part) for part in parts if part]
        with self._out:
            if self._out_closed:
                self._settle(requests, cost)
                return
            if not self._unsent:
                try:
                    sent = self.sock.sendmsg(views, [], socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close_out_locked()
                    self._settle(requests, cost)
                    return
                views = _after(views, sent)
                if not views:
                    self._settle(requests, cost)
                    return
            self._unsent.append((views, requests, cost))
            self._unsent_bytes += sum(map(len, views))
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name=f"nbd-out-{self.peer}", daemon=True)
                self._flusher.start()
            self._out.notify_all()

    def _flush_loop(self) -> None:
        """Send queued replies in order, blocking on the socket (never holding `_out` meanwhile)."""
        while True:
            with self._out:
                self._out.wait_for(lambda: self._unsent or self._out_closed)
                if self._out_closed:
                    return
                views, requests, cost = self._unsent[0]  # stays queued while sent: later ones wait
            try:
                for view in views:
                    self.sock.sendall(view)
            except OSError:
                with self._out:
                    self._close_out_locked()
                self.close()  # the reader notices and ends the connection
                return
            with self._out:
                self._unsent.popleft()
                self._unsent_bytes -= sum(map(len, views))
                self._settle(requests, cost)
                self._out.notify_all()

    def _close_out_locked(self) -> None:
        """The socket failed or the connection ends: unsent replies are dropped, their budget given back."""
        self._out_closed = True
        for _views, requests, cost in self._unsent:
            self._settle(requests, cost)
        self._unsent.clear()
        self._unsent_bytes = 0
        self._out.notify_all()

    def _settle(self, requests: int, cost: int) -> None:
        if requests:
            with self._budget:
                self._queued_requests -= requests
                self._queued_bytes -= cost
                self._budget.notify()

    def _execute(
        self, backend: Backend, flags: int, command: int, handle: int, offset: int, length: int,
        payload: bytes | None,
    ) -> None:
        size = backend.size
        fua = bool(flags & CMD_FLAG_FUA)
        try:
            if command == CMD_READ:
                if length > MAX_BLOCK:
                    return self._simple_reply(handle, errno.EOVERFLOW)
                if offset + length > size:
                    return self._simple_reply(handle, errno.EINVAL)
                data = backend.read(offset, length) if length else b""
                if len(data) != length:
                    return self._simple_reply(handle, errno.EIO)
                return self._simple_reply(handle, 0, data)
            if command == CMD_WRITE:
                assert payload is not None
                if offset + length > size:
                    return self._simple_reply(handle, errno.ENOSPC)
                if length:
                    backend.write(offset, payload, fua=fua)
                return self._simple_reply(handle, 0)
            if command == CMD_FLUSH:
                backend.flush()
                return self._simple_reply(handle, 0)
            if command in (CMD_TRIM, CMD_WRITE_ZEROES):
                if offset + length > size:
                    return self._simple_reply(handle, errno.ENOSPC if command == CMD_WRITE_ZEROES else errno.EINVAL)
                if length:
                    if command == CMD_TRIM:
                        backend.trim(offset, length, fua=fua)
                    else:
                        backend.write_zeroes(offset, length, fua=fua, punch=not flags & CMD_FLAG_NO_HOLE)
                return self._simple_reply(handle, 0)
            return self._simple_reply(handle, errno.EINVAL)
        except OSError as exc:
            code = exc.errno if exc.errno in _PASSED_ERRNOS else errno.EIO
            log.warning("nbd request failed", peer=self.peer, command=command, offset=offset, length=length,
                        error=str(exc))
            return self._simple_reply(handle, code)
        except Exception as exc:  # a bug must not hang the client: fail the request
            log.exception("nbd request crashed", peer=self.peer, command=command, error=str(exc))
            return self._simple_reply(handle, errno.EIO)

