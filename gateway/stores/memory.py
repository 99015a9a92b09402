"""The default store: one process, bounded, every entry with its own TTL (cachetools)."""

from __future__ import annotations

import time
from typing import NamedTuple

from cachetools import TLRUCache

from gateway.stores import Store, Versioned


class _Entry(NamedTuple):
    expires_at: float
    version: int
    value: bytes


def _expiry(_key: str, entry: _Entry, _now: float) -> float:
    return entry.expires_at


class MemoryStore(Store):
    """In-process store. The oldest entries are evicted past ``max_entries``.

    Every method is free of ``await`` points, so each one is atomic under asyncio.
    """

    def __init__(self, *, max_entries: int = 200_000) -> None:
        self._data: TLRUCache[str, _Entry] = TLRUCache(maxsize=max_entries, ttu=_expiry, timer=time.monotonic)

    def _put(self, key: str, value: bytes, ttl_s: float, version: int) -> None:
        self._data[key] = _Entry(time.monotonic() + ttl_s, version, value)

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        return entry.value if entry else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        entry = self._data.get(key)
        self._put(key, value, ttl_s, entry.version + 1 if entry else 1)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def pop(self, key: str) -> bytes | None:
        entry = self._data.pop(key, None)
        return entry.value if entry else None

    async def get_versioned(self, key: str) -> Versioned | None:
        entry = self._data.get(key)
        return Versioned(entry.version, entry.value) if entry else None

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        entry = self._data.get(key)
        current = entry.version if entry else 0
        if expected_version is not None and expected_version != current:
            return None
        self._put(key, value, ttl_s, current + 1)
        return current + 1

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._data)
