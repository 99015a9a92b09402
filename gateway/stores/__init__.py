"""Where the gateway keeps what must outlive a request: sessions, token records, pending logins.

``Store`` is the one interface every backend implements (``memory`` here, ``redis`` for several
replicas). Values are opaque bytes; callers serialise. Every write carries a TTL, so nothing
lives forever. Two operations carry the concurrency rules:

- ``pop`` takes a value and removes it atomically: a pending login ``state`` is used once, and of
  two concurrent consumers exactly one wins.
- ``set_versioned`` writes with a version number, optionally only if the stored version is still
  the expected one (compare-and-set): a refreshed token record is never overwritten by a stale one.

To add a backend, subclass ``Store``, implement every abstract method and run it through
``tests/test_store_contract.py`` (one contract suite for every store).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Versioned:
    version: int
    value: bytes


class Store(ABC):
    """A key-value store with TTLs, atomic take and compare-and-set."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def pop(self, key: str) -> bytes | None:
        """Return the value and delete it, atomically; None when absent or expired."""

    @abstractmethod
    async def get_versioned(self, key: str) -> Versioned | None: ...

    @abstractmethod
    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        """Write and return the new version (the old one plus one, or 1).

        With ``expected_version`` the write happens only if the stored version equals it (0 means
        "absent"); otherwise nothing is written and None is returned.
        """

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the backend cannot be reached."""

    async def aclose(self) -> None:
        """Release connections."""
