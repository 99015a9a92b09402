"""The contract every ``Store`` backend keeps. One suite, parametrized over store factories.

To run a new backend through it, add a factory to ``STORE_FACTORIES`` (e.g. a Redis store on a
test server, skipped when none is reachable). Keys are unique per test, so a shared server works.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.stores import Store, Versioned
from gateway.stores.memory import MemoryStore

SHORT_TTL_S = 0.05
PAST_SHORT_TTL_S = 0.12


async def _memory_store() -> Store:
    return MemoryStore(max_entries=1000)


STORE_FACTORIES: list[Callable[[], Awaitable[Store]]] = [_memory_store]


@pytest.fixture(params=STORE_FACTORIES, ids=lambda factory: factory.__name__.strip("_").removesuffix("_store"))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    instance = await request.param()
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
