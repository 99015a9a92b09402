"""A login in progress: the opaque ``state``, the PKCE pair, and the ``next`` path.

``state`` is what travels through the provider and back: random, ``[A-Za-z0-9]{1,64}`` (Tencent
Meeting's limit, the strictest of the providers), single use, valid 10 minutes. What it stands for
stays server-side in a ``PendingLogin``, bound to the browser that started it by a random value
kept in a cookie (CSRF: a state injected into another browser is worthless there).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import string
import time
from dataclasses import asdict, dataclass
from urllib.parse import unquote, urlsplit

STATE_TTL_S = 600
_ALPHABET = string.ascii_letters + string.digits
_STATE = re.compile(r"[A-Za-z0-9]{1,64}")
_MAX_NEXT = 2048


def new_state() -> str:
    """43 random alphanumeric characters (about 256 bits)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(43))


def is_valid_state(value: str) -> bool:
    return bool(_STATE.fullmatch(value))


def new_browser_binding() -> str:
    return secrets.token_urlsafe(32)


def binding_digest(binding: str) -> str:
    return hashlib.sha256(binding.encode()).hexdigest()


def pkce_pair() -> tuple[str, str]:
    """A PKCE (RFC 7636) verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def safe_next(raw: str | None) -> str:
    """``raw`` if it is a same-origin relative path, else ``/``.

    Rejects absolute and scheme-relative URLs (``https:``, ``//x``, ``/\\x``), scripts
    (``javascript:``), control characters, and the same tricks hidden behind percent-encoding or
    padding: the value is decoded repeatedly and every form must be safe.
    """
    if not raw or len(raw) > _MAX_NEXT:
        return "/"
    if " " in raw.split("?", 1)[0]:
        return "/"  # a raw space is no URL character; an encoded one (%20) is
    candidate = raw
    for _ in range(4):
        if not _is_plain_path(candidate):
            return "/"
        decoded = unquote(candidate)
        if decoded == candidate:
            return raw
        candidate = decoded
    return "/"


def _is_plain_path(value: str) -> bool:
    if not value.startswith("/") or value.startswith(("//", "/\\")):
        return False
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        return False
    if "\\" in value.split("?", 1)[0]:
        return False
    parts = urlsplit(value)
    return not parts.scheme and not parts.netloc


@dataclass(frozen=True)
class PendingLogin:
    """What a ``state`` stands for; kept in the store under ``state:<value>``."""

    provider: str
    next_path: str
    binding: str  # sha256 of the browser-binding cookie
    code_verifier: str | None
    created_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PendingLogin:
        return cls(**json.loads(data))

    def matches_browser(self, binding_cookie: str | None) -> bool:
        if not binding_cookie:
            return False
        return hmac.compare_digest(self.binding, binding_digest(binding_cookie))

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.created_at > STATE_TTL_S
