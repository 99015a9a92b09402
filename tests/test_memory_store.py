"""What the memory store does beyond the store contract (tests/test_store_contract.py): its bound
and the sweep of expired entries."""

from __future__ import annotations

import pytest

from gateway.stores import memory as memory_module
from gateway.stores.memory import MemoryStore
from tests.conftest import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(1000.0)
    monkeypatch.setattr(memory_module.time, "monotonic", clock)
    return clock


async def test_the_entry_written_longest_ago_is_evicted_first(clock: Clock) -> None:
    store = MemoryStore(max_entries=3)
    for name in ("a", "b", "c"):
        await store.set(name, name.encode(), 60)
    await store.set("a", b"a2", 60)  # rewriting a key makes it the newest
    await store.set("d", b"d", 60)
    assert len(store) == 3
    assert await store.get("b") is None
    assert [await store.get(name) for name in ("a", "c", "d")] == [b"a2", b"c", b"d"]


async def test_expired_entries_are_swept_by_a_later_write(clock: Clock) -> None:
    store = MemoryStore()
    for index in range(50):
        await store.set(f"short-{index}", b"x", 5)
    await store.set("long", b"y", 3600)
    clock.now += 6
    assert len(store) == 51  # nothing read them, nothing swept yet: the sweep waits its interval
    clock.now += memory_module._SWEEP_EVERY_S
    await store.set("other", b"z", 60)
    assert len(store) == 2
    assert await store.get("long") == b"y"


async def test_a_full_store_drops_expired_entries_before_live_ones(clock: Clock) -> None:
    store = MemoryStore(max_entries=3)
    await store.set("live", b"1", 3600)
    await store.set("soon", b"2", 1)
    await store.set("later", b"3", 3600)
    clock.now += 2
    await store.set("new", b"4", 3600)
    assert [await store.get(name) for name in ("live", "soon", "later", "new")] == [b"1", None, b"3", b"4"]


async def test_an_expired_entry_has_no_version_left(clock: Clock) -> None:
    store = MemoryStore()
    assert await store.set_versioned("k", b"v", 1) == 1
    clock.now += 1
    assert await store.get_versioned("k") is None
    assert await store.set_versioned("k", b"v", 1, expected_version=1) is None
    assert await store.set_versioned("k", b"w", 1, expected_version=0) == 1


async def test_a_full_store_evicts_a_hundredth_of_it_at_once(clock: Clock) -> None:
    store = MemoryStore(max_entries=200)
    for index in range(200):
        await store.set(f"k{index}", b"v", 3600)
    await store.set("new", b"v", 3600)
    assert len(store) == 199  # k0 and k1 went together; the next writes need no eviction
    assert await store.get("k0") is None and await store.get("k1") is None
    assert await store.get("k2") == b"v" and await store.get("new") == b"v"
