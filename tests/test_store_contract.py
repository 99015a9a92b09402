"""The contract every ``Store`` backend keeps. One suite, parametrized over store factories.

To run a new backend through it, add a factory to ``STORE_FACTORIES``. The Redis factories use
the session's Redis fixtures (``tests/conftest.py``: ``GATEWAY_TEST_REDIS_URL`` or a
``redis-server`` started for the session, never skipped), one standalone server, a master behind
a Sentinel and a one-node Cluster; each test gets its own key prefix, so a shared server works.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import StoreConfig
from gateway.stores import Lease, LockTimeout, Store, Versioned
from gateway.stores.memory import MemoryStore

SHORT_TTL_S = 0.05
PAST_SHORT_TTL_S = 0.12


async def _memory_store(request: pytest.FixtureRequest) -> Store:
    return MemoryStore(max_entries=1000)


def _redis(**settings: object) -> Store:
    from gateway.stores.redis import RedisStore

    config = StoreConfig.model_validate({"backend": "redis", "key_prefix": f"contract:{uuid.uuid4().hex[:12]}:",
                                         **settings})
    return RedisStore.from_config(config)


async def _redis_store(request: pytest.FixtureRequest) -> Store:
    return _redis(url=request.getfixturevalue("redis_url"))


async def _redis_sentinel_store(request: pytest.FixtureRequest) -> Store:
    return _redis(mode="sentinel", sentinels=[request.getfixturevalue("redis_sentinel")],
                  sentinel_master="mymaster")


async def _redis_cluster_store(request: pytest.FixtureRequest) -> Store:
    return _redis(mode="cluster", url=request.getfixturevalue("redis_cluster_url"))


STORE_FACTORIES: list[Callable[[pytest.FixtureRequest], Awaitable[Store]]] = [
    _memory_store, _redis_store, _redis_sentinel_store, _redis_cluster_store,
]


@pytest.fixture(params=STORE_FACTORIES, ids=lambda factory: factory.__name__.strip("_").removesuffix("_store"))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    instance = await request.param(request)
    yield instance
    await instance.aclose()


@pytest.fixture
def key() -> Callable[[str], str]:
    prefix = f"contract:{uuid.uuid4().hex}:"
    return lambda name: prefix + name


# -- get / set / delete -------------------------------------------------------------------------


async def test_get_absent(store: Store, key: Callable[[str], str]) -> None:
    assert await store.get(key("nothing")) is None


async def test_set_get_overwrite_delete(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("a"), b"one", 60)
    assert await store.get(key("a")) == b"one"
    await store.set(key("a"), b"two", 60)
    assert await store.get(key("a")) == b"two"
    await store.delete(key("a"))
    assert await store.get(key("a")) is None
    await store.delete(key("a"))  # deleting an absent key is fine
    await store.delete(key("never"))


async def test_values_are_opaque_bytes(store: Store, key: Callable[[str], str]) -> None:
    for name, value in {"binary": bytes(range(256)), "empty": b"", "utf8": "张三\r\n".encode()}.items():
        await store.set(key(name), value, 60)
        assert await store.get(key(name)) == value


async def test_keys_are_independent(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("x"), b"1", 60)
    await store.set(key("y"), b"2", 60)
    await store.delete(key("x"))
    assert await store.get(key("x")) is None
    assert await store.get(key("y")) == b"2"


# -- TTL ------------------------------------------------------------------------------------------


async def test_ttl_expiry(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("short"), b"v", SHORT_TTL_S)
    await store.set(key("long"), b"v", 60)
    await store.set_versioned(key("versioned"), b"v", SHORT_TTL_S)
    await store.set(key("popped"), b"v", SHORT_TTL_S)
    assert await store.get(key("short")) == b"v"
    await asyncio.sleep(PAST_SHORT_TTL_S)
    assert await store.get(key("short")) is None
    assert await store.get_versioned(key("versioned")) is None
    assert await store.pop(key("popped")) is None
    assert await store.get(key("long")) == b"v"
    # An expired versioned key counts as absent for compare-and-set.
    assert await store.set_versioned(key("versioned"), b"new", 60, expected_version=0) is not None


async def test_writing_again_resets_the_ttl(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("a"), b"v1", SHORT_TTL_S)
    await store.set(key("a"), b"v2", 60)
    await store.set_versioned(key("b"), b"v1", SHORT_TTL_S)
    await store.set_versioned(key("b"), b"v2", 60)
    await asyncio.sleep(PAST_SHORT_TTL_S)
    assert await store.get(key("a")) == b"v2"
    assert await store.get(key("b")) == b"v2"


# -- pop -----------------------------------------------------------------------------------------------


async def test_pop_is_single_use(store: Store, key: Callable[[str], str]) -> None:
    assert await store.pop(key("absent")) is None
    await store.set(key("state"), b"pending", 60)
    assert await store.pop(key("state")) == b"pending"
    assert await store.pop(key("state")) is None
    assert await store.get(key("state")) is None


async def test_concurrent_pops_have_exactly_one_winner(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("state"), b"pending", 60)
    results = await asyncio.gather(*(store.pop(key("state")) for _ in range(100)))
    assert results.count(b"pending") == 1
    assert results.count(None) == 99


# -- versions and compare-and-set -------------------------------------------------------------------------


async def test_versions_increase(store: Store, key: Callable[[str], str]) -> None:
    versions = [await store.set_versioned(key("rec"), f"v{i}".encode(), 60) for i in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    assert await store.get_versioned(key("rec")) == Versioned(5, b"v4")
    assert await store.get(key("rec")) == b"v4"
    assert await store.get_versioned(key("absent")) is None


async def test_compare_and_set(store: Store, key: Callable[[str], str]) -> None:
    k = key("rec")
    assert await store.set_versioned(k, b"a", 60, expected_version=1) is None  # absent is version 0
    assert await store.get(k) is None
    assert await store.set_versioned(k, b"a", 60, expected_version=0) == 1
    assert await store.set_versioned(k, b"b", 60, expected_version=0) is None  # no longer absent
    assert await store.set_versioned(k, b"b", 60, expected_version=1) == 2
    assert await store.set_versioned(k, b"stale", 60, expected_version=1) is None
    assert await store.set_versioned(k, b"future", 60, expected_version=3) is None
    assert await store.get_versioned(k) == Versioned(2, b"b")
    await store.delete(k)
    assert await store.set_versioned(k, b"again", 60, expected_version=0) == 1


async def test_plain_write_invalidates_a_pending_compare_and_set(store: Store, key: Callable[[str], str]) -> None:
    k = key("rec")
    seen = await store.set_versioned(k, b"a", 60)
    assert seen is not None
    await store.set(k, b"written behind the record's back", 60)
    assert await store.set_versioned(k, b"stale", 60, expected_version=seen) is None
    assert await store.get(k) == b"written behind the record's back"


async def test_concurrent_compare_and_set_has_exactly_one_winner(store: Store, key: Callable[[str], str]) -> None:
    k = key("rec")
    version = await store.set_versioned(k, b"start", 60)
    results = await asyncio.gather(
        *(store.set_versioned(k, f"w{i}".encode(), 60, expected_version=version) for i in range(50))
    )
    winners = [i for i, result in enumerate(results) if result is not None]
    assert len(winners) == 1
    assert results[winners[0]] == 2
    assert await store.get_versioned(k) == Versioned(2, f"w{winners[0]}".encode())


async def test_ping(store: Store) -> None:
    assert await store.ping() is None


async def test_ttls_take_fractions_of_a_second(store: Store, key: Callable[[str], str]) -> None:
    await store.set(key("a"), b"v", 0.3)
    await asyncio.sleep(0.15)
    assert await store.get(key("a")) == b"v"
    await asyncio.sleep(0.3)
    assert await store.get(key("a")) is None


# -- count (gateway_sessions_active) ---------------------------------------------------------------


async def test_count_follows_writes_deletes_pops_and_expiry(store: Store) -> None:
    run = uuid.uuid4().hex  # the keys are under the counted prefix itself ("sess:")
    assert await store.count("sess:") == 0
    await store.set(f"sess:{run}:a", b"a", 60)
    await store.set(f"sess:{run}:b", b"b", SHORT_TTL_S)
    await store.set_versioned(f"sess:{run}:c", b"c", 60)
    await store.set(f"sess:{run}:a", b"again", 60)  # a key written twice counts once
    await store.set(f"other:{run}", b"not a session", 60)
    await store.delete(f"sess:{run}:gone-already")  # deleting what is not there changes nothing
    assert await store.count("sess:") == 3
    await asyncio.sleep(PAST_SHORT_TTL_S)
    assert await store.count("sess:") == 2  # b expired by its TTL, nothing deleted it
    await store.delete(f"sess:{run}:a")
    assert await store.pop(f"sess:{run}:c") == b"c"
    assert await store.count("sess:") == 0
    await store.set(f"sess:{run}:b", b"back", 60)  # written again after it expired
    assert await store.count("sess:") == 1


async def test_count_answers_only_for_counted_prefixes_or_says_it_cannot(store: Store) -> None:
    await store.set(f"other:{uuid.uuid4().hex}", b"x", 60)
    # The memory store walks its keys and may answer any prefix; Redis counts only what it indexes.
    assert await store.count("other:") == (1 if isinstance(store, MemoryStore) else None)


# -- locks ---------------------------------------------------------------------------------------


async def test_lock_is_exclusive_and_fences_increase(store: Store, key: Callable[[str], str]) -> None:
    first = await store.acquire(key("lock"), lease_s=5, wait_s=1)
    with pytest.raises(LockTimeout):
        await store.acquire(key("lock"), lease_s=5, wait_s=0.05)
    other = await store.acquire(key("other"), lease_s=5, wait_s=0.05)  # names are independent
    await store.release(first)
    second = await store.acquire(key("lock"), lease_s=5, wait_s=0.05)
    assert second.fence > first.fence
    await store.release(second)
    await store.release(other)


async def test_a_release_wakes_the_waiters_at_once(store: Store, key: Callable[[str], str]) -> None:
    """Waiters are notified, not left to poll: the lease here is far longer than the wait."""
    held = await store.acquire(key("lock"), lease_s=30, wait_s=1)
    waiters = [asyncio.create_task(store.acquire(key("lock"), lease_s=30, wait_s=10)) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert not any(waiter.done() for waiter in waiters)
    released_at = time.monotonic()
    await store.release(held)
    done, _ = await asyncio.wait(waiters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    first_task = done.pop()
    first = first_task.result()
    assert time.monotonic() - released_at < 0.5
    await store.release(first)
    (second_task,) = [waiter for waiter in waiters if waiter is not first_task]
    second = await asyncio.wait_for(second_task, 2)
    assert time.monotonic() - released_at < 1.0
    assert {first.fence, second.fence} == {held.fence + 1, held.fence + 2}
    await store.release(second)


async def test_an_abandoned_lock_ends_with_its_lease(store: Store, key: Callable[[str], str]) -> None:
    """A holder that dies never releases nor renews: the lock is free once its lease runs out."""
    dead = await store.acquire(key("lock"), lease_s=0.3, wait_s=1)
    started = time.monotonic()
    taken = await store.acquire(key("lock"), lease_s=5, wait_s=5)
    waited = time.monotonic() - started
    assert 0.2 <= waited < 1.0, waited
    assert taken.fence > dead.fence
    # The old holder can neither renew nor release what is no longer its lock.
    assert await store.renew(dead) is False and dead.lost
    await store.release(dead)
    with pytest.raises(LockTimeout):
        await store.acquire(key("lock"), lease_s=5, wait_s=0.1)
    await store.release(taken)


async def test_the_lease_is_renewed_while_the_holder_works(store: Store, key: Callable[[str], str]) -> None:
    async def contender() -> Lease:
        return await store.acquire(key("lock"), lease_s=5, wait_s=0.4)

    async with store.lock(key("lock"), lease_s=0.2, wait_s=1) as lease:
        with pytest.raises(LockTimeout):  # for twice the lease and more
            await contender()
        assert not lease.lost
    started = time.monotonic()
    taken = await contender()
    assert time.monotonic() - started < 0.3  # released on exit, not left to expire
    await store.release(taken)


async def test_one_holder_at_a_time(store: Store, key: Callable[[str], str]) -> None:
    inside, most = 0, 0

    async def worker() -> None:
        nonlocal inside, most
        async with store.lock(key("lock"), lease_s=5, wait_s=10):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.005)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(20)))
    assert most == 1


async def test_a_failing_body_releases_the_lock(store: Store, key: Callable[[str], str]) -> None:
    with pytest.raises(RuntimeError):
        async with store.lock(key("lock"), lease_s=5, wait_s=1):
            raise RuntimeError("boom")
    async with store.lock(key("lock"), lease_s=5, wait_s=0.1):
        pass


# -- broadcast -------------------------------------------------------------------------------------


async def test_publish_reaches_subscribers(store: Store, key: Callable[[str], str]) -> None:
    received: list[str] = []
    store.subscribe(key("topic"), received.append)
    await store.publish(key("topic"), "hello 张三")
    await store.publish(key("elsewhere"), "not for us")
    assert received == ["hello 张三"]
