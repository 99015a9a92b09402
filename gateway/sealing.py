"""Provider tokens at rest: sealed with AES-256-GCM before they reach the store.

A store shared by replicas (Redis) holds every signed-in user's refresh token. Whoever can read it
(a backup, a replica of Redis, a loose ACL) could otherwise act as every user at the provider. So
token records and app tokens are sealed with keys derived from the session secrets (HKDF-SHA256,
as the identity key is): replicas that share ``session.secrets`` share the keys, the first secret
seals, every secret opens, and a record sealed with a secret since removed reads as absent (its
user signs in again). The store key is the associated data, so a sealed value copied under another
key (another user's record) does not open.

Layout of a sealed value: ``b"\\x01"`` (version), 4 bytes naming the key, a 12-byte nonce, the
ciphertext with its 16-byte tag: 33 bytes more than the plaintext.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_TAG_BYTES = 16


def derive_key(secret: str, purpose: bytes, length: int = 32) -> bytes:
    """Key material for one ``purpose`` derived (HKDF-SHA256) from a secret: same inputs, same key."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose).derive(secret.encode())


class Sealer:
    """Seals and opens values stored under a key, with keys derived from the session secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        self._keys: dict[bytes, AESGCM] = {}
        for secret in secrets:
            key = derive_key(secret, b"gateway token records v1")
            self._keys.setdefault(hashlib.sha256(key).digest()[:_KEY_ID_BYTES], AESGCM(key))
        self._sealing_id = next(iter(self._keys))

    def seal(self, store_key: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = self._keys[self._sealing_id].encrypt(nonce, plaintext, store_key.encode())
        return _VERSION + self._sealing_id + nonce + ciphertext

    def open(self, store_key: str, sealed: bytes) -> bytes | None:
        """The plaintext, or None when it cannot be opened (another key, tampered, not sealed)."""
        start = 1 + _KEY_ID_BYTES
        if sealed[:1] != _VERSION or len(sealed) < start + _NONCE_BYTES + _TAG_BYTES:
            return None
        key = self._keys.get(sealed[1:start])
        if key is None:
            return None
        try:
            return key.decrypt(sealed[start : start + _NONCE_BYTES], sealed[start + _NONCE_BYTES :],
                               store_key.encode())
        except (InvalidTag, ValueError):
            return None

    @staticmethod
    def is_sealed(value: bytes) -> bool:
        """Whether ``value`` has the sealed layout (a value written before sealing has not)."""
        return value[:1] == _VERSION


def seal(sealer: Sealer | None, store_key: str, value: bytes) -> bytes:
    """``value`` as it goes to the store: sealed (the runtime always has a sealer), or as it is
    without one (a ``TokenManager`` or ``AppTokenCache`` built bare, as in unit tests)."""
    return sealer.seal(store_key, value) if sealer is not None else value


def unseal(sealer: Sealer | None, store_key: str, stored: bytes) -> bytes | None:
    """What ``seal`` was given: a sealed value opened (None when it cannot be: a removed secret,
    damage, no sealer), a value written before sealing existed as it is."""
    if not Sealer.is_sealed(stored):
        return stored
    return sealer.open(store_key, stored) if sealer is not None else None
