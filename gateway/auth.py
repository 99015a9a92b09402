"""The hot path: a session cookie in, the upstream identity headers out.

A cookie already verified is not verified again while its cache entry lives
(``session.cache_ttl_s``): the entry keeps the session record, the identity headers ready to send
(JWT included, re-signed at half its lifetime) and the time the provider token is due for refresh.
So a request with a fresh session does no store round trip, no signature check and no JWT signing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cachetools import TTLCache

from gateway.config import GatewayConfig
from gateway.errors import ReauthRequired
from gateway.identity import Headers, Identity, IdentitySigner, identity_headers
from gateway.providers import TokenSet
from gateway.sessions import SessionRecord, SessionStore
from gateway.tokens import TokenManager

log = logging.getLogger("gateway.auth")


@dataclass
class Authenticated:
    record: SessionRecord
    identity: Identity
    tokens: TokenSet
    headers: Headers
    renew_at: float  # the earliest of: token refresh due, JWT half-life, session end
    loaded_at: float


class Authenticator:
    """Turns a session cookie into an ``Authenticated`` (or None), caching verified sessions."""

    def __init__(
        self, config: GatewayConfig, sessions: SessionStore, tokens: TokenManager, signer: IdentitySigner
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.tokens = tokens
        self.signer = signer
        self._cache_ttl_s = config.session.cache_ttl_s
        self._cache: TTLCache[str, Authenticated] = TTLCache(maxsize=100_000, ttl=max(self._cache_ttl_s, 0.001))

    async def authenticate(self, ticket: str) -> Authenticated | None:
        now = time.time()
        entry = self._cache.get(ticket)
        if entry is not None and now < entry.renew_at:
            return entry
        if entry is None or now - entry.loaded_at >= self._cache_ttl_s:
            record = await self.sessions.load(ticket)
            loaded_at = now
        else:
            record, loaded_at = entry.record, entry.loaded_at
        if record is None:
            self._cache.pop(ticket, None)
            return None
        try:
            tokens = await self.tokens.current(record.token_key, record.provider)
        except ReauthRequired:
            await self.sessions.end(record.sid)
            self._cache.pop(ticket, None)
            return None
        fresh = self._build(record, tokens, loaded_at)
        if self._cache_ttl_s > 0:
            self._cache[ticket] = fresh
        return fresh

    def _build(self, record: SessionRecord, tokens: TokenSet, loaded_at: float) -> Authenticated:
        identity = Identity(provider=record.provider, user=record.user, tenant=record.tenant, name=record.name)
        token, jwt_expires_at = self.signer.sign(identity)
        access = tokens.access_token if self.config.identity.pass_access_token else None
        headers = identity_headers(identity, self.config.identity.headers, token=token, access_token=access)
        refresh_due = tokens.refresh_at(self.tokens.refresh_margin_s)
        jwt_renew = jwt_expires_at - self.signer.ttl_s / 2
        return Authenticated(
            record=record,
            identity=identity,
            tokens=tokens,
            headers=headers,
            renew_at=min(refresh_due, jwt_renew, record.expires_at, loaded_at + self._cache_ttl_s),
            loaded_at=loaded_at,
        )

    def forget(self, ticket: str) -> None:
        """Drop a cookie from the cache (logout on this process)."""
        self._cache.pop(ticket, None)
