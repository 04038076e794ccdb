"""What the source agent keeps about one pair between runs.

Layout of `<state_dir>/pairs/<pair_id>/`::

    state.json      this file's `PairState` (replaced atomically, fsynced)
    seq.json        the seq lease (capture.SeqLease)
    journal/        the pair's journal (capture.PairJournal)
    scan.hashes     scan mode: the last acknowledged hash of every block (scan.py)

`state.json` only ever moves forward on an acknowledgement from the process
server (the sync cursor and what the sync did up to it; for a delta sync also
past blocks found identical once every frame before them is acknowledged, see
delta.py) or after a frame is journaled (the sync phase "copying"), so a crash leaves it behind the truth, never ahead of it: the
agent then sends a little again, and loses nothing. When a pair is forgotten
its directory is removed except `seq.json`, so a pair id that comes back never
reuses a seq.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from siterecovery.common import daemon, errors

STATE_FILE = "state.json"
SYNC_COPYING = "copying"
SYNC_DONE = "done"
SYNC_FULL, SYNC_DELTA = "full", "delta"
MAX_TAGS_REMEMBERED = 256


@dataclass(frozen=True)
class TagSpec:
    """A recovery point to put into a pair's stream."""

    tag_id: str
    kind: int
    group_id: str = ""
    note: str = ""
    on_demand: bool = False


@dataclass
class PairState:
    pair_id: str
    disk_name: str
    disk_size: int
    mode: str  # "nbd" or "scan"
    sync_phase: str = SYNC_COPYING
    # Initial sync: every byte below this is acknowledged by the process server.
    sync_cursor: int = 0
    # "full" (copy every block) or "delta" (send the blocks whose hash differs from the target's).
    sync_kind: str = SYNC_FULL
    # What the sync did up to `sync_cursor` (saved with it): write payload bytes
    # its frames carried; delta: bytes of the blocks that differed, digest bytes received.
    sync_sent_bytes: int = 0
    sync_differing_bytes: int = 0
    sync_hash_bytes: int = 0
    # The seq of the current (or last) sync's INITIAL_STARTED marker: a delta sync's digests are
    # read only once the target has applied the stream through it (delta.py).
    sync_started_seq: int = 0
    # Why the current sync runs when it is not the pair's first ("" otherwise): shown in its status.
    sync_cause: str = ""
    # A catch-up of changed blocks (catchup.py) journaled INITIAL_STARTED and still owes INITIAL_DONE.
    catchup_marked: bool = False
    # Tag ids of requested tags already inserted (requests repeat until the target has the point).
    tags_done: list[str] = field(default_factory=list)

    @staticmethod
    def path(directory: Path) -> Path:
        return directory / STATE_FILE

    @classmethod
    def load(cls, directory: Path) -> PairState | None:
        path = cls.path(directory)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise errors.Integrity(
                f"pair state {path} is unreadable",
                hint="remove the pair's directory to resynchronise it from scratch",
                code="pair-state-damaged",
            ) from exc
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, directory: Path) -> None:
        daemon.write_json_atomically(self.path(directory), asdict(self), mode=0o600)

    def remember_tag(self, tag_id: str) -> None:
        self.tags_done.append(tag_id)
        del self.tags_done[:-MAX_TAGS_REMEMBERED]


def forget_pair(directory: Path) -> None:
    """Remove a pair's state, keeping only its seq lease."""
    if not directory.exists():
        return
    for entry in directory.iterdir():
        if entry.name == "seq.json":
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
