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
from itertools import islice

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


# How many stale entries one ``put`` sweeps at most (the rest on the next ones).
_SWEEP_BATCH = 1000


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


class _VerifiedSessions:
    """The cache of verified sessions by cookie, with the two indexes the broadcasts need
    (session digest → cookies, token-record digest → cookies).

    A plain dict, not a cachetools cache: the lookup is on every request, and a dict ``get`` is a
    third of what ``TTLCache.get`` costs there (docs/benchmarks.md, middleware). Entries older than
    ``ttl_s`` are of no use (the next request reloads the record): a ``put`` sweeps them from the
    front (the oldest stored), a batch at a time so the event loop never stalls on a large cache,
    at most once per ``ttl_s`` unless a batch was full. Past ``max_entries`` the entries stored
    longest ago go first, a hundredth of the cache at a time (one by one, each eviction would walk
    the slots the previous ones left at the front of the dict).
    """

    def __init__(self, *, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: dict[str, Authenticated] = {}
        #: Bumped by every broadcast: a renewal that started before one does not cache its result
        #: (the session may have ended while it was loading).
        self.generation = 0
        self._digests: dict[str, tuple[str, str]] = {}  # cookie → (session digest, token-record digest)
        self._by_session: dict[str, set[str]] = {}  # one session can be presented as several cookie strings
        self._by_token_key: dict[str, set[str]] = {}
        self._next_sweep = 0.0

    def put(self, ticket: str, entry: Authenticated, *, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return
        self.drop(ticket)  # re-inserted below: the order is the order of the latest store
        now = time.time()
        entries = self.entries
        if now >= self._next_sweep:
            stale_before = now - self.ttl_s
            stale: list[str] = []
            for old_ticket, old in entries.items():
                if old.loaded_at > stale_before or len(stale) >= _SWEEP_BATCH:
                    break
                stale.append(old_ticket)
            for old_ticket in stale:
                self.drop(old_ticket)
            self._next_sweep = now if len(stale) >= _SWEEP_BATCH else now + self.ttl_s
        if len(entries) >= self.max_entries:
            for old_ticket in list(islice(entries, max(1, self.max_entries // 100))):
                self.drop(old_ticket)
        digests = (_digest(entry.record.sid), _digest(entry.record.token_key))
        entries[ticket] = entry
        self._digests[ticket] = digests
        self._by_session.setdefault(digests[0], set()).add(ticket)
        self._by_token_key.setdefault(digests[1], set()).add(ticket)

    def drop(self, ticket: str) -> None:
        self.entries.pop(ticket, None)
        digests = self._digests.pop(ticket, None)
        if digests is None:
            return
        for index, digest in ((self._by_session, digests[0]), (self._by_token_key, digests[1])):
            tickets = index.get(digest)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del index[digest]

    def drop_session(self, session_digest: str) -> None:
        self.generation += 1
        for ticket in list(self._by_session.get(session_digest, ())):
            self.drop(ticket)

    def drop_token_key(self, token_digest: str) -> None:
        self.generation += 1
        for ticket in list(self._by_token_key.get(token_digest, ())):
            self.drop(ticket)


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
        self._verified = _VerifiedSessions(ttl_s=self._cache_ttl_s)
        self._entries = self._verified.entries  # read on every request: one attribute less
        self._renewing: dict[str, asyncio.Task[Authenticated | None]] = {}
        sessions.store.subscribe(SESSION_ENDED, self._verified.drop_session)
        sessions.store.subscribe(TOKENS_REPLACED, self._verified.drop_token_key)

    @property
    def cache_size(self) -> int:
        return len(self._entries)

    def cached(self, ticket: str) -> Authenticated | None:
        """The cached entry while it needs no renewal: the hot path, without an await."""
        entry = self._entries.get(ticket)
        if entry is not None and time.time() < entry.renew_at:
            return entry
        return None

    async def authenticate(self, ticket: str) -> Authenticated | None:
        entry = self._entries.get(ticket)
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
        generation = self._verified.generation
        now = time.time()
        if entry is None or now - entry.loaded_at >= self._cache_ttl_s:
            record = await self.sessions.load(ticket)
            loaded_at = now
        else:
            record, loaded_at = entry.record, entry.loaded_at
        if record is None:
            self._verified.drop(ticket)
            return None
        try:
            tokens = await self.tokens.current(record.token_key, record.provider)
        except ReauthRequired:
            await self.sessions.end(record.sid)
            self._verified.drop(ticket)
            await self.session_ended(record.sid)
            return None
        fresh = self._build(record, tokens, loaded_at)
        if self._cache_ttl_s > 0:
            self._verified.put(ticket, fresh, generation=generation)
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
        self._verified.drop(ticket)

    async def session_ended(self, sid: str) -> None:
        """Drop the session ``sid`` from every replica's cache (this one's at once)."""
        try:
            await self.sessions.store.publish(SESSION_ENDED, _digest(sid))
        except StoreUnavailable:
            # The record is gone from the store already (or cannot be read): the other replicas
            # notice when their cache entry expires (session.cache_ttl_s).
            log.warning("could not broadcast the end of a session; other replicas drop it within %s s",
                        self._cache_ttl_s)

    async def tokens_replaced(self, token_key: str) -> None:
        """A new login replaced a token record: every replica drops the sessions that cached it."""
        try:
            await self.sessions.store.publish(TOKENS_REPLACED, _digest(token_key))
        except StoreUnavailable:
            log.warning("could not broadcast a token replacement; other replicas reload within %s s",
                        self._cache_ttl_s)
