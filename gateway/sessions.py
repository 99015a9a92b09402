"""Browser sessions: a signed ticket in the cookie, the record itself server-side.

The cookie holds only ``{sid, iat, exp}`` signed with HS256 (pyjwt). ``session.secrets`` is a
list: the first secret signs, every secret verifies, so secrets rotate without logging anyone
out. Each secret is not used as it is: the signing key is derived from it (HKDF, label
``gateway session cookie v1``, as the sealing and identity keys are with their own labels), and
the ``kid`` header that names it is derived under a label of its own, so a cookie says nothing
usable about the secret (not even a hash to test guesses against) and verification tries one key.
A cookie issued before this scheme (raw secret, ``kid`` a hash of it) still verifies until it
expires, so a deploy logs no one out.

The record (who the user is, which token record is theirs, when the session ends) lives in the
store. Ending it server-side (logout, ``max_age_s``) kills the cookie, whatever its own ``exp``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from gateway.sealing import derive_key
from gateway.stores import Store
from gateway.tokens import token_key

_ALGORITHM = "HS256"


def _signing_key(secret: str) -> tuple[str, bytes]:
    """``(kid, key)`` for one session secret: both derived, each under its own label."""
    kid = base64.urlsafe_b64encode(derive_key(secret, b"gateway session cookie kid v1", 9)).decode("ascii")
    return kid, derive_key(secret, b"gateway session cookie v1")


def _legacy_key(secret: str) -> tuple[str, bytes]:
    """How cookies were signed before derived keys: verified only, never issued."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12], secret.encode()


@dataclass(frozen=True)
class SessionRecord:
    sid: str
    provider: str
    user: str
    tenant: str
    name: str
    created_at: float
    expires_at: float

    @property
    def token_key(self) -> str:
        """The user's token record (one per provider, tenant and user, shared by their sessions)."""
        return token_key(self.provider, self.tenant, self.user)

    def to_bytes(self) -> bytes:
        # A JSON list, not an object: the field names and the sid (already in the store key) would
        # double what every signed-in user costs the store (docs/benchmarks.md, memory).
        # Six fields, always: a replica of an earlier version unpacks exactly six, so a longer list
        # written here would be a 500 there for the length of a rolling upgrade.
        fields = [self.provider, self.user, self.tenant, self.name, int(self.created_at), int(self.expires_at)]
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, sid: str, data: bytes) -> SessionRecord:
        fields = json.loads(data)
        if isinstance(fields, dict):  # written by a version before the compact list (still in Redis)
            return cls(sid=sid, provider=fields["provider"], user=fields["user"], tenant=fields["tenant"],
                       name=fields["name"], created_at=fields["created_at"], expires_at=fields["expires_at"])
        # Fields after the sixth are a later version's, skipped: a version that adds one can roll
        # out beside this one (not beside an earlier one, which unpacks exactly six).
        provider, user, tenant, name, created_at, expires_at, *_later = fields
        return cls(sid=sid, provider=provider, user=user, tenant=tenant, name=name,
                   created_at=float(created_at), expires_at=float(expires_at))


class CookieCodec:
    """Signs and verifies the session ticket."""

    def __init__(self, secrets_: Sequence[str]) -> None:
        if not secrets_:
            raise ValueError("at least one session secret is required")
        self._signing_kid, self._signing_key = _signing_key(secrets_[0])
        self._keys = dict(_legacy_key(secret) for secret in secrets_)
        self._keys.update(_signing_key(secret) for secret in secrets_)

    def encode(self, sid: str, *, issued_at: float, expires_at: float) -> str:
        claims = {"sid": sid, "iat": int(issued_at), "exp": int(expires_at)}
        return jwt.encode(claims, self._signing_key, algorithm=_ALGORITHM, headers={"kid": self._signing_kid})

    def decode(self, ticket: str) -> tuple[str, float] | None:
        """``(sid, exp)`` of a valid, unexpired ticket; None for anything else."""
        try:
            kid = jwt.get_unverified_header(ticket).get("kid")
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                return None
            claims = jwt.decode(ticket, key, algorithms=[_ALGORITHM], options={"require": ["sid", "exp"]})
        except jwt.PyJWTError:
            return None
        sid = claims.get("sid")
        if not isinstance(sid, str) or not sid:
            return None
        return sid, float(claims["exp"])


class SessionStore:
    """Creates, loads and ends session records in the store."""

    def __init__(self, store: Store, codec: CookieCodec, *, max_age_s: int) -> None:
        self.store = store
        self.codec = codec
        self.max_age_s = max_age_s

    @staticmethod
    def _key(sid: str) -> str:
        return f"sess:{sid}"

    async def create(
        self, *, provider: str, user: str, tenant: str, name: str
    ) -> tuple[str, SessionRecord]:
        """A new session; returns the cookie value and the record."""
        now = float(int(time.time()))  # whole seconds: what the cookie and the stored record keep
        record = SessionRecord(
            sid=secrets.token_urlsafe(24),
            provider=provider,
            user=user,
            tenant=tenant,
            name=name,
            created_at=now,
            expires_at=now + self.max_age_s,
        )
        await self.store.set(self._key(record.sid), record.to_bytes(), self.max_age_s)
        return self.codec.encode(record.sid, issued_at=now, expires_at=record.expires_at), record

    async def load(self, ticket: str) -> SessionRecord | None:
        """The live record behind a cookie, or None (bad signature, expired, ended)."""
        decoded = self.codec.decode(ticket)
        if decoded is None:
            return None
        sid = decoded[0]
        data = await self.store.get(self._key(sid))
        if data is None:
            return None
        record = SessionRecord.from_bytes(sid, data)
        return record if record.expires_at > time.time() else None

    async def end(self, sid: str) -> None:
        await self.store.delete(self._key(sid))
