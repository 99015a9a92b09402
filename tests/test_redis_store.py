"""The Redis store beyond the contract suite: its layout, several replicas on one Redis, outages.

"Replicas" here are several ``RedisStore`` instances (each with its own connections and
notification subscription) in one test process; ``tests/test_replicas.py`` runs real processes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.config import StoreConfig
from gateway.errors import StoreUnavailable
from gateway.providers import TokenSet
from gateway.stores import LockTimeout
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore
from gateway.tokens import AppTokenCache, TokenManager
from tests.conftest import HTML, GatewayStarter, RedisProcess, browser_login, free_port
from tests.test_tokens import Clock, FakeProvider, tokens

StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def make_store(redis_url: str) -> AsyncIterator[StoreFactory]:
    """``make_store(**settings)``: a RedisStore on the session's Redis; every store made by one
    test shares one key prefix (they are replicas of one site)."""
    prefix = f"t:{uuid.uuid4().hex[:10]}:"
    made: list[RedisStore] = []

    def build(**settings: Any) -> RedisStore:
        config = StoreConfig.model_validate({"backend": "redis", "url": redis_url, "key_prefix": prefix, **settings})
        store = RedisStore.from_config(config)
        made.append(store)
        return store

    yield build
    for store in made:
        await store.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


# -- layout ---------------------------------------------------------------------------------------


async def test_values_carry_their_version_under_the_prefix(make_store: StoreFactory, raw: aioredis.Redis) -> None:
    store = make_store()
    await store.set("sess:abc", b"payload", 60)
    assert await raw.get(f"{store.prefix}sess:abc") == b"1:payload"
    await store.set("sess:abc", b"again", 60)
    assert await raw.get(f"{store.prefix}sess:abc") == b"2:again"
    assert 0 < await raw.pttl(f"{store.prefix}sess:abc") <= 60_000
    await store.set("short", b"x", 0.25)  # milliseconds, not rounded to seconds
    assert 0 < await raw.pttl(f"{store.prefix}short") <= 250
    assert await raw.get("sess:abc") is None  # nothing outside the prefix


async def test_session_keys_are_indexed_by_their_expiry(make_store: StoreFactory, raw: aioredis.Redis) -> None:
    """``count:sess:`` scores each session key by its expiry on Redis's clock and lives no longer
    than its last member; other keys are not in it."""
    store = make_store()
    await store.set("sess:abc", b"payload", 60)
    await store.set("tok:lark:t:u", b"not counted", 600)
    index = f"{store.prefix}count:sess:"
    seconds, micros = await raw.time()
    [(member, score)] = await raw.zrange(index, 0, -1, withscores=True)
    assert member == b"sess:abc" and 59_000 < score - (seconds * 1000 + micros // 1000) <= 60_000
    assert 59_000 < await raw.pttl(index) <= 60_000
    await store.set("sess:abc", b"again", 120)  # written again: one member, its later expiry
    assert await raw.zcard(index) == 1 and 119_000 < await raw.pttl(index) <= 120_000
    await store.delete("sess:abc")
    assert await raw.zcard(index) == 0


async def test_a_lock_names_its_holder(make_store: StoreFactory, raw: aioredis.Redis) -> None:
    store = make_store()
    async with store.lock("refresh:tok:lark:t:u", lease_s=5, wait_s=1) as lease:
        keys = [key async for key in raw.scan_iter(f"{store.prefix}lock:*")]
        assert len(keys) == 1
        value = (await raw.get(keys[0])).decode()
        assert value == f"{lease.fence}:{lease.owner}"
        assert f":{os.getpid()}:" in value  # host:pid:random, so an operator sees who holds it
        assert 4000 < await raw.pttl(keys[0]) <= 5000
    assert [key async for key in raw.scan_iter(f"{store.prefix}lock:*")] == []


# -- several replicas -----------------------------------------------------------------------------


async def test_a_release_on_one_replica_wakes_the_waiters_of_another(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    held = await a.acquire("lock", lease_s=30, wait_s=1)
    waiter = asyncio.create_task(b.acquire("lock", lease_s=30, wait_s=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    released = time.monotonic()
    await a.release(held)
    lease = await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - released < 0.2  # pub/sub, not the 30 s lease
    assert lease.fence == held.fence + 1
    await b.release(lease)


async def test_a_broadcast_reaches_every_replica(make_store: StoreFactory) -> None:
    a, b, c = make_store(), make_store(), make_store()
    seen: dict[str, list[str]] = {"b": [], "c": []}
    b.subscribe("news", seen["b"].append)
    c.subscribe("news", seen["c"].append)
    await b.ping()  # connected, so subscribed...
    await c.ping()
    await b._listening()  # ...and listening
    await c._listening()
    await a.publish("news", "session ended")
    for _ in range(100):
        if seen["b"] and seen["c"]:
            break
        await asyncio.sleep(0.01)
    assert seen == {"b": ["session ended"], "c": ["session ended"]}


async def test_refresh_is_single_flight_across_replicas(make_store: StoreFactory) -> None:
    """Three replicas, 300 concurrent callers, one provider call; the others re-read the record."""
    clock = Clock()
    provider = FakeProvider(clock, delay_s=0.2)
    managers = [
        TokenManager(make_store(), {"fake": provider}, refresh_margin_s=300, clock=clock, lock_lease_s=1)
        for _ in range(3)
    ]
    old = tokens("old", issued_at=clock.now, lifetime_s=7200)
    key = await managers[0].save("fake", "t1", "u1", old)
    clock.now = old.expires_at - 60
    results = await asyncio.gather(*(managers[i % 3].current(key, "fake") for i in range(300)))
    assert provider.calls == [old.refresh_token]
    assert {result.access_token for result in results} == {"at-1"}
    assert all(await asyncio.gather(*(m.load(key) for m in managers)))


async def test_a_slow_refresh_keeps_its_lease(make_store: StoreFactory) -> None:
    """The provider answers after three leases: the lease is renewed, nobody else calls it."""
    clock = Clock()
    provider = FakeProvider(clock, delay_s=0.9)
    managers = [
        TokenManager(make_store(), {"fake": provider}, refresh_margin_s=300, clock=clock, lock_lease_s=0.3)
        for _ in range(2)
    ]
    old = tokens("old", issued_at=clock.now, lifetime_s=7200)
    key = await managers[0].save("fake", "t1", "u1", old)
    clock.now = old.expires_at - 60
    results = await asyncio.gather(*(managers[i % 2].current(key, "fake") for i in range(20)))
    assert len(provider.calls) == 1
    assert {result.access_token for result in results} == {"at-1"}


async def test_app_tokens_are_fetched_once_across_replicas(make_store: StoreFactory) -> None:
    caches = [AppTokenCache(make_store()) for _ in range(3)]
    calls: list[float] = []

    async def fetch() -> tuple[str, float]:
        calls.append(time.time())
        await asyncio.sleep(0.1)
        return f"app-token-{len(calls)}", time.time() + 7200

    results = await asyncio.gather(*(caches[i % 3].get("lark:cli_x", fetch) for i in range(90)))
    assert set(results) == {"app-token-1"} and len(calls) == 1


async def test_a_new_login_during_a_refresh_on_another_replica_wins(make_store: StoreFactory) -> None:
    clock = Clock()
    provider = FakeProvider(clock, delay_s=0.05)
    a = TokenManager(make_store(), {"fake": provider}, refresh_margin_s=300, clock=clock)
    b = TokenManager(make_store(), {"fake": provider}, refresh_margin_s=300, clock=clock)
    old = tokens("old", issued_at=clock.now, lifetime_s=7200)
    key = await a.save("fake", "t1", "u1", old)
    clock.now = old.expires_at - 60
    relogin = TokenSet(access_token="at-relogin", refresh_token="rt-relogin", issued_at=clock.now,
                       expires_at=clock.now + 7200)

    async def login_on_b() -> None:
        await b.save("fake", "t1", "u1", relogin)

    provider.during = login_on_b
    assert await a.current(key, "fake") == relogin
    assert await b.load(key) == relogin  # the refresh's compare-and-set lost to the newer record


# -- outages --------------------------------------------------------------------------------------


async def test_an_unreachable_redis_fails_fast_and_clearly() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    store = RedisStore.from_config(StoreConfig(backend="redis", url=url, connect_timeout_s=0.5))
    started = time.monotonic()
    calls = [store.get("k"), store.set("k", b"v", 1), store.delete("k"), store.pop("k"),
             store.get_versioned("k"), store.set_versioned("k", b"v", 1, expected_version=0), store.ping(),
             store.publish("t", "m")]
    for call in calls:
        with pytest.raises(StoreUnavailable) as exc:
            await call
        assert exc.value.status_code == 503 and exc.value.retry_after_s > 0
        assert exc.value.message == "The session store is unavailable; please try again shortly."
    with pytest.raises(StoreUnavailable):
        await store.acquire("lock", lease_s=1, wait_s=1)
    assert time.monotonic() - started < 5
    assert store.last_error is not None and "hunter2" not in store.last_error
    await store.aclose()


async def test_the_store_recovers_when_redis_comes_back(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path).start()
    config = StoreConfig(backend="redis", url=server.url, connect_timeout_s=0.5, command_timeout_s=0.5)
    store, other = RedisStore.from_config(config), RedisStore.from_config(config)
    received: list[str] = []
    other.subscribe("news", received.append)
    try:
        await store.set("k", b"v", 60)
        await other._listening()
        server.stop(hard=True)
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        with pytest.raises(StoreUnavailable):
            await store.ping()
        server.start()  # same port, empty (no persistence)
        await store.ping()  # the same client reconnects by itself
        assert await store.get("k") is None
        await store.set("k", b"again", 60)
        assert await store.get("k") == b"again"
        async with store.lock("lock", lease_s=1, wait_s=1):
            pass
        # The other replica's subscription came back too.
        for _ in range(300):
            await store.publish("news", "back")
            if received:
                break
            await asyncio.sleep(0.02)
        assert received and received[0] == "back"
    finally:
        await store.aclose()
        await other.aclose()
        server.stop()


# -- check-config ---------------------------------------------------------------------------------------


def _check_config(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gateway.yaml"
    secret = secrets.token_urlsafe(32)
    config.write_text(f'session: {{secrets: ["{secret}"]}}\nstore: {{backend: redis, url: "{url}"}}\n')
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(config)], capture_output=True,
                          text=True, env=clean, timeout=60, check=False)


def test_check_config_tries_the_redis_connection(tmp_path: Path, redis_url: str) -> None:
    ok = _check_config(tmp_path, redis_url)
    assert ok.returncode == 0, ok.stderr
    assert "store:" in ok.stdout and "url: '***'" in ok.stdout

    port = free_port()
    down = _check_config(tmp_path, f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    assert down.returncode == 2
    assert down.stdout == ""
    assert f"store.url: cannot reach redis 127.0.0.1:{port}" in down.stderr
    assert "Traceback" not in down.stderr and "hunter2" not in down.stderr


# -- the hot path across replicas ------------------------------------------------------------------------


async def test_logout_on_one_replica_ends_the_session_on_the_others_at_once(
    start_gateway: GatewayStarter, redis_url: str
) -> None:
    """The session cache lives a minute here: only the broadcast can explain the prompt 401."""
    secret = secrets.token_urlsafe(32)
    sections: dict[str, Any] = {
        "session": {"secrets": [secret], "secure": False, "cache_ttl_s": 60},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": f"t:{uuid.uuid4().hex[:10]}:"},
    }
    async with start_gateway(**sections) as a, start_gateway(**sections) as b, \
            a.client() as on_a, b.client() as on_b:
        assert (await browser_login(on_a, "/private")).status_code == 200
        ticket = on_a.cookies.get("gw_session")
        assert ticket
        on_b.cookies.set("gw_session", ticket)
        assert (await on_b.get("/private")).status_code == 200  # B has it cached now
        assert (await on_b.get("/private")).status_code == 200
        logout = await on_a.post("/_gateway/logout", headers={"origin": a.url})
        assert logout.status_code == 200
        answer = httpx.Response(200)
        for _ in range(50):
            answer = await on_b.get("/private", headers=HTML)
            if answer.status_code != 200:
                break
            await asyncio.sleep(0.01)
        assert answer.status_code == 302 and "/_gateway/login" in answer.headers["location"]


async def test_a_burst_at_cache_expiry_costs_one_store_round_trip(
    start_gateway: GatewayStarter, redis_url: str
) -> None:
    """Requests that find their cached session expired share one reload (per process)."""
    sections: dict[str, Any] = {
        "session": {"cache_ttl_s": 0.5},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": f"t:{uuid.uuid4().hex[:10]}:"},
    }
    async with start_gateway(**sections) as running, running.client() as client:
        assert (await browser_login(client, "/x")).status_code == 200
        store = running.gateway.runtime.store
        reads: list[str] = []
        original = store.get

        async def counting(key: str) -> bytes | None:
            reads.append(key)
            return await original(key)

        store.get = counting
        await asyncio.sleep(0.6)  # every cached entry has expired
        ticket = client.cookies.get("gw_session")
        assert ticket
        authenticator = running.gateway.runtime.authenticator
        results = await asyncio.gather(*(authenticator.authenticate(ticket) for _ in range(50)))
        assert all(result is not None and result is results[0] for result in results)
        assert len([key for key in reads if key.startswith("sess:")]) == 1
        assert len([key for key in reads if key.startswith("tok:")]) == 1


# -- configuration of the topologies ---------------------------------------------------------------


def test_a_cluster_takes_several_seed_nodes_and_keeps_them_secret() -> None:
    from gateway.config import GatewayConfig, masked_dict

    config = GatewayConfig.model_validate({
        "session": {"secrets": [secrets.token_urlsafe(32)]},
        "store": {"backend": "redis", "mode": "cluster", "url": "redis://:pw-one@10.0.0.1:6379",
                  "urls": ["redis://:pw-two@10.0.0.2:6379", "rediss://10.0.0.3:6380"]},
    })
    assert config.store.seed_urls() == ["redis://:pw-one@10.0.0.1:6379", "redis://:pw-two@10.0.0.2:6379",
                                         "rediss://10.0.0.3:6380"]
    printed = masked_dict(config)["store"]
    assert printed["url"] == "***" and printed["urls"] == ["***", "***"]
    assert StoreConfig(backend="redis", mode="cluster", urls=["redis://h:1"]).seed_urls() == ["redis://h:1"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"mode": "cluster"}, "mode cluster needs url or urls"),
    ({"url": "redis://h:1", "urls": ["redis://h:2"]}, "needs mode cluster"),
    ({"mode": "cluster", "urls": ["unix:///run/redis.sock"]}, "item 1: must be a redis:// or rediss:// URL"),
    ({"mode": "cluster", "urls": ["redis://h:1", "redis://h:port"]}, "item 2: the port is not a number"),
    ({"mode": "cluster", "url": "redis://h:1/2"}, "a Redis Cluster has only database 0"),
])
def test_bad_seed_nodes_are_refused_with_a_reason(settings: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        StoreConfig.model_validate({"backend": "redis", **settings})
    assert message in str(exc.value)


def test_replica_acknowledgements_default_to_one_with_sentinel_only() -> None:
    sentinel = StoreConfig(backend="redis", mode="sentinel", sentinels=["10.0.0.1:26379"])
    assert sentinel.acks_needed() == 1
    assert StoreConfig(backend="redis", url="redis://h:1").acks_needed() == 0
    assert StoreConfig(backend="redis", mode="cluster", url="redis://h:1").acks_needed() == 0
    assert StoreConfig(backend="redis", url="redis://h:1", replica_acks=2).acks_needed() == 2
    assert StoreConfig(backend="redis", mode="sentinel", sentinels=["h:1"], replica_acks=0).acks_needed() == 0


# -- failovers: what the store says about them, and what the token refresh does with it ---------------


def test_an_outage_is_logged_once_and_its_end_once_even_when_answers_interleave(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One Cluster master dead: commands to the others succeed between the failures. Issue 14
    failure 3 logged a pair of lines per request."""
    from gateway.stores import redis as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    health = module._Health("redis cluster via a:1")
    with caplog.at_level("WARNING", logger="gateway.stores.redis"):
        for _ in range(30):
            health.failed("get: ConnectionError: refused")
            now[0] += 0.1
            health.answered()  # another master answered
            now[0] += 0.1
        assert health.reason is not None
        now[0] += 4.0  # four seconds without a failure: not yet
        health.answered()
        assert health.reason is not None
        now[0] += 1.0  # five seconds without a failure
        health.answered()
        assert health.reason is None
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "is unreachable" in caplog.records[0].getMessage()
    assert "is reachable again" in caplog.records[1].getMessage()


async def test_a_cluster_whose_seeds_are_all_dead_is_unavailable_not_an_error() -> None:
    """``RedisClusterException`` is not a ``RedisError``: it used to escape as a 500."""
    urls = [f"redis://:hunter2-secret@127.0.0.1:{free_port()}" for _ in range(2)]
    store = RedisStore.from_config(StoreConfig(backend="redis", mode="cluster", urls=urls, connect_timeout_s=0.5))
    try:
        for call in (store.get("k"), store.set("k", b"v", 1), store.ping(), store.publish("t", "m"),
                     store.set_versioned_replicated("k", b"v", 1)):
            with pytest.raises(StoreUnavailable):
                await call
        assert store.last_error is not None and "hunter2" not in store.last_error
    finally:
        await store.aclose()


async def test_a_cluster_is_found_through_the_next_seed_when_the_first_is_dead(redis_cluster_url: str) -> None:
    urls = [f"redis://127.0.0.1:{free_port()}", redis_cluster_url.removesuffix("/0")]
    store = RedisStore.from_config(StoreConfig(backend="redis", mode="cluster", urls=urls, connect_timeout_s=0.5,
                                               key_prefix=f"t:{uuid.uuid4().hex[:10]}:"))
    try:
        await store.ping()
        assert await store.set_versioned_replicated("k", b"v", 60) == (1, True)  # a cluster does not WAIT
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()


async def test_a_write_waits_for_a_replica_and_says_when_none_acknowledged(tmp_path: Path) -> None:
    master = RedisProcess(tmp_path).start()
    replica = RedisProcess(tmp_path, None, "--replicaof", "127.0.0.1", str(master.port)).start()
    config = StoreConfig(backend="redis", url=master.url, replica_acks=1, command_timeout_s=0.5)
    store = RedisStore.from_config(config)
    try:
        watcher = aioredis.Redis(port=replica.port)
        for _ in range(200):  # the replica's first sync
            if (await watcher.info("replication")).get("master_link_status") == "up":
                break
            await asyncio.sleep(0.05)
        await watcher.aclose()
        assert await store.set_versioned_replicated("k", b"v", 60) == (1, True)
        async with store.lock("name", lease_s=5, wait_s=1) as lease:
            assert lease.fence > 0
        replica.stop(hard=True)
        started = time.monotonic()
        assert await store.set_versioned_replicated("k", b"w", 60, expected_version=1) == (2, False)
        assert time.monotonic() - started < 2  # WAIT's own timeout, not the socket's
        with pytest.raises(LockTimeout):  # a lock no replica has is not relied on
            await store.acquire("name", lease_s=5, wait_s=1)
    finally:
        await store.aclose()
        replica.stop()
        master.stop()


class _FailingOver(MemoryStore):
    """A master demoted right after it took the rotated tokens: the first write 'succeeds', no
    replica acknowledges it, and it is gone; the next ones land on the new master."""

    def __init__(self) -> None:
        super().__init__()
        self.durable_write_window_s = 5.0
        self.attempts: list[int | None] = []

    async def set_versioned_replicated(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> tuple[int | None, bool]:
        self.attempts.append(expected_version)
        if len(self.attempts) == 1:
            return (expected_version or 0) + 1, False  # written on the old master: discarded
        return await self.set_versioned(key, value, ttl_s, expected_version=expected_version), True


async def test_a_rotation_written_to_a_demoted_master_is_written_again_on_the_new_one() -> None:
    clock = Clock()
    provider = FakeProvider(clock, delay_s=0.01)
    store = _FailingOver()
    manager = TokenManager(store, {"fake": provider}, refresh_margin_s=300, clock=clock)
    old = tokens("old", issued_at=clock.now, lifetime_s=7200)
    key = await manager.save("fake", "t1", "u1", old)
    clock.now = old.expires_at - 60
    fresh = await manager.current(key, "fake")
    assert fresh.refresh_token == "rt-1"
    assert store.attempts == [1, 1]  # the lost write, then again over the record it started from
    assert await manager.load(key) == fresh
    assert provider.calls == ["rt-old"]  # one rotation
    assert await manager.current(key, "fake") == fresh and provider.calls == ["rt-old"]


# -- gateway_sessions_active --------------------------------------------------------------------------


async def test_sessions_active_counts_every_replicas_sessions_on_redis(
    start_gateway: GatewayStarter, redis_url: str, raw: aioredis.Redis
) -> None:
    """Each replica answers the count of the sessions of all of them (the index ``count:sess:``,
    no scan of the keys); a logout on one lowers it on both, and an index member whose key's TTL
    has passed is not counted even though nothing deleted it."""
    from tests.test_metrics import samples

    prefix = f"t:{uuid.uuid4().hex[:10]}:"
    sections: dict[str, Any] = {
        "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": prefix},
        "metrics": {"allow_from": ["127.0.0.1"]},
    }

    async def active(running: Any) -> float:
        async with running.client() as scraper:
            return samples((await scraper.get("/_gateway/metrics")).text)["gateway_sessions_active"]

    async with start_gateway(**sections) as a, start_gateway(**sections) as b, \
            a.client() as on_a, b.client() as on_b:
        assert (await active(a), await active(b)) == (0, 0)
        assert (await browser_login(on_a, "/private")).status_code == 200
        assert (await browser_login(on_b, "/private")).status_code == 200
        assert (await active(a), await active(b)) == (2, 2)
        assert (await on_b.post("/_gateway/logout", headers={"origin": b.url})).status_code == 200
        assert (await active(a), await active(b)) == (1, 1)
        # A session whose key died by its TTL (here: made to, as Redis would after max_age_s).
        [key] = [key async for key in raw.scan_iter(match=f"{prefix}sess:*")]
        await raw.pexpire(key, 1)
        await raw.zadd(f"{prefix}count:sess:", {key.decode().removeprefix(prefix): 1})  # its expiry, long past
        assert (await active(a), await active(b)) == (0, 0)
    assert await raw.zcard(f"{prefix}count:sess:") == 0  # the scrape dropped the expired member
