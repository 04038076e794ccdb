"""The process server's spool: one durable frame log per pair, bounded in total.

On-disk layout::

    <spool_dir>/pairs/<pair_id>/     a FrameLog (see common/framelog.py for its files
                                     and what a crash leaves behind)

A pair's log holds the frames a source agent sent (checked and compressed),
from the first one the master target has not acknowledged to the last one
spooled; `last_seq` of the log is what the process server holds durably.

The bound: the unreleased bytes of every log plus the bytes of frames a stream
has read but not yet written (`reserve`) never pass `limit_bytes`; a receiver
that cannot reserve waits (it stops reading its stream, so gRPC flow control
holds the source back) until a forwarder releases frames. A single frame larger
than the whole bound still passes once the spool is empty, so nothing deadlocks.
Released frames wait on disk until their segment is deleted: at most one
segment (`segment_bytes`) per pair beyond the bound.

With a cipher (setting `spool_encryption`), every record is sealed with
AES-256-GCM before it reaches the disk (common/sealing.py).

Every log is opened at start, so the bound counts pairs whose forwarding has
not started yet. A pair whose log is damaged is refused (errors.Integrity) and
reported as a critical problem; the others go on.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from siterecovery.common import errors
from siterecovery.common.framelog import FrameLog
from siterecovery.common.logging import get_logger
from siterecovery.common.pb import common_pb2
from siterecovery.common.sealing import RecordCipher

log = get_logger(__name__)

WARNING_FRACTION = 0.8
MAX_SEGMENT_BYTES = 64 * 1024 * 1024
_PAIR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How often a waiting receiver looks at its own cancellation even without news.
_WAIT_SLICE = 1.0


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        limit_bytes: int,
        segment_bytes: int | None = None,
        fsync: bool = True,
        cipher: RecordCipher | None = None,
        seal: bool = True,
    ) -> None:
        if limit_bytes <= 0:
            raise errors.InvalidInput(f"spool_limit_bytes {limit_bytes} must be positive", code="config-range")
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(MAX_SEGMENT_BYTES, limit_bytes // 16))
        self._fsync = fsync
        self._cipher = cipher
        self._seal = seal
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._logs: dict[str, FrameLog] = {}
        self._damaged: dict[str, errors.SiteRecoveryError] = {}
        self._reserved = 0
        self._waiting = 0
        self._pressure_listeners: list[Callable[[], None]] = []
        self._disk_full: str | None = None
        self._closed = False
        (self.directory / "pairs").mkdir(parents=True, exist_ok=True)
        for path in sorted((self.directory / "pairs").iterdir()):
            if path.is_dir() and _PAIR_ID.fullmatch(path.name):
                try:
                    self._open_locked(path.name)
                except errors.SiteRecoveryError as exc:
                    log.error("spool: a pair's log is damaged", pair=path.name, error=exc.message)
                    self._damaged[path.name] = exc

    # -- logs ------------------------------------------------------------------
    def _open_locked(self, pair_id: str) -> FrameLog:
        frame_log = FrameLog(
            self.directory / "pairs" / pair_id, segment_bytes=self.segment_bytes, fsync=self._fsync,
            cipher=self._cipher, seal=self._seal,
        )
        self._logs[pair_id] = frame_log
        return frame_log

    def log(self, pair_id: str) -> FrameLog:
        """The pair's log, opened (or created) on first use."""
        if not _PAIR_ID.fullmatch(pair_id):
            raise errors.InvalidInput(f"pair id {pair_id!r} is not valid", code="pair-id")
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the spool is closed: the process server is stopping", code="stopping")
            if pair_id in self._damaged:
                raise self._damaged[pair_id]
            found = self._logs.get(pair_id)
            return found if found is not None else self._open_locked(pair_id)

    def pair_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._logs)

    # -- the bound ---------------------------------------------------------------
    def _used_locked(self) -> int:
        return self._reserved + sum(frame_log.pending_bytes for frame_log in self._logs.values())

    @property
    def used_bytes(self) -> int:
        """Unreleased bytes of every pair plus bytes reserved by receivers."""
        with self._lock:
            return self._used_locked()

    @property
    def damaged_count(self) -> int:
        """Pairs whose log was refused as damaged at start."""
        with self._lock:
            return len(self._damaged)

    @property
    def waiting(self) -> int:
        """How many receivers are waiting for space right now."""
        with self._lock:
            return self._waiting

    def add_pressure_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever a receiver waits for space (a forwarder then releases
        what the master target acknowledged without waiting for its pace)."""
        with self._lock:
            self._pressure_listeners.append(listener)

    def remove_pressure_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._pressure_listeners:
                self._pressure_listeners.remove(listener)

    def reserve(self, nbytes: int, *, cancelled: Callable[[], bool]) -> bool:
        """Wait until `nbytes` fit under the bound and take them; False when `cancelled()`.

        Call `settle(nbytes)` once the frame is in its log (or dropped).
        """
        with self._space:
            self._waiting += 1
            try:
                while True:
                    if cancelled() or self._closed:
                        return False
                    used = self._used_locked()
                    if used + nbytes <= self.limit_bytes or used == 0:
                        self._reserved += nbytes
                        return True
                    for listener in self._pressure_listeners:  # each takes only its own lock
                        listener()
                    self._space.wait(_WAIT_SLICE)
            finally:
                self._waiting -= 1

    def settle(self, nbytes: int) -> None:
        """Give back a reservation (its frame is now counted in its log, or was dropped)."""
        if nbytes:
            with self._space:
                self._reserved -= nbytes
                self._space.notify_all()

    def release(self, frame_log: FrameLog, seq: int) -> None:
        """Release a pair's frames through `seq` and wake receivers waiting for space."""
        before = frame_log.released_seq
        frame_log.release_through(seq)
        if frame_log.released_seq != before:
            self.wake()

    def wake(self) -> None:
        with self._space:
            self._space.notify_all()

    def note_disk_full(self, message: str | None) -> None:
        """An append ran out of disk space (`message`), or one went through again (None).

        The bound is counted in bytes the spool holds, not in what the disk has left:
        a disk smaller than `limit_bytes`, or shared with something else, fills first.
        Nothing is lost either way (the append wrote nothing and the source keeps the
        frames in its journal); this makes it a problem an administrator sees."""
        with self._lock:
            self._disk_full = message

    # -- health ------------------------------------------------------------------
    def problems(self) -> list[common_pb2.Problem]:
        """`spool-high` (warning) from 80 % full; `spool-full` (critical) when sources are held back."""
        with self._lock:
            used, waiting, damaged = self._used_locked(), self._waiting, dict(self._damaged)
            disk_full = self._disk_full
        out = [
            common_pb2.Problem(
                code="spool-damaged",
                severity=common_pb2.SEVERITY_CRITICAL,
                message=f"spool of pair {pair_id} is damaged: {exc.message}; re-protect the pair",
            )
            for pair_id, exc in sorted(damaged.items())
        ]
        fraction = used / self.limit_bytes
        where = f"spool {self.directory} holds {used} of {self.limit_bytes} bytes ({fraction:.0%})"
        if disk_full is not None:
            out.append(
                common_pb2.Problem(
                    code="spool-disk-full",
                    severity=common_pb2.SEVERITY_CRITICAL,
                    message=f"the disk of spool {self.directory} is full ({disk_full}): sources are held back "
                    "(their journals keep the writes) until the master targets catch up; free space there, or "
                    "set spool_limit_bytes below what the disk can hold",
                )
            )
        elif waiting or fraction >= 1.0:
            out.append(
                common_pb2.Problem(
                    code="spool-full",
                    severity=common_pb2.SEVERITY_CRITICAL,
                    message=f"{where}: sources are held back until the master targets catch up; "
                    "check that the master targets are reachable, or raise spool_limit_bytes",
                )
            )
        elif fraction >= WARNING_FRACTION:
            out.append(
                common_pb2.Problem(
                    code="spool-high",
                    severity=common_pb2.SEVERITY_WARNING,
                    message=f"{where}: the master targets are falling behind; check that they are reachable",
                )
            )
        return out

    def close(self) -> None:
        with self._space:
            self._closed = True
            logs = list(self._logs.values())
            self._space.notify_all()
        for frame_log in logs:
            frame_log.close()
