"""Token records and their refresh: one record per user, refreshed exactly once at a time.

These providers rotate refresh tokens and kill the old one the moment a new one is issued, so:

- A record is keyed by (provider, tenant, user), not by browser session: every session and device
  of one user shares it, and a new code exchange replaces it (the provider has just invalidated
  the old tokens).
- Refresh is single-flight: however many requests find the token near expiry, one refresh call
  reaches the provider and the others wait for its result. The new tokens are written with
  compare-and-set before anyone uses them.
- Errors are classified by the provider: ``ReauthRequired`` ends the record (the user goes through
  the silent handshake again); ``ProviderUnavailable`` keeps it, serves with the old access token
  while it is valid, and otherwise raises so the request answers 503 with Retry-After.

When to refresh: ``min(tokens.refresh_margin_s, half the token's lifetime)`` before expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cachetools import TTLCache

from gateway.errors import ProviderUnavailable, ReauthRequired
from gateway.providers import Provider, TokenSet
from gateway.stores import Store

log = logging.getLogger("gateway.tokens")

# A record without a known refresh-token lifetime is kept this long (then the user logs in again).
_DEFAULT_RECORD_TTL_S = 30 * 86400


def token_key(provider: str, tenant: str, user: str) -> str:
    return f"tok:{provider}:{tenant}:{user}"


def _encode(provider: str, tokens: TokenSet) -> bytes:
    return json.dumps({"provider": provider, "tokens": tokens.to_dict()}, separators=(",", ":")).encode()


def _decode(data: bytes) -> TokenSet:
    return TokenSet.from_dict(json.loads(data)["tokens"])


class TokenManager:
    """Keeps token records in the store and refreshes them, one refresh at a time per record."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        *,
        refresh_margin_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.providers = providers
        self.refresh_margin_s = refresh_margin_s
        self.clock = clock
        self._inflight: dict[str, asyncio.Task[TokenSet]] = {}
        # Back-off after a transient failure; bounded, and forgotten once long past.
        self._not_before: TTLCache[str, float] = TTLCache(maxsize=100_000, ttl=3600)

    def needs_refresh(self, tokens: TokenSet) -> bool:
        return self.clock() >= tokens.refresh_at(self.refresh_margin_s)

    def _ttl(self, tokens: TokenSet) -> float:
        now = self.clock()
        if tokens.refresh_token is None:
            return max(1.0, tokens.expires_at - now)
        if tokens.refresh_expires_at is not None:
            return max(1.0, tokens.refresh_expires_at - now, tokens.expires_at - now)
        return _DEFAULT_RECORD_TTL_S

    async def save(self, provider: str, tenant: str, user: str, tokens: TokenSet) -> str:
        """Store the tokens of a new code exchange, replacing whatever the user had."""
        key = token_key(provider, tenant, user)
        await self.store.set_versioned(key, _encode(provider, tokens), self._ttl(tokens))
        self._not_before.pop(key, None)
        return key

    async def load(self, key: str) -> TokenSet | None:
        data = await self.store.get(key)
        return _decode(data) if data is not None else None

    async def current(self, key: str, provider: str) -> TokenSet:
        """Tokens that are fresh enough to use, refreshing them first when they are due.

        Raises ``ReauthRequired`` when the record is gone or the refresh token is dead, and
        ``ProviderUnavailable`` when a refresh failed transiently and the old token has expired.
        """
        tokens = await self.load(key)
        if tokens is None:
            raise ReauthRequired("Your sign-in has ended; please sign in again.", code="session_ended")
        if not self.needs_refresh(tokens):
            return tokens
        not_before = self._not_before.get(key, 0.0)
        if self.clock() < not_before:
            # Backing off after a transient failure: no provider call before ``retry_after``.
            if tokens.expires_at > self.clock():
                return tokens
            raise ProviderUnavailable(
                "The sign-in provider is unavailable; please try again shortly.",
                retry_after_s=max(1, math.ceil(not_before - self.clock())),
            )
        return await self._single_flight(key, provider)

    async def _single_flight(self, key: str, provider: str) -> TokenSet:
        # The refresh runs in its own task: a waiting request that goes away (client disconnect)
        # must not cancel a provider call that may already have rotated the refresh token.
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(key, provider))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _refresh(self, key: str, provider_name: str) -> TokenSet:
        provider = self.providers[provider_name]
        current = await self.store.get_versioned(key)
        if current is None:
            raise ReauthRequired("Your sign-in has ended; please sign in again.", code="session_ended")
        tokens = _decode(current.value)
        if not self.needs_refresh(tokens):
            return tokens  # someone refreshed while we waited for the record
        try:
            fresh = await provider.refresh(tokens)
        except ReauthRequired:
            # Another writer (a new login, another replica) may have rotated the record already.
            again = await self.store.get_versioned(key)
            if again is not None and again.version != current.version:
                return _decode(again.value)
            await self.store.delete(key)
            log.info("token record ended by the provider", extra={"provider": provider_name})
            raise
        except ProviderUnavailable as exc:
            self._not_before[key] = self.clock() + exc.retry_after_s
            if tokens.expires_at > self.clock():
                log.warning("refresh failed transiently; serving with the current token",
                            extra={"provider": provider_name, "code": exc.code})
                return tokens
            raise
        written = await self.store.set_versioned(
            key, _encode(provider_name, fresh), self._ttl(fresh), expected_version=current.version
        )
        if written is None:
            # A concurrent writer won (a new login replaced the record): theirs is newer.
            latest = await self.store.get(key)
            if latest is None:
                raise ReauthRequired("Your sign-in has ended; please sign in again.", code="session_ended")
            return _decode(latest)
        self._not_before.pop(key, None)
        return fresh

    def stats(self) -> dict[str, Any]:
        return {"refreshes_in_flight": len(self._inflight)}


class AppTokenCache:
    """App-level tokens (Lark tenant token, DingTalk app/corp token): fetched once, cached, shared.

    A provider asks ``get(key, fetch)``; ``fetch`` returns ``(token, expires_at)``. The token is
    kept in the store (so replicas share it) until ``early_s`` before it expires, and however
    many requests miss at once, ``fetch`` runs once (single flight), like user-token refresh.
    Nothing is fetched per request.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._inflight: dict[str, asyncio.Task[str]] = {}

    async def get(
        self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]], *, early_s: float = 300
    ) -> str:
        cached = await self.store.get(f"app:{key}")
        if cached is not None:
            return cached.decode()
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key, fetch, early_s))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]], early_s: float) -> str:
        token, expires_at = await fetch()
        lifetime = expires_at - self.clock()
        ttl = lifetime - min(early_s, lifetime / 2)
        if ttl > 0:
            await self.store.set(f"app:{key}", token.encode(), ttl)
        return token

    async def invalidate(self, key: str) -> None:
        """Forget a token the provider rejected (revoked before its time)."""
        await self.store.delete(f"app:{key}")
