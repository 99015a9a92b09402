"""The hot path: a session cookie in, the upstream identity headers out.

A cookie already verified is not verified again while its cache entry lives
(``session.cache_ttl_s``): the entry keeps the session record, the identity headers ready to send
(JWT included, re-signed at half its lifetime) and the time the provider token is due for refresh.
So a request with a fresh session does no store round trip, no signature check and no JWT signing,
and the requests that find an entry due share one renewal (one store round trip per process).

With several replicas, a session ended on one of them (logout) is dropped from the others'
caches by a broadcast through the store (``Store.publish``, Redis pub/sub): usually within
milliseconds, and at the latest after ``session.cache_ttl_s`` (a replica that missed the
broadcast, e.g. while Redis was unreachable, reloads the record once its entry is that old).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from cachetools import TTLCache

from gateway.config import GatewayConfig
from gateway.errors import ReauthRequired, StoreUnavailable
from gateway.identity import Headers, Identity, IdentitySigner, identity_headers
from gateway.providers import TokenSet
from gateway.sessions import SessionRecord, SessionStore
from gateway.tokens import TokenManager

log = logging.getLogger("gateway.auth")

#: The store topic that tells every replica a session has ended (the message: ``_digest(sid)``).
SESSION_ENDED = "session-ended"
#: The store topic that tells every replica a user's token record was replaced by a new login
#: (the message: ``_digest(token_key)``): the provider has just killed the tokens they cached.
TOKENS_REPLACED = "tokens-replaced"


def _digest(sid: str) -> str:
    """What the broadcast carries instead of the session id itself."""
    return hashlib.sha256(sid.encode()).hexdigest()[:32]


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
        self._tickets: TTLCache[str, str] = TTLCache(maxsize=100_000, ttl=max(self._cache_ttl_s, 0.001))
        self._by_token_key: TTLCache[str, set[str]] = TTLCache(maxsize=100_000, ttl=max(self._cache_ttl_s, 0.001))
        self._renewing: dict[str, asyncio.Task[Authenticated | None]] = {}
        sessions.store.subscribe(SESSION_ENDED, self._on_session_ended)
        sessions.store.subscribe(TOKENS_REPLACED, self._on_tokens_replaced)

    def cached(self, ticket: str) -> Authenticated | None:
        """The cached entry while it needs no renewal: the hot path, without an await."""
        entry = self._cache.get(ticket)
        if entry is not None and time.time() < entry.renew_at:
            return entry
        return None

    async def authenticate(self, ticket: str) -> Authenticated | None:
        entry = self._cache.get(ticket)
        if entry is not None and time.time() < entry.renew_at:
            return entry
        # One renewal per ticket at a time: the burst of requests that finds an entry expired
        # costs one store round trip in this process, not one per request.
        task = self._renewing.get(ticket)
        if task is None:
            task = asyncio.create_task(self._renew(ticket, entry))
            self._renewing[ticket] = task
            task.add_done_callback(lambda done: self._renewed(ticket, done))
        return await asyncio.shield(task)

    def _renewed(self, ticket: str, task: asyncio.Task[Authenticated | None]) -> None:
        if self._renewing.get(ticket) is task:
            del self._renewing[ticket]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone away (client disconnects)

    async def _renew(self, ticket: str, entry: Authenticated | None) -> Authenticated | None:
        now = time.time()
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
            await self.session_ended(record.sid)
            return None
        fresh = self._build(record, tokens, loaded_at)
        if self._cache_ttl_s > 0:
            self._cache[ticket] = fresh
            self._tickets[_digest(record.sid)] = ticket
            self._by_token_key.setdefault(_digest(record.token_key), set()).add(ticket)
        return fresh

    def _build(self, record: SessionRecord, tokens: TokenSet, loaded_at: float) -> Authenticated:
        identity = Identity(provider=record.provider, user=record.user, tenant=record.tenant, name=record.name)
        token, jwt_expires_at = self.signer.sign(identity)
        # A sign-in without a user token (e.g. DingTalk's free login) sends no token header at all.
        access = (tokens.access_token or None) if self.config.identity.pass_access_token else None
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

    async def session_ended(self, sid: str) -> None:
        """Drop the session ``sid`` from every replica's cache (this one's at once)."""
        try:
            await self.sessions.store.publish(SESSION_ENDED, _digest(sid))
        except StoreUnavailable:
            # The record is gone from the store already (or cannot be read): the other replicas
            # notice when their cache entry expires (session.cache_ttl_s).
            log.warning("could not broadcast the end of a session; other replicas drop it within %s s",
                        self._cache_ttl_s)

    def _on_session_ended(self, digest: str) -> None:
        ticket = self._tickets.pop(digest, None)
        if ticket is not None:
            self._cache.pop(ticket, None)

    async def tokens_replaced(self, token_key: str) -> None:
        """A new login replaced a token record: every replica drops the sessions that cached it."""
        try:
            await self.sessions.store.publish(TOKENS_REPLACED, _digest(token_key))
        except StoreUnavailable:
            log.warning("could not broadcast a token replacement; other replicas reload within %s s",
                        self._cache_ttl_s)

    def _on_tokens_replaced(self, digest: str) -> None:
        for ticket in self._by_token_key.pop(digest, ()):
            self._cache.pop(ticket, None)
