"""DingTalk's HTTP event-callback crypto (fact sheet section 8.2; official libs ``DingTalk-Callback-Crypto``).

DingTalk POSTs ``<callback>?signature=&timestamp=&nonce=`` (the libs also accept ``msg_signature``
and ``timeStamp``) with the JSON body ``{"encrypt": "<base64>"}``, and wants an encrypted
``success`` back, else it pushes the event again and again.

- signature: ``sha1_hex("".join(sorted([token, timestamp, nonce, encrypt])))``;
- key: ``base64decode(EncodingAESKey + "=")``, 32 bytes; AES-256-CBC with ``IV = key[:16]``;
- plaintext: ``random(16) ‖ len(msg) as 4-byte big-endian ‖ msg (UTF-8) ‖ owner key``; the length
  counts UTF-8 **bytes** (the Java lib's choice; the Python 3 lib counts characters, which breaks
  on non-ASCII text);
- padding: PKCS#7 with a block size of **32** (1..32 bytes), not AES's 16;
- the owner key that trails the message is the suiteKey (third-party apps), the appKey (internal
  apps' event subscription) or the corpId (legacy ``register_call_back``); a mismatch is 900010.

Errors carry the libs' codes (900001-900010), so logs read like DingTalk's own documentation.
The gateway (``provider.py``) and the emulator (``sandbox.py``) both use this module; the tests
check it against vectors computed independently (``openssl``) and the one published in the
official repository.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import string
import struct
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK_SIZE = 32  # PKCS#7 block size of DingTalk's padding (not the AES block size)
_AES_KEY = re.compile(r"[A-Za-z0-9]{43}")
_TOKEN = re.compile(r"[A-Za-z0-9]{3,32}")
_NONCE_CHARS = string.ascii_letters + string.digits

# The official libraries' error codes (sheet 8.2).
ILLEGAL_PLAINTEXT = 900001
BAD_TIMESTAMP = 900002
BAD_NONCE = 900003
BAD_AES_KEY = 900004
SIGNATURE_MISMATCH = 900005
SIGNATURE_FAILED = 900006
ENCRYPT_FAILED = 900007
DECRYPT_FAILED = 900008
LENGTH_MISMATCH = 900009
OWNER_KEY_MISMATCH = 900010


class CallbackCryptoError(Exception):
    """A callback that cannot be trusted or read; ``code`` is the official libs' 9000xx code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def valid_aes_key(value: str) -> bool:
    """The console's EncodingAESKey: 43 letters and digits."""
    return bool(_AES_KEY.fullmatch(value))


def valid_token(value: str) -> bool:
    """The console's callback Token: 3 to 32 letters and digits."""
    return bool(_TOKEN.fullmatch(value))


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """``sha1_hex`` of the four strings sorted lexicographically and concatenated."""
    joined = "".join(sorted([token, timestamp, nonce, encrypt]))
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()  # noqa: S324 - the protocol fixes SHA-1


def random_nonce(length: int = 16) -> str:
    return "".join(secrets.choice(_NONCE_CHARS) for _ in range(length))


def pkcs7_pad(data: bytes) -> bytes:
    pad = BLOCK_SIZE - len(data) % BLOCK_SIZE  # 1..32: a full block when already aligned
    return data + bytes([pad]) * pad


def pkcs7_unpad(data: bytes) -> bytes:
    if not data:
        raise CallbackCryptoError(DECRYPT_FAILED, "the decrypted message is empty")
    pad = data[-1]
    if pad < 1 or pad > BLOCK_SIZE or pad > len(data) or data[-pad:] != bytes([pad]) * pad:
        raise CallbackCryptoError(DECRYPT_FAILED, "the decrypted message is not padded correctly")
    return data[:-pad]


class CallbackCrypto:
    """Verify, decrypt and answer the callbacks of one app (``token``, ``aes_key``, ``owner_key``)."""

    def __init__(self, token: str, aes_key: str, owner_key: str) -> None:
        if not valid_aes_key(aes_key):
            raise CallbackCryptoError(BAD_AES_KEY, "the EncodingAESKey must be 43 letters and digits")
        self.token = token
        self.owner_key = owner_key
        self.key = base64.b64decode(aes_key + "=")
        if len(self.key) != 32:  # pragma: no cover - 43 base64 chars always decode to 32 bytes
            raise CallbackCryptoError(BAD_AES_KEY, "the EncodingAESKey does not decode to 32 bytes")

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    # -- sending (the emulator's side, and the encrypted "success" reply) ----------------------

    def encrypt(self, message: str, *, random_prefix: bytes | None = None) -> str:
        """The ``encrypt`` field for ``message``; ``random_prefix`` (16 bytes) only for test vectors."""
        prefix = secrets.token_bytes(16) if random_prefix is None else random_prefix
        if len(prefix) != 16:
            raise CallbackCryptoError(ENCRYPT_FAILED, "the random prefix must be 16 bytes")
        body = message.encode("utf-8")
        plain = prefix + struct.pack(">I", len(body)) + body + self.owner_key.encode("utf-8")
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(pkcs7_pad(plain)) + encryptor.finalize()).decode("ascii")

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return signature(self.token, timestamp, nonce, encrypt)

    def encrypted_map(self, message: str, *, timestamp: str | None = None, nonce: str | None = None) -> dict[str, str]:
        """The reply body: ``{msg_signature, timeStamp, nonce, encrypt}`` (Java's ms timestamp by default)."""
        stamp = timestamp if timestamp is not None else str(int(time.time() * 1000))
        nonce_value = nonce if nonce is not None else random_nonce()
        encrypted = self.encrypt(message)
        return {
            "msg_signature": self.sign(stamp, nonce_value, encrypted),
            "timeStamp": stamp,
            "nonce": nonce_value,
            "encrypt": encrypted,
        }

    # -- receiving ----------------------------------------------------------------------------

    def verify(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        if not timestamp:
            raise CallbackCryptoError(BAD_TIMESTAMP, "the callback has no timestamp")
        if not nonce:
            raise CallbackCryptoError(BAD_NONCE, "the callback has no nonce")
        expected = self.sign(timestamp, nonce, encrypt)
        if not hmac.compare_digest(expected.encode("ascii"), msg_signature.lower().encode("utf-8", "replace")):
            raise CallbackCryptoError(SIGNATURE_MISMATCH, "the callback signature does not match the Token")

    def decrypt(self, encrypt: str) -> str:
        """The message inside ``encrypt``, after the padding, length and owner-key checks."""
        try:
            raw = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise CallbackCryptoError(DECRYPT_FAILED, "the encrypted field is not base64") from None
        if not raw or len(raw) % 16:
            raise CallbackCryptoError(DECRYPT_FAILED, "the encrypted field is not whole AES blocks")
        decryptor = self._cipher().decryptor()
        plain = pkcs7_unpad(decryptor.update(raw) + decryptor.finalize())
        if len(plain) < 20:
            raise CallbackCryptoError(ILLEGAL_PLAINTEXT, "the decrypted message is too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise CallbackCryptoError(LENGTH_MISMATCH, "the message length does not fit the decrypted data")
        body, owner = plain[20 : 20 + length], plain[20 + length :]
        if not hmac.compare_digest(owner, self.owner_key.encode("utf-8")):
            raise CallbackCryptoError(OWNER_KEY_MISMATCH, "the callback belongs to another app (owner key mismatch)")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackCryptoError(ILLEGAL_PLAINTEXT, "the decrypted message is not UTF-8") from None

    def open(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> str:
        """Verify the signature, then decrypt: the event's JSON text."""
        self.verify(msg_signature, timestamp, nonce, encrypt)
        return self.decrypt(encrypt)

    def open_json(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> dict[str, Any]:
        text = self.open(msg_signature, timestamp, nonce, encrypt)
        try:
            event = json.loads(text)
        except ValueError:
            raise CallbackCryptoError(ILLEGAL_PLAINTEXT, "the decrypted event is not JSON") from None
        if not isinstance(event, dict):
            raise CallbackCryptoError(ILLEGAL_PLAINTEXT, "the decrypted event is not a JSON object")
        return event
