"""Encryption at rest of frame-log records (the process server's spool), AES-256-GCM.

A sealed record body is::

    0x01 | nonce (12 random bytes) | AES-GCM(key, nonce, frame bytes, aad)

with `aad` = the log's name (its directory, the pair id) and the record's seq,
so a record copied into another pair's log or to another place in the same log
fails to open. A plain body is a serialized `Frame`, which never starts with
0x01 (that would be protobuf field number 0), so sealed and plain records can
share a log: turning encryption on or off needs no migration, and the records
written before stay readable.

The key is 32 random bytes in a file of its own (mode 0600, created on first
use beside the daemon's identity). It is never logged; losing it loses the
spooled frames, which the process server then fetches again from the source
(the pair resyncs), so nothing acknowledged to a user is lost with it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from siterecovery.common import errors, pki

SEALED = 0x01
NONCE_BYTES = 12
KEY_BYTES = 32


class RecordCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise errors.InvalidInput(f"an encryption key is {KEY_BYTES} bytes, not {len(key)}", code="key-invalid")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "RecordCipher(<key hidden>)"

    @classmethod
    def load_or_create(cls, path: Path) -> RecordCipher:
        """The key in `path`, made (0600, atomically) when the file does not exist yet."""
        return cls(pki.load_or_create_key_file(path, KEY_BYTES))

    def seal(self, context: str, seq: int, body: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return bytes([SEALED]) + nonce + self._aead.encrypt(nonce, body, _aad(context, seq))

    def open(self, context: str, seq: int, sealed: bytes) -> bytes:
        nonce = sealed[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + NONCE_BYTES :], _aad(context, seq))
        except Exception as exc:  # cryptography's InvalidTag carries no message
            raise errors.Integrity(
                f"record {seq} of {context} does not decrypt: wrong key, or the record was altered or moved",
                hint="check that the spool key file is the one this spool was written with",
                code="record-sealed-badly",
            ) from exc


def is_sealed(body: bytes | memoryview) -> bool:
    return len(body) > 0 and body[0] == SEALED


def _aad(context: str, seq: int) -> bytes:
    return context.encode() + struct.pack(">Q", seq)
