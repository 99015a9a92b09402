"""Token records and their refresh: one record per user, refreshed exactly once at a time.

These providers rotate refresh tokens and kill the old one the moment a new one is issued, so:

- A record is keyed by (provider, tenant, user), not by browser session: every session and device
  of one user shares it, and a new code exchange replaces it (the provider has just invalidated
  the old tokens).
- Refresh is single-flight, in two layers: in a process, one task per record does the work and
  every request waits for it; across processes (replicas sharing a Redis store), that task first
  takes the record's lock from the store (``Store.lock``: a lease renewed while the provider call
  runs, released with a notification that wakes the other replicas' waiters). Holding it, the
  task re-reads the record and refreshes only if it still needs to (another replica may just
  have done it), then writes the new tokens with compare-and-set on the version it read (the
  fencing rule: a holder whose lease lapsed cannot overwrite a newer record) before anyone uses
  them. So however many requests on however many replicas find the token near expiry, one refresh
  call reaches the provider. Where Redis has replicas, that write counts once a replica has it
  (a failover discards what the promoted replica never got, and with it the only working refresh
  token): it is made again until one acknowledges it (``_write``, docs/redis.md).
- Errors are classified by the provider: ``ReauthRequired`` ends the record (the user goes through
  the silent handshake again); ``ProviderUnavailable`` keeps it, serves with the old access token
  while it is valid, and otherwise raises so the request answers 503 with Retry-After. The
  back-off is shared through the store, so the other replicas leave the provider alone too. A
  definitive error re-reads the record once before ending it: another replica (or a new login)
  may have rotated the refresh token already.

When to refresh: ``min(tokens.refresh_margin_s, half the token's lifetime)`` before expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

from cachetools import LRUCache, TTLCache

from gateway.errors import ProviderUnavailable, ReauthRequired, StoreUnavailable
from gateway.logs import audit
from gateway.metrics import Metrics
from gateway.providers import Provider, TokenSet, scope_names
from gateway.sealing import Sealer, seal, unseal
from gateway.stores import LockTimeout, Store, Versioned

log = logging.getLogger("gateway.tokens")

# A record without a known refresh-token lifetime is kept this long (then the user logs in again).
_DEFAULT_RECORD_TTL_S = 30 * 86400


def token_key(provider: str, tenant: str, user: str) -> str:
    return f"tok:{provider}:{tenant}:{user}"


#: How many opened token records are kept to be reused while their stored bytes are unchanged
#: (each a few kilobytes: Lark's tokens are about a thousand characters each).
_OPENED_RECORDS = 512

_SLOW = "The sign-in provider is slow to answer; please try again shortly."
_ENDED = "Your sign-in has ended; please sign in again."


def _audit_refresh(key: str, provider: str, tokens: TokenSet, error: str | None,
                   outcome: Literal["transient", "definitive"] | None) -> None:
    """``token.refreshed`` or ``token.refresh_failed`` (gateway/logs.py), the tenant and user
    read back from the record's key (``token_key``), the flow from the record the refresh started
    from (the sign-in's, ``TokenSet.flow``; none for a record stored before it was kept); the
    tokens themselves never reach it."""
    _, _, rest = key.partition(":")
    _, tenant, user = rest.split(":", 2) if rest.count(":") >= 2 else (provider, None, None)
    if error is None:
        audit("token.refreshed", provider=provider, flow=tokens.flow, tenant=tenant, user_id=user)
    else:
        audit("token.refresh_failed", provider=provider, flow=tokens.flow, tenant=tenant, user_id=user,
              error=error, outcome=outcome)


def union_scope(*scopes: str) -> str:
    """Scope strings (as ``scope_names`` reads them) as one space-separated string, each scope
    once, in first-seen order; "" when none holds any."""
    return " ".join(dict.fromkeys(name for scope in scopes for name in scope_names(scope)))


def _backoff_key(key: str) -> str:
    return f"nbf:{key}"


class TokenManager:
    """Keeps token records in the store and refreshes them, one refresh at a time per record."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        *,
        refresh_margin_s: float,
        clock: Callable[[], float] = time.time,
        lock_lease_s: float = 10.0,
        lock_wait_s: float = 30.0,
        metrics: Metrics | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.store = store
        self.providers = providers
        # The runtime always seals (gateway/sealing.py); None stores records as they are (tests).
        self._sealer = sealer
        self.refresh_margin_s = refresh_margin_s
        self.clock = clock
        self.lock_lease_s = lock_lease_s
        self.lock_wait_s = lock_wait_s
        self.metrics = metrics if metrics is not None else Metrics()
        self._inflight: dict[str, asyncio.Task[TokenSet]] = {}
        # Access tokens a provider refused before their time (``refresh_rejected``), by record.
        self._rejected: dict[str, str] = {}
        # Back-off after a transient failure; bounded, and forgotten once long past.
        self._not_before: TTLCache[str, float] = TTLCache(maxsize=100_000, ttl=3600)
        # The last records opened, with the stored bytes they came from: a record read again
        # unchanged (a page's burst of relayed calls) is not decrypted and parsed again. Keyed
        # by record and checked against the bytes, so a write by any replica is seen at once.
        self._opened: LRUCache[str, tuple[bytes, TokenSet]] = LRUCache(maxsize=_OPENED_RECORDS)

    def _encode(self, key: str, provider: str, tokens: TokenSet) -> bytes:
        data = json.dumps({"provider": provider, "tokens": tokens.to_dict()}, separators=(",", ":")).encode()
        return seal(self._sealer, key, data)

    def _decode(self, key: str, data: bytes) -> TokenSet | None:
        """The record's tokens; None when it cannot be opened (sealed with a secret since removed,
        damaged): its user signs in again, never a 500."""
        known = self._opened.get(key)
        if known is not None and known[0] == data:
            return known[1]
        opened = unseal(self._sealer, key, data)  # a record written before sealing: sealed on its next write
        if opened is None:
            log.warning("a token record could not be opened (a removed session secret?); its user signs in again")
            return None
        try:
            tokens = TokenSet.from_dict(json.loads(opened)["tokens"])
        except (ValueError, KeyError, TypeError):
            log.warning("a token record could not be read; its user signs in again")
            return None
        self._opened[key] = (data, tokens)
        return tokens

    def needs_refresh(self, tokens: TokenSet) -> bool:
        return self.clock() >= tokens.refresh_at(self.refresh_margin_s)

    def _ttl(self, tokens: TokenSet) -> float:
        now = self.clock()
        if tokens.refresh_token is None:
            return max(1.0, tokens.expires_at - now)
        if tokens.refresh_expires_at is not None:
            return max(1.0, tokens.refresh_expires_at - now, tokens.expires_at - now)
        return _DEFAULT_RECORD_TTL_S

    async def save(self, provider: str, tenant: str, user: str, tokens: TokenSet, *, keep_scopes: bool = False) -> str:
        """Store the tokens of a new code exchange, replacing whatever the user had.

        ``keep_scopes``: the exchange was an incremental consent (gateway/consent.py), a grant
        that adds to the one the record holds: the record's scopes become the union of its own
        and the new grant's, so a provider that reports only what this consent added (none of
        ours is documented to: Lark's newest token carries every scope ever granted, DingTalk
        reports none, Tencent Meeting all of the app's) cannot make the gateway forget the rest
        and refuse a call that needs them. Computed against the record as stored, under the same
        compare-and-set as the write (a concurrent consent's scopes are not lost either). A
        refresh, and a plain login, take the scopes the provider reports as they are: they are
        how a scope the user has since withdrawn leaves the record (a route's ``scopes`` are then
        ``consent_required`` before the call, instead of a provider refusal)."""
        key = token_key(provider, tenant, user)
        for _ in range(5):
            current = await self.store.get_versioned(key)
            existing = self._decode(key, current.value) if current is not None else None
            if existing is not None and existing.issued_at > tokens.issued_at:
                break  # two logins raced: the provider killed the older grant, keep the newer one
            saved = replace(tokens, scope=union_scope(existing.scope, tokens.scope)) if (
                keep_scopes and existing is not None) else tokens
            written = await self.store.set_versioned(
                key, self._encode(key, provider, saved), self._ttl(saved),
                expected_version=current.version if current is not None else 0,
            )
            if written is not None:
                break
        self._not_before.pop(key, None)
        await self.store.delete(_backoff_key(key))
        return key

    async def load(self, key: str) -> TokenSet | None:
        data = await self.store.get(key)
        if data is None:
            self._opened.pop(key, None)  # gone (a logout, a revoked grant): not kept opened either
            return None
        return self._decode(key, data)

    async def current(self, key: str, provider: str) -> TokenSet:
        """Tokens that are fresh enough to use, refreshing them first when they are due.

        Raises ``ReauthRequired`` when the record is gone or the refresh token is dead, and
        ``ProviderUnavailable`` when a refresh failed transiently and the old token has expired.
        """
        tokens = await self.load(key)
        if tokens is None:
            raise ReauthRequired(_ENDED, code="session_ended")
        if not self.needs_refresh(tokens):
            return tokens
        not_before = self._not_before.get(key, 0.0)
        if self.clock() < not_before:
            # Backing off after a transient failure: no provider call before ``retry_after``.
            return self._backing_off(tokens, not_before)
        return await self._single_flight(key, provider)

    async def refresh_rejected(self, key: str, provider: str, rejected: str) -> TokenSet:
        """Tokens to use instead of ``rejected``, an access token the provider refused as expired
        before the record says it is (revoked, rotated by another device, the provider's clock):
        the relay's refresh-and-retry (gateway/relay.py). The same single flight as ``current``:
        however many calls were refused at once, one refresh reaches the provider, and a record
        someone already rotated is returned as it is. May return ``rejected`` itself when the
        provider is being backed off (the caller answers 503 then, never retries with it)."""
        tokens = await self.load(key)
        if tokens is None:
            raise ReauthRequired(_ENDED, code="session_ended")
        if tokens.access_token != rejected:
            return tokens  # rotated since that call was made
        not_before = self._not_before.get(key, 0.0)
        if self.clock() < not_before:
            return self._backing_off(tokens, not_before)
        self._rejected[key] = rejected
        try:
            return await self._single_flight(key, provider)
        finally:
            if self._rejected.get(key) == rejected:
                del self._rejected[key]

    def _due(self, key: str, tokens: TokenSet) -> bool:
        """Whether the record must be refreshed now: near its expiry, or its access token refused."""
        return self.needs_refresh(tokens) or self._rejected.get(key) == tokens.access_token

    def _backing_off(self, tokens: TokenSet, not_before: float) -> TokenSet:
        if tokens.expires_at > self.clock():
            return tokens
        raise ProviderUnavailable(
            "The sign-in provider is unavailable; please try again shortly.",
            retry_after_s=max(1, math.ceil(not_before - self.clock())),
        )

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
        """The fleet-wide layer: hold the record's lock from the store while refreshing."""
        try:
            async with self.store.lock(f"refresh:{key}", lease_s=self.lock_lease_s, wait_s=self.lock_wait_s):
                return await self._refresh_locked(key, provider_name)
        except LockTimeout:
            # Another replica's refresh outlasted our patience; its lease is still being renewed.
            tokens = await self.load(key)
            if tokens is None:
                raise ReauthRequired(_ENDED, code="session_ended") from None
            if tokens.expires_at > self.clock():
                return tokens
            raise ProviderUnavailable(_SLOW, code="provider_slow", retry_after_s=5) from None

    async def _refresh_locked(self, key: str, provider_name: str) -> TokenSet:
        provider = self.providers[provider_name]
        current = await self.store.get_versioned(key)
        tokens = self._decode(key, current.value) if current is not None else None
        if current is None or tokens is None:
            raise ReauthRequired(_ENDED, code="session_ended")
        if not self._due(key, tokens):
            return tokens  # someone refreshed (here or on another replica) while we waited
        shared = await self.store.get(_backoff_key(key))
        if shared is not None and self.clock() < float(shared):
            # Another replica's refresh failed transiently: back off with it.
            self._not_before[key] = float(shared)
            return self._backing_off(tokens, float(shared))
        try:
            # The provider knows nothing of the sign-in's flow: the rotated tokens keep the record's.
            fresh = replace(await provider.refresh(tokens), flow=tokens.flow)
        except ReauthRequired as exc:
            self.metrics.inc("gateway_token_refreshes_total", provider_name, "reauth_required")
            _audit_refresh(key, provider_name, tokens, exc.code, "definitive")
            # Another writer (a new login, another replica) may have rotated the record already:
            # theirs is newer, so it is never deleted here, even when this replica cannot open it.
            again = await self.store.get_versioned(key)
            if again is not None and again.version != current.version:
                rotated = self._decode(key, again.value)
                if rotated is not None:
                    return rotated
                raise
            await self.store.delete(key)
            log.info("token record ended by the provider", extra={"provider": provider_name})
            raise
        except ProviderUnavailable as exc:
            self.metrics.inc("gateway_token_refreshes_total", provider_name, "unavailable")
            _audit_refresh(key, provider_name, tokens, exc.code, "transient")
            not_before = self.clock() + exc.retry_after_s
            self._not_before[key] = not_before
            with contextlib.suppress(StoreUnavailable):  # the local back-off still holds
                await self.store.set(_backoff_key(key), repr(not_before).encode(), exc.retry_after_s)
            if tokens.expires_at > self.clock():
                log.warning("refresh failed transiently; serving with the current token",
                            extra={"provider": provider_name, "code": exc.code})
                return tokens
            raise
        except Exception:  # misconfiguration, a bug: counted, then answered as always
            self.metrics.inc("gateway_token_refreshes_total", provider_name, "error")
            _audit_refresh(key, provider_name, tokens, "internal_error", "transient")  # the next request tries again
            raise
        self.metrics.inc("gateway_token_refreshes_total", provider_name, "ok")
        _audit_refresh(key, provider_name, tokens, None, None)
        written = await self._write(key, provider_name, fresh, current)
        if written is None:
            # A concurrent writer won (a new login replaced the record): theirs is newer.
            latest = await self.store.get(key)
            newer = self._decode(key, latest) if latest is not None else None
            if newer is None:
                raise ReauthRequired(_ENDED, code="session_ended")
            return newer
        self._not_before.pop(key, None)
        return fresh

    async def _write(self, key: str, provider_name: str, fresh: TokenSet, read: Versioned) -> int | None:
        """Compare-and-set the rotated tokens over ``read`` (the record the refresh started from)
        until they are safely stored: the provider has already killed the old refresh token, so
        these are the only ones that work, and losing them is a logout.

        Safely stored means a replica has them where the store has replicas
        (``Store.set_versioned_replicated``): in a failover the master that took the write may be
        demoted and lose it. So until one acknowledges it, or through a brief outage, the write is
        made again, each time over what the master now holds: our own tokens (written, not yet
        acknowledged), ``read`` itself (our write was lost with the old master), or a newer
        record (a new login: it wins, None). The retries last ``store.durable_write_window_s``."""
        data, ttl = self._encode(key, provider_name, fresh), self._ttl(fresh)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store.durable_write_window_s
        expected, written, warned = read.version, None, False
        while True:
            try:
                written, acknowledged = await self.store.set_versioned_replicated(
                    key, data, ttl, expected_version=expected)
                if written is not None and acknowledged:
                    if warned:
                        log.warning("rotated tokens stored and acknowledged by a replica",
                                    extra={"provider": provider_name})
                    return written
                latest = await self.store.get_versioned(key)
                if latest is None:
                    return None  # ended meanwhile (a logout): not brought back
                if latest.value == data:
                    expected = latest.version  # ours, unconfirmed: written again to be acknowledged
                elif latest.version == read.version and latest.value == read.value:
                    expected = read.version  # our write is gone (a demoted master): again
                else:
                    return None  # a newer record: theirs wins
            except StoreUnavailable:
                pass
            if loop.time() >= deadline:
                if written is not None:
                    log.error("rotated tokens were stored but no replica acknowledged them; a failover now "
                              "would end this sign-in", extra={"provider": provider_name})
                    return written
                log.error("rotated tokens could not be stored; the user will sign in again",
                          extra={"provider": provider_name})
                raise StoreUnavailable("The session store is unavailable; please try again shortly.")
            if not warned:
                warned = True
                log.warning("rotated tokens not yet safely stored (a store failover?); writing them again",
                            extra={"provider": provider_name})
            await asyncio.sleep(0.2)

    def stats(self) -> dict[str, Any]:
        return {"refreshes_in_flight": len(self._inflight)}


class AppTokenCache:
    """App-level tokens (Lark tenant token, DingTalk app/corp token): fetched once, cached, shared.

    A provider asks ``get(key, fetch)``; ``fetch`` returns ``(token, expires_at)``. The token is
    kept in the store (so replicas share it) until ``early_s`` before it expires, and however
    many requests miss at once, on however many replicas, ``fetch`` runs once: the same two
    layers as user-token refresh (one task per key in a process, the store's lock across
    processes, the cache re-read once the lock is held). Nothing is fetched per request.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        lock_lease_s: float = 10.0,
        lock_wait_s: float = 30.0,
        sealer: Sealer | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.lock_lease_s = lock_lease_s
        self.lock_wait_s = lock_wait_s
        self._sealer = sealer  # as TokenManager's: the runtime always seals
        self._inflight: dict[str, asyncio.Task[str]] = {}

    async def _read(self, key: str) -> str | None:
        data = await self.store.get(f"app:{key}")
        if data is None:
            return None
        opened = unseal(self._sealer, f"app:{key}", data)
        if opened is None:
            return None  # unreadable: fetched again
        try:
            return opened.decode() or None
        except UnicodeDecodeError:
            return None

    async def _write(self, key: str, token: str, ttl_s: float) -> None:
        await self.store.set(f"app:{key}", seal(self._sealer, f"app:{key}", token.encode()), ttl_s)

    async def get(
        self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]], *, early_s: float = 300
    ) -> str:
        cached = await self._read(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key, fetch, early_s))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]], early_s: float) -> str:
        try:
            async with self.store.lock(f"app:{key}", lease_s=self.lock_lease_s, wait_s=self.lock_wait_s):
                cached = await self._read(key)
                if cached is not None:
                    return cached  # another replica fetched it while we waited
                token, expires_at = await fetch()
                lifetime = expires_at - self.clock()
                ttl = lifetime - min(early_s, lifetime / 2)
                if ttl > 0:
                    await self._write(key, token, ttl)
                return token
        except LockTimeout:
            raise ProviderUnavailable(_SLOW, code="provider_slow", retry_after_s=5) from None

    async def invalidate(self, key: str) -> None:
        """Forget a token the provider rejected (revoked before its time)."""
        await self.store.delete(f"app:{key}")
