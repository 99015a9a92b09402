"""gateway.tokens: one record per user, single-flight refresh, classified provider errors."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, cast

import httpx
import pytest

from gateway.config import StoreConfig
from gateway.errors import ProviderUnavailable, ReauthRequired
from gateway.providers import Provider, ProviderContext, ProviderSettings, TokenSet
from gateway.sealing import Sealer, seal
from gateway.stores import Store
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore
from gateway.tokens import TokenManager, token_key, union_scope
from tests.conftest import Clock

T0 = 1_700_000_000.0


Outcome = str | BaseException  # "ok" or an exception to raise


class FakeProvider(Provider):
    """Counts refresh calls; each call sleeps briefly, then follows the next scripted outcome."""

    def __init__(self, clock: Clock, *, delay_s: float = 0.02, lifetime_s: float = 7200) -> None:
        store = MemoryStore()
        super().__init__(
            ProviderSettings(plugin="fake"),
            ProviderContext(name="fake", redirect_uri="http://t/cb", http=cast(httpx.AsyncClient, None), store=store),
        )
        self.clock = clock
        self.delay_s = delay_s
        self.lifetime_s = lifetime_s
        self.calls: list[str | None] = []  # the refresh token each call presented
        self.script: list[Outcome] = []
        self.during: Callable[[], Awaitable[None]] | None = None  # runs while the call is "on the wire"
        self.finished = 0
        self.started = asyncio.Event()

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        self.calls.append(tokens.refresh_token)
        self.started.set()
        number = len(self.calls)
        await asyncio.sleep(self.delay_s)
        if self.during is not None:
            await self.during()
        outcome = self.script.pop(0) if self.script else "ok"
        self.finished += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return TokenSet(
            access_token=f"at-{number}",
            refresh_token=f"rt-{number}",
            issued_at=self.clock(),
            expires_at=self.clock() + self.lifetime_s,
        )


def tokens(name: str, *, issued_at: float, lifetime_s: float) -> TokenSet:
    return TokenSet(
        access_token=f"at-{name}", refresh_token=f"rt-{name}", issued_at=issued_at, expires_at=issued_at + lifetime_s
    )


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def provider(clock: Clock) -> FakeProvider:
    return FakeProvider(clock)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def manager(store: MemoryStore, provider: FakeProvider, clock: Clock) -> TokenManager:
    return TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock)


async def _near_expiry(manager: TokenManager, clock: Clock, user: str = "u1") -> tuple[str, TokenSet]:
    """A 2-hour token saved, then the clock moved to 60 s before its expiry."""
    old = tokens(f"old-{user}", issued_at=clock.now, lifetime_s=7200)
    key = await manager.save("fake", "t1", user, old)
    clock.now = old.expires_at - 60
    return key, old


# -- the record ---------------------------------------------------------------------------------


async def test_save_and_load(manager: TokenManager, clock: Clock) -> None:
    saved = tokens("a", issued_at=clock.now, lifetime_s=7200)
    key = await manager.save("fake", "t1", "u1", saved)
    assert key == token_key("fake", "t1", "u1") == "tok:fake:t1:u1"
    assert await manager.load(key) == saved
    assert await manager.current(key, "fake") == saved  # fresh: no refresh


async def test_records_are_per_user_not_per_session(manager: TokenManager, clock: Clock) -> None:
    first = await manager.save("fake", "t1", "u1", tokens("a", issued_at=clock.now, lifetime_s=7200))
    assert await manager.save("fake", "t1", "u1", tokens("a", issued_at=clock.now, lifetime_s=7200)) == first
    assert await manager.save("fake", "t2", "u1", tokens("b", issued_at=clock.now, lifetime_s=7200)) != first
    assert await manager.save("other", "t1", "u1", tokens("c", issued_at=clock.now, lifetime_s=7200)) != first


async def test_save_replaces_the_record(manager: TokenManager, store: MemoryStore, clock: Clock) -> None:
    key = await manager.save("fake", "t1", "u1", tokens("first", issued_at=clock.now, lifetime_s=7200))
    before = await store.get_versioned(key)
    replacement = tokens("second", issued_at=clock.now, lifetime_s=7200)
    assert await manager.save("fake", "t1", "u1", replacement) == key
    after = await store.get_versioned(key)
    assert before is not None and after is not None and after.version > before.version
    assert await manager.load(key) == replacement



async def test_a_record_read_again_is_reused_only_while_its_bytes_are_unchanged(
        store: MemoryStore, provider: FakeProvider, clock: Clock) -> None:
    """Opened records are kept for reuse (no decryption per relayed call), but another replica's
    write, or damage, is seen on the very next read: reuse is checked against the stored bytes."""
    sealer = Sealer([secrets.token_urlsafe(32)])
    here, there = (TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock, sealer=sealer)
                   for _ in range(2))
    key = await here.save("fake", "t1", "u1", tokens("first", issued_at=clock.now, lifetime_s=7200))
    first = await here.load(key)
    assert first is not None and await here.load(key) is first  # unchanged bytes: the same object
    await there.save("fake", "t1", "u1", tokens("second", issued_at=clock.now + 1, lifetime_s=7200))
    second = await here.load(key)
    assert second is not None and second.access_token == "at-second"
    await store.set(key, b"damaged" + (await store.get(key) or b"")[7:], 3600)
    assert await here.load(key) is None  # not the reused tokens
def test_union_scope_keeps_each_scope_once_in_order() -> None:
    assert union_scope("offline_access a", "b a", "c,d") == "offline_access a b c d"
    assert union_scope("", "") == "" and union_scope("a") == "a"


async def test_a_consent_keeps_the_records_scopes_and_adds_the_new_grants(
        manager: TokenManager, provider: FakeProvider, clock: Clock) -> None:
    """A provider that reports only what the consent added (B) must not make the record forget A."""
    had_a = replace(tokens("a", issued_at=clock.now, lifetime_s=7200), scope="offline_access A")
    key = await manager.save("fake", "t1", "u1", had_a)
    only_b = replace(tokens("b", issued_at=clock.now + 1, lifetime_s=7200), scope="B")
    await manager.save("fake", "t1", "u1", only_b, keep_scopes=True)
    record = await manager.load(key)
    assert record is not None and record.access_token == "at-b"  # the new grant replaced the record
    assert provider.granted_scopes(record) == {"offline_access", "A", "B"}
    # A plain login replaces the scopes with what the provider reports for it (a withdrawn one goes).
    await manager.save("fake", "t1", "u1", replace(tokens("c", issued_at=clock.now + 2, lifetime_s=7200), scope="A"))
    plain = await manager.load(key)
    assert plain is not None and plain.scope == "A"


async def test_a_consent_for_a_user_without_a_record_is_saved_as_granted(manager: TokenManager, clock: Clock) -> None:
    granted = replace(tokens("b", issued_at=clock.now, lifetime_s=7200), scope="B")
    key = await manager.save("fake", "t1", "u9", granted, keep_scopes=True)
    assert await manager.load(key) == granted


async def test_missing_record_requires_reauth(manager: TokenManager, provider: FakeProvider) -> None:
    with pytest.raises(ReauthRequired) as exc:
        await manager.current(token_key("fake", "t1", "nobody"), "fake")
    assert exc.value.code == "session_ended"
    assert provider.calls == []


async def test_record_ttl_follows_the_refresh_token(store: MemoryStore, clock: Clock) -> None:
    ttls: list[float] = []

    class Recording(MemoryStore):
        async def set_versioned(
            self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
        ) -> int | None:
            ttls.append(ttl_s)
            return await super().set_versioned(key, value, ttl_s, expected_version=expected_version)

    manager = TokenManager(Recording(), {}, refresh_margin_s=300, clock=clock)
    with_rt = TokenSet(
        access_token="a",
        refresh_token="r",
        issued_at=clock.now,
        expires_at=clock.now + 7200,
        refresh_expires_at=clock.now + 30 * 86400,
    )
    await manager.save("fake", "t", "u1", with_rt)
    without_rt = TokenSet(access_token="a", issued_at=clock.now, expires_at=clock.now + 7200)
    await manager.save("fake", "t", "u2", without_rt)
    assert ttls == [30 * 86400, 7200]


# -- when to refresh ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime_s", "refresh_when_left"),
    [
        (600, 300),  # margin 300 == half the lifetime
        (200, 100),  # half the lifetime wins over the margin
        (7200, 300),  # the margin wins
    ],
)
async def test_refresh_rule(
    manager: TokenManager, provider: FakeProvider, clock: Clock, lifetime_s: float, refresh_when_left: float
) -> None:
    saved = tokens("x", issued_at=clock.now, lifetime_s=lifetime_s)
    assert saved.refresh_at(300) == saved.expires_at - refresh_when_left
    key = await manager.save("fake", "t1", "u1", saved)

    clock.now = saved.expires_at - refresh_when_left - 1
    assert not manager.needs_refresh(saved)
    assert await manager.current(key, "fake") == saved
    assert provider.calls == []

    clock.now = saved.expires_at - refresh_when_left
    assert manager.needs_refresh(saved)
    fresh = await manager.current(key, "fake")
    assert fresh.access_token == "at-1" and provider.calls == ["rt-x"]
    assert await manager.load(key) == fresh


# -- single flight ---------------------------------------------------------------------------------


async def test_concurrent_callers_share_one_refresh(
    manager: TokenManager, provider: FakeProvider, clock: Clock, store: MemoryStore
) -> None:
    key, old = await _near_expiry(manager, clock)
    version_before = await store.get_versioned(key)
    results = await asyncio.gather(*(manager.current(key, "fake") for _ in range(200)))
    assert provider.calls == [old.refresh_token]
    assert {result.access_token for result in results} == {"at-1"}
    assert all(result == results[0] for result in results)
    stored = await store.get_versioned(key)
    assert stored is not None and version_before is not None and stored.version == version_before.version + 1
    assert await manager.load(key) == results[0]
    assert manager.stats() == {"refreshes_in_flight": 0}
    # Later callers use the stored tokens without another call.
    assert await manager.current(key, "fake") == results[0]
    assert len(provider.calls) == 1


async def test_single_flight_is_per_record(manager: TokenManager, provider: FakeProvider, clock: Clock) -> None:
    key_a, _ = await _near_expiry(manager, clock, "alice")
    key_b = await manager.save("fake", "t1", "bob", tokens("old-bob", issued_at=clock.now - 7200 + 60, lifetime_s=7200))
    results = await asyncio.gather(*(manager.current(k, "fake") for k in [key_a, key_b] * 50))
    assert sorted(provider.calls) == ["rt-old-alice", "rt-old-bob"]
    assert {r.access_token for r in results[0::2]} != {r.access_token for r in results[1::2]}
    assert len({r.access_token for r in results[0::2]}) == 1


async def test_a_failed_refresh_is_shared_too(
    manager: TokenManager, provider: FakeProvider, clock: Clock, store: MemoryStore
) -> None:
    key, _ = await _near_expiry(manager, clock)
    provider.script = [ReauthRequired("refresh token revoked")]
    results = await asyncio.gather(*(manager.current(key, "fake") for _ in range(50)), return_exceptions=True)
    assert len(provider.calls) == 1
    assert all(isinstance(result, ReauthRequired) for result in results)
    assert await store.get(key) is None


# -- definitive errors -------------------------------------------------------------------------------


async def test_reauth_required_ends_the_record(
    manager: TokenManager, provider: FakeProvider, clock: Clock, store: MemoryStore
) -> None:
    key, _ = await _near_expiry(manager, clock)
    provider.script = [ReauthRequired("refresh token reused", provider_code=20064)]
    with pytest.raises(ReauthRequired) as exc:
        await manager.current(key, "fake")
    assert exc.value.provider_code == 20064
    assert await store.get(key) is None
    with pytest.raises(ReauthRequired):
        await manager.current(key, "fake")
    assert len(provider.calls) == 1  # an ended record is not refreshed again


async def test_reauth_after_another_writer_rotated_returns_their_tokens(clock: Clock) -> None:
    """Two replicas: A's refresh is rejected because B rotated the refresh token first.

    The store's lock keeps that from happening unless A's lease lapses: here A is cut off from
    the store while its call is on the wire (its renewals fail), so B takes the lock over.
    """

    class CutOff(MemoryStore):
        async def _renew_lock(self, name: str, fence: int, owner: str, lease_s: float) -> bool:
            return False

    store = CutOff()
    b_done = asyncio.Event()
    slow = FakeProvider(clock, delay_s=0)
    slow.during = b_done.wait  # A's call is answered only after B has rotated the tokens
    slow.script = [ReauthRequired("refresh token already used")]
    fast = FakeProvider(clock, delay_s=0)
    replica_a = TokenManager(store, {"fake": slow}, refresh_margin_s=300, clock=clock, lock_lease_s=0.05)
    replica_b = TokenManager(store, {"fake": fast}, refresh_margin_s=300, clock=clock, lock_lease_s=0.05)
    key, old = await _near_expiry(replica_a, clock)

    task_a = asyncio.create_task(replica_a.current(key, "fake"))
    await slow.started.wait()
    result_b = await replica_b.current(key, "fake")
    b_done.set()
    result_a = await task_a
    assert slow.calls == [old.refresh_token] and fast.calls == [old.refresh_token]
    assert result_b.access_token == "at-1"
    assert result_a == result_b  # A serves with B's tokens instead of logging the user out
    assert await replica_a.load(key) == result_b  # and the record is kept


async def test_new_login_during_refresh_wins(
    manager: TokenManager, provider: FakeProvider, clock: Clock, store: MemoryStore
) -> None:
    key, _ = await _near_expiry(manager, clock)
    relogin = tokens("relogin", issued_at=clock.now, lifetime_s=7200)

    async def new_code_exchange() -> None:
        await manager.save("fake", "t1", "u1", relogin)

    provider.during = new_code_exchange
    assert await manager.current(key, "fake") == relogin
    assert await manager.load(key) == relogin  # the stale refresh result never overwrote it


async def test_new_login_during_rejected_refresh_keeps_the_new_record(
    manager: TokenManager, provider: FakeProvider, clock: Clock
) -> None:
    key, _ = await _near_expiry(manager, clock)
    relogin = tokens("relogin", issued_at=clock.now, lifetime_s=7200)

    async def new_code_exchange() -> None:
        await manager.save("fake", "t1", "u1", relogin)

    provider.during = new_code_exchange
    provider.script = [ReauthRequired("the new login invalidated the old refresh token")]
    assert await manager.current(key, "fake") == relogin
    assert await manager.load(key) == relogin


async def test_a_rejected_refresh_never_deletes_a_newer_record_it_cannot_open(
    store: MemoryStore, provider: FakeProvider, clock: Clock
) -> None:
    # Mid-rotation of session.secrets: replica B (old secret only) refreshes while the user signs in
    # on replica A (new secret in front): B cannot open A's record, and must leave it alone.
    from gateway.sealing import Sealer

    old_secret, new_secret = "o" * 40, "n" * 40
    replica_b = TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock,
                             sealer=Sealer([old_secret]))
    replica_a = TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock,
                             sealer=Sealer([new_secret, old_secret]))
    key, _ = await _near_expiry(replica_b, clock)
    relogin = tokens("relogin", issued_at=clock.now, lifetime_s=7200)

    async def new_code_exchange() -> None:
        await replica_a.save("fake", "t1", "u1", relogin)

    provider.during = new_code_exchange
    provider.script = [ReauthRequired("the new login invalidated the old refresh token")]
    with pytest.raises(ReauthRequired):
        await replica_b.current(key, "fake")
    assert await replica_a.load(key) == relogin


# -- transient errors ------------------------------------------------------------------------------


async def test_transient_error_serves_the_old_token_and_backs_off(
    manager: TokenManager, provider: FakeProvider, clock: Clock, store: MemoryStore
) -> None:
    key, old = await _near_expiry(manager, clock)  # 60 s of validity left
    provider.script = [ProviderUnavailable("rate limited", retry_after_s=20)] * 3

    assert await manager.current(key, "fake") == old
    assert await manager.load(key) == old  # the record (and its refresh token) is kept
    assert len(provider.calls) == 1

    clock.now += 19  # within retry_after: no second provider call
    assert await manager.current(key, "fake") == old
    assert len(provider.calls) == 1

    clock.now += 2  # back-off over, still valid: try again, fail again, serve the old token
    assert await manager.current(key, "fake") == old
    assert len(provider.calls) == 2

    clock.now = old.expires_at + 21  # expired and the back-off is over: the provider still fails
    with pytest.raises(ProviderUnavailable) as exc:
        await manager.current(key, "fake")
    assert exc.value.retry_after_s == 20
    assert len(provider.calls) == 3
    assert await store.get(key) is not None  # a transient error never logs anyone out

    clock.now += 5  # expired and backing off: 503 straight away, the provider is left alone
    with pytest.raises(ProviderUnavailable) as exc:
        await manager.current(key, "fake")
    assert 1 <= exc.value.retry_after_s <= 15
    assert len(provider.calls) == 3

    clock.now += 16  # the provider is back
    fresh = await manager.current(key, "fake")
    assert fresh.access_token == "at-4" and provider.calls[-1] == old.refresh_token
    assert await manager.load(key) == fresh


async def test_new_login_clears_the_back_off(manager: TokenManager, provider: FakeProvider, clock: Clock) -> None:
    key, _ = await _near_expiry(manager, clock)
    provider.script = [ProviderUnavailable("down", retry_after_s=600)]
    await manager.current(key, "fake")
    assert len(provider.calls) == 1
    due = tokens("relogin", issued_at=clock.now - 7200 + 60, lifetime_s=7200)  # already due for refresh
    await manager.save("fake", "t1", "u1", due)
    assert (await manager.current(key, "fake")).access_token == "at-2"
    assert provider.calls[-1] == "rt-relogin"


async def test_transient_errors_are_shared_by_concurrent_callers(
    manager: TokenManager, provider: FakeProvider, clock: Clock
) -> None:
    key, old = await _near_expiry(manager, clock)
    clock.now = old.expires_at + 1
    provider.script = [ProviderUnavailable("timeout")]
    results = await asyncio.gather(*(manager.current(key, "fake") for _ in range(30)), return_exceptions=True)
    assert len(provider.calls) == 1
    assert all(isinstance(result, ProviderUnavailable) for result in results)


# -- cancellation --------------------------------------------------------------------------------------


async def test_cancelled_waiter_does_not_cancel_the_refresh(
    manager: TokenManager, provider: FakeProvider, clock: Clock
) -> None:
    key, _ = await _near_expiry(manager, clock)
    provider.delay_s = 0.05
    waiter = asyncio.create_task(manager.current(key, "fake"))
    await provider.started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert manager.stats() == {"refreshes_in_flight": 1}
    for _ in range(200):
        if manager.stats()["refreshes_in_flight"] == 0:
            break
        await asyncio.sleep(0.005)
    assert provider.finished == 1
    stored = await manager.load(key)
    assert stored is not None and stored.access_token == "at-1"  # the rotated tokens were kept
    assert await manager.current(key, "fake") == stored
    assert len(provider.calls) == 1


async def test_other_waiters_survive_a_cancelled_one(
    manager: TokenManager, provider: FakeProvider, clock: Clock
) -> None:
    key, _ = await _near_expiry(manager, clock)
    provider.delay_s = 0.03
    doomed = asyncio.create_task(manager.current(key, "fake"))
    survivors = [asyncio.create_task(manager.current(key, "fake")) for _ in range(5)]
    await provider.started.wait()
    doomed.cancel()
    results = await asyncio.gather(*survivors)
    assert doomed.cancelled()
    assert {result.access_token for result in results} == {"at-1"}
    assert len(provider.calls) == 1


async def test_app_tokens_are_fetched_once_and_cached_until_shortly_before_expiry() -> None:
    from gateway.tokens import AppTokenCache

    now = [1000.0]
    store = MemoryStore()
    cache = AppTokenCache(store, clock=lambda: now[0])
    calls = []

    async def fetch() -> tuple[str, float]:
        calls.append(now[0])
        await asyncio.sleep(0.05)
        return f"app-token-{len(calls)}", now[0] + 7200

    tokens = await asyncio.gather(*(cache.get("lark:cli_x", fetch) for _ in range(50)))
    assert set(tokens) == {"app-token-1"} and len(calls) == 1
    assert await cache.get("lark:cli_x", fetch) == "app-token-1" and len(calls) == 1
    await cache.invalidate("lark:cli_x")
    assert await cache.get("lark:cli_x", fetch) == "app-token-2" and len(calls) == 2


# -- several replicas on one store ------------------------------------------------------------------


async def test_a_transient_failure_backs_off_every_replica(store: MemoryStore, clock: Clock) -> None:
    provider = FakeProvider(clock, delay_s=0)
    replica_a = TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock)
    replica_b = TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock)
    key, old = await _near_expiry(replica_a, clock)
    provider.script = [ProviderUnavailable("rate limited", retry_after_s=20)]
    assert await replica_a.current(key, "fake") == old
    assert await replica_b.current(key, "fake") == old  # B backs off with A: the provider is left alone
    assert len(provider.calls) == 1
    clock.now += 21
    assert (await replica_b.current(key, "fake")).access_token == "at-2"


async def test_a_refresh_on_another_replica_outlasting_the_wait(store: MemoryStore, clock: Clock) -> None:
    """B gives up waiting for A's lock after ``lock_wait_s``: the old token while it is valid,
    then 503 (never a logout)."""
    slow = FakeProvider(clock, delay_s=0.5)
    replica_a = TokenManager(store, {"fake": slow}, refresh_margin_s=300, clock=clock)
    replica_b = TokenManager(store, {"fake": slow}, refresh_margin_s=300, clock=clock, lock_wait_s=0.05)
    key, old = await _near_expiry(replica_a, clock)
    refreshing = asyncio.create_task(replica_a.current(key, "fake"))
    await slow.started.wait()
    assert await replica_b.current(key, "fake") == old
    clock.now = old.expires_at + 1
    with pytest.raises(ProviderUnavailable) as exc:
        await replica_b.current(key, "fake")
    assert exc.value.code == "provider_slow" and exc.value.retry_after_s > 0
    assert (await refreshing).access_token == "at-1"
    assert len(slow.calls) == 1
    assert await replica_b.current(key, "fake") == await replica_b.load(key)


async def test_of_two_racing_logins_the_newer_grant_wins() -> None:
    store = MemoryStore()
    manager = TokenManager(store, {}, refresh_margin_s=300)
    newer = TokenSet(access_token="newer", expires_at=10_000, issued_at=2_000)
    older = TokenSet(access_token="older", expires_at=9_000, issued_at=1_000)
    key = await manager.save("p", "t", "u", newer)
    await manager.save("p", "t", "u", older)  # the slower exchange finishes last
    loaded = await manager.load(key)
    assert loaded is not None and loaded.access_token == "newer"


# -- the sign-in's flow, for the token.* audit events ----------------------------------------------


def _audit_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [record.event_fields for record in caplog.records  # type: ignore[attr-defined]
            if record.name == "gateway.audit"]


@pytest.mark.parametrize(("flow", "logged"), [("client", "in-client"), ("browser", "browser")])
async def test_a_refresh_keeps_the_sign_ins_flow_and_its_audit_events_carry_it(
        manager: TokenManager, provider: FakeProvider, clock: Clock, caplog: pytest.LogCaptureFixture,
        flow: Any, logged: str) -> None:
    """The handshake stamps the flow on the record (``TokenSet.flow``); the provider's rotated
    tokens know nothing of it, so the refresh carries it over, and the next refresh (read back
    from the store) still has it."""
    first = replace(tokens("old", issued_at=clock.now, lifetime_s=7200), flow=flow)
    key = await manager.save("fake", "t1", "u1", first)
    clock.now = first.expires_at - 60
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        fresh = await manager.current(key, "fake")
        stored = await manager.load(key)
        clock.now = fresh.expires_at - 60
        provider.script = [ProviderUnavailable("busy", retry_after_s=30)]
        assert await manager.current(key, "fake") == fresh  # served with the current token
        clock.now += 31
        provider.script = [ReauthRequired("refresh token revoked")]
        with pytest.raises(ReauthRequired):
            await manager.current(key, "fake")
    assert fresh.access_token == "at-1" and fresh.flow == flow
    assert stored is not None and stored.flow == flow
    events = _audit_events(caplog)
    assert [(event["event"], event.get("outcome")) for event in events] == [
        ("token.refreshed", None), ("token.refresh_failed", "transient"), ("token.refresh_failed", "definitive")]
    assert all(event["flow"] == logged and event["provider"] == "fake" and event["tenant"] == "t1"
               and event["user_id"] == "u1" for event in events)


def test_a_token_set_without_a_flow_stores_none_and_an_unknown_one_reads_as_none() -> None:
    """The stored form is the previous version's when the flow is unknown (nothing added), so a
    replica still running it reads the record; a value it never wrote is not believed."""
    plain = TokenSet(access_token="at", expires_at=2.0, issued_at=1.0)
    assert "flow" not in plain.to_dict()
    assert TokenSet.from_dict({**plain.to_dict(), "flow": "client"}).flow == "client"
    assert TokenSet.from_dict({**plain.to_dict(), "flow": "teleport"}).flow is None


@pytest.fixture(params=["memory", "redis"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    config = StoreConfig.model_validate({"backend": "redis", "url": request.getfixturevalue("redis_url"),
                                         "key_prefix": f"t:{uuid.uuid4().hex[:10]}:"})
    store = RedisStore.from_config(config)
    try:
        yield store
    finally:
        await store.aclose()


async def test_a_record_stored_by_the_previous_version_loads_and_refreshes(
        any_store: Store, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A record written before the flow was kept, byte for byte as that version's ``_encode`` did
    (sealed JSON, no ``flow``): it loads, refreshes, and its audit event simply has no flow."""
    sealer = Sealer([secrets.token_urlsafe(32)])
    provider = FakeProvider(clock)
    manager = TokenManager(any_store, {"fake": provider}, refresh_margin_s=300, clock=clock, sealer=sealer)
    key = token_key("fake", "t1", "u1")
    legacy = {"provider": "fake", "tokens": {"at": "at-legacy", "exp": clock.now + 60, "rt": "rt-legacy",
                                             "rexp": None, "iat": clock.now - 7140, "scope": "", "extra": {}}}
    await any_store.set(key, seal(sealer, key, json.dumps(legacy, separators=(",", ":")).encode()), 3600)
    loaded = await manager.load(key)
    assert loaded is not None and loaded.access_token == "at-legacy" and loaded.flow is None
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        fresh = await manager.current(key, "fake")
    assert fresh.access_token == "at-1" and provider.calls == ["rt-legacy"]
    again = await manager.load(key)
    assert again is not None and again.refresh_token == "rt-1" and again.flow is None
    [event] = _audit_events(caplog)
    assert event["event"] == "token.refreshed" and "flow" not in event
