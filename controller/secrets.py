"""Secrets at rest: the configuration server encrypts credentials it must replay.

A vCenter password has to be sent to vCenter again at every discovery, so it
cannot be hashed; it is encrypted with AES-256-GCM under a key kept in
`<state_dir>/pki/secrets.key` (mode 0600, beside the CA key), and the store
holds only the ciphertext. The ciphertext is bound to the row it belongs to
(`context`, authenticated but not secret), so it cannot be copied onto another
endpoint. Format: "v1:" + base64url(nonce ‖ ciphertext ‖ tag).

Several configuration-server replicas sharing one PostgreSQL store must share
this key file as they share the CA.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from siterecovery.common import errors, pki

KEY_FILE = "secrets.key"
_PREFIX = "v1:"
_NONCE = 12


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise errors.Integrity("the secrets key must be 32 bytes", code="secrets-key-invalid")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    @classmethod
    def load_or_create(cls, pki_dir: Path) -> SecretBox:
        path = Path(pki_dir) / KEY_FILE
        key = pki.load_or_create_key_file(path)
        if len(key) != 32:
            raise errors.Integrity(
                f"{path} is not a secrets key ({len(key)} bytes, not 32)",
                hint="restore it from the backup of the configuration server's state directory",
                code="secrets-key-invalid",
            )
        return cls(key)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def decrypt(self, token: str, *, context: str) -> str:
        try:
            if not token.startswith(_PREFIX):
                raise ValueError("unknown format")
            raw = base64.urlsafe_b64decode(token[len(_PREFIX) :])
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], context.encode()).decode()
        except (ValueError, InvalidTag) as exc:
            raise errors.Integrity(
                "a stored credential cannot be decrypted with this server's secrets key",
                hint="restore pki/secrets.key from the backup, or run srctl vcenter update-credentials",
                code="secret-undecryptable",
            ) from exc
