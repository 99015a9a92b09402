"""The default store: one process, bounded, every entry with its own TTL.

A plain dict of ``(expires_at, version, value)`` tuples. It is the cheapest shape Python offers
(about 110 bytes of bookkeeping per entry, against about 250 for a cachetools ``TLRUCache`` with
its heap and per-key link objects), which is what keeps a signed-in user under 1 KiB
(docs/benchmarks.md, memory). Expired entries are dropped when read, and all of them in a sweep
run by a write every ``_SWEEP_EVERY_S`` (every second while the store is full); past
``max_entries`` the entries written longest ago are evicted first, a hundredth of the store at a
time (a dict keeps insertion order, and a write re-inserts its key).
"""

from __future__ import annotations

import time
from itertools import islice

from gateway.stores import Store, Versioned

# A sweep walks every entry; expired ones cost only memory until then (reads never see them).
_SWEEP_EVERY_S = 60.0
_FULL_SWEEP_EVERY_S = 1.0

_Entry = tuple[float, int, bytes]  # expires_at (monotonic), version, value


class MemoryStore(Store):
    """In-process store. The oldest entries are evicted past ``max_entries``.

    Every method is free of ``await`` points, so each one is atomic under asyncio.
    """

    def __init__(self, *, max_entries: int = 200_000) -> None:
        self._data: dict[str, _Entry] = {}
        self._max_entries = max_entries
        self._swept_at = float("-inf")

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry[0] <= time.monotonic():
            del self._data[key]
            return None
        return entry

    def _put(self, key: str, value: bytes, ttl_s: float, version: int) -> None:
        now = time.monotonic()
        data = self._data
        data.pop(key, None)  # re-inserted below: the newest write goes to the end of the order
        since_sweep = now - self._swept_at
        full = len(data) >= self._max_entries
        # A full store sweeps before it evicts a live entry (a session: a user logged out), but at
        # most once a second: a sweep per write would make each write O(n) while it stays full.
        if since_sweep >= _SWEEP_EVERY_S or (full and since_sweep >= _FULL_SWEEP_EVERY_S):
            for stale in [k for k, entry in data.items() if entry[0] <= now]:
                del data[stale]
            self._swept_at = now
        if len(data) >= self._max_entries:
            # A hundredth at a time: one by one, each eviction would walk the slots the previous
            # ones left at the front of the dict (O(n) per write while full).
            for old_key in list(islice(data, max(1, self._max_entries // 100))):
                del data[old_key]
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

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        entry = self._live(key)
        current = entry[1] if entry else 0
        if expected_version is not None and expected_version != current:
            return None
        self._put(key, value, ttl_s, current + 1)
        return current + 1

    async def ping(self) -> None:
        return None

    async def count(self, prefix: str) -> int:
        """A walk of this process's entries, expired ones left out (a sweep may not have run yet)."""
        now = time.monotonic()
        return sum(1 for key, entry in list(self._data.items()) if entry[0] > now and key.startswith(prefix))

    def __len__(self) -> int:
        return len(self._data)
