"""A login in progress: the opaque ``state``, the PKCE pair, and the ``next`` path.

``state`` is what travels through the provider and back: ``[A-Za-z0-9]{1,64}`` (Tencent Meeting's
limit, the strictest of the providers), single use, valid 10 minutes. It is a random nonce and an
HMAC of it, so a state the gateway never issued is refused without looking anything up.

What it stands for (a ``PendingLogin``) is sealed (AES-GCM) into the browser's login cookie, not
kept in the store: an anonymous client calling ``/login`` in a loop fills nothing shared (the
store's oldest entries, sessions among them, used to be evicted for it), and the state is bound
to the browser that started it (CSRF: a state injected into another browser is worthless there,
its cookie does not hold it). The cookie keeps the last ``MAX_PENDING`` logins, so several tabs
can sign in at once. Single use is the one thing the store still holds, written at redemption
only (``used_key``): only a request that carries a valid sealed login can write it.
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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from gateway.sealing import Sealer, derive_key

STATE_TTL_S = 600
_ALPHABET = string.ascii_letters + string.digits
_STATE = re.compile(r"[A-Za-z0-9]{1,64}")
_MAX_NEXT = 2048
_NONCE_CHARS = 21  # ~125 bits
_TAG_CHARS = 22  # a 128-bit HMAC in base 62
#: Logins one browser can have in progress (tabs signing in at once); older ones are dropped.
MAX_PENDING = 4
#: The cookie value at most, under the 4096 bytes a browser keeps for a cookie (name included).
MAX_COOKIE_CHARS = 3800


def is_valid_state(value: str) -> bool:
    return bool(_STATE.fullmatch(value))


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
    """What a ``state`` stands for, sealed into the browser's login cookie.

    ``extra_scopes``: set when the login is an incremental consent (``<prefix>/consent``): the
    scopes it asks for beyond the configured ones, as ``LoginContext.extra_scopes`` has them
    (``app:`` marks an administrator's grant). The callback and ``/exchange`` read it to know the
    login was a consent, for which scopes (the ``consent.*`` audit events, the record's scope
    union), and where the page's "try again" goes: to the consent, not to a plain login.
    """

    state: str
    provider: str
    next_path: str
    code_verifier: str | None
    created_at: float
    extra_scopes: tuple[str, ...] = ()

    @property
    def is_consent(self) -> bool:
        return bool(self.extra_scopes)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.created_at > STATE_TTL_S


def _entry(item: object) -> PendingLogin:
    """One sealed login: five fields, or six with a consent's scopes (a list of strings)."""
    if not isinstance(item, list) or len(item) not in (5, 6):
        raise ValueError("not a sealed login")
    state, provider, next_path, verifier, created_at, *rest = item
    scopes = rest[0] if rest else []
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise ValueError("not a sealed login")
    return PendingLogin(state, provider, next_path, verifier, created_at, tuple(scopes))


def _base62(data: bytes, width: int) -> str:
    number = int.from_bytes(data, "big")
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(digits)


class LoginCookie:
    """Issues states and seals/opens the pending logins a browser's login cookie holds.

    Keys come from the session secrets (the first one seals and signs, every one opens and
    verifies: secret rotation does not break a login in progress).
    """

    def __init__(self, secrets_: Sequence[str], cookie_name: str) -> None:
        self._sealer = Sealer(secrets_)
        # The associated data: a value sealed for anything else (a token record) never opens here.
        self._purpose = f"login-cookie:{cookie_name}"
        self._mac_keys = [derive_key(secret, b"gateway login state v1") for secret in secrets_]

    def _tag(self, key: bytes, nonce: str) -> str:
        return _base62(hmac.new(key, nonce.encode(), hashlib.sha256).digest()[:16], _TAG_CHARS)

    def new_state(self) -> str:
        """43 alphanumeric characters: a random nonce and its HMAC."""
        nonce = "".join(secrets.choice(_ALPHABET) for _ in range(_NONCE_CHARS))
        return nonce + self._tag(self._mac_keys[0], nonce)

    def issued(self, state: str) -> bool:
        """Whether the gateway issued ``state`` (any age; the sealed login says when)."""
        if len(state) != _NONCE_CHARS + _TAG_CHARS or not is_valid_state(state):
            return False
        nonce, tag = state[:_NONCE_CHARS], state[_NONCE_CHARS:]
        return any(hmac.compare_digest(self._tag(key, nonce), tag) for key in self._mac_keys)

    @staticmethod
    def used_key(state: str) -> str:
        """The store key that marks ``state`` as redeemed (a digest: the store never sees a state)."""
        return "used-state:" + hashlib.sha256(state.encode()).hexdigest()[:32]

    def open(self, value: str | None) -> dict[str, PendingLogin]:
        """The logins in a cookie value, by state (expired ones too: the caller says "expired");
        nothing for a missing, damaged or foreign cookie."""
        if not value or len(value) > MAX_COOKIE_CHARS + 4:
            return {}
        try:
            sealed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return {}
        opened = self._sealer.open(self._purpose, sealed)
        if opened is None:
            return {}
        try:
            entries = [_entry(item) for item in json.loads(opened)]
        except (ValueError, TypeError):
            return {}
        return {entry.state: entry for entry in entries}

    def seal(self, logins: Mapping[str, PendingLogin], now: float | None = None) -> str:
        """A cookie value with the newest ``MAX_PENDING`` unexpired logins that fit in
        ``MAX_COOKIE_CHARS`` ("" when none is left).

        The newest always fits: a ``next`` too long for the cookie (thousands of non-ASCII
        characters) is replaced by ``/`` rather than losing the login.
        """
        live = [entry for entry in logins.values() if not entry.expired(now)]
        newest = sorted(live, key=lambda entry: entry.created_at, reverse=True)[:MAX_PENDING]
        kept: list[PendingLogin] = []
        value = ""
        for entry in newest:
            candidate = self._seal([*kept, entry])
            if len(candidate) > MAX_COOKIE_CHARS:
                if kept:
                    break
                entry = replace(entry, next_path="/")
                candidate = self._seal([entry])
            kept.append(entry)
            value = candidate
        return value

    def _seal(self, entries: list[PendingLogin]) -> str:
        plaintext = json.dumps(
            # A plain login stays five fields (as sealed before consent existed: such cookies open).
            [[e.state, e.provider, e.next_path, e.code_verifier, e.created_at, *([list(e.extra_scopes)]
              if e.extra_scopes else [])] for e in entries],
            separators=(",", ":"), ensure_ascii=False,
        ).encode()
        return base64.urlsafe_b64encode(self._sealer.seal(self._purpose, plaintext)).rstrip(b"=").decode("ascii")
