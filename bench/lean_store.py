"""A leaner memory store, measured against ``gateway.stores.memory.MemoryStore`` (memory scenario).

A proposal, not used by the gateway: ``python -m bench --only memory`` reports bytes per session
for both, so the store's owner can weigh the change. ``MemoryStore`` keeps each entry in a
cachetools ``TLRUCache`` (three dicts, a heap and an item object per key: about 250 bytes of
bookkeeping per entry, two entries per session); this one keeps a plain dict of
``(expires_at, version, value)`` tuples (about 110 bytes), drops expired entries when read and in a
sweep at most once a second on writes, and evicts the oldest written first past ``max_entries``.
"""

from __future__ import annotations

import time

from gateway.stores import Store, Versioned


class LeanMemoryStore(Store):
    def __init__(self, *, max_entries: int = 200_000) -> None:
        self._data: dict[str, tuple[float, int, bytes]] = {}
        self._max = max_entries
        self._next_sweep = 0.0

    def _live(self, key: str) -> tuple[float, int, bytes] | None:
        entry = self._data.get(key)
        if entry is not None and entry[0] <= time.monotonic():
            del self._data[key]
            return None
        return entry

    def _put(self, key: str, value: bytes, ttl_s: float, version: int) -> None:
        now = time.monotonic()
        data = self._data
        if now >= self._next_sweep or len(data) >= self._max:
            for stale in [k for k, entry in data.items() if entry[0] <= now]:
                del data[stale]
            while len(data) >= self._max:
                del data[next(iter(data))]
            self._next_sweep = now + 1.0
        data.pop(key, None)
        data[key] = (now + ttl_s, version, value)

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return entry[2] if entry else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        entry = self._live(key)
        self._put(key, value, ttl_s, entry[1] + 1 if entry else 1)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def pop(self, key: str) -> bytes | None:
        entry = self._live(key)
        if entry is None:
            return None
        del self._data[key]
        return entry[2]

    async def get_versioned(self, key: str) -> Versioned | None:
        entry = self._live(key)
        return Versioned(entry[1], entry[2]) if entry else None

    async def set_versioned(self, key: str, value: bytes, ttl_s: float, *,
                            expected_version: int | None = None) -> int | None:
        entry = self._live(key)
        current = entry[1] if entry else 0
        if expected_version is not None and expected_version != current:
            return None
        self._put(key, value, ttl_s, current + 1)
        return current + 1

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._data)
