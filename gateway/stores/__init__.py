"""Where the gateway keeps what must outlive a request: sessions, token records, pending logins.

``Store`` is the one interface every backend implements (``memory`` for one process, ``redis``
for several replicas). Values are opaque bytes; callers serialise. Every write carries a TTL, so
nothing lives forever. Five operations carry the concurrency rules:

- ``pop`` takes a value and removes it atomically: a pending login ``state`` is used once, and of
  two concurrent consumers exactly one wins.
- ``set_versioned`` writes with a version number, optionally only if the stored version is still
  the expected one (compare-and-set): a refreshed token record is never overwritten by a stale
  one. Every write bumps the version, ``set`` included, so a compare-and-set sees writes made
  behind its back.
- ``lock(name, lease_s=..., wait_s=...)`` is an async context manager holding a named lock for
  every process that shares the store (single flight across replicas). The lock has a *lease*:
  it is renewed in the background while the holder runs and dies by itself ``lease_s`` after the
  holder stops renewing (a killed process never leaves it behind for longer). Each acquisition
  gets a *fence* number, increasing per name; only the holder of that fence can renew or release.
  Waiters are woken by a notification when the lock is released (``publish``), and otherwise
  when the holder's lease would have run out, never by polling.
- ``publish(topic, message)`` / ``subscribe(topic, callback)``: a best-effort broadcast to every
  process sharing the store (logout on one replica drops the session from the others' caches).
- ``set_versioned_replicated``: ``set_versioned`` that also says whether the write reached a
  replica (Redis ``WAIT``), for the one write a failover must not discard: a rotated refresh token.

``count(prefix)`` says how many live entries a key prefix of ``COUNTED_PREFIXES`` holds (the
``gateway_sessions_active`` gauge), for every process sharing the store; a backend that cannot
walk its keys cheaply indexes those keys as they are written (Redis: a sorted set by expiry).

The lock is correct only with the fencing rule of its users: the holder re-reads the record it
protects after acquiring and writes it back with compare-and-set on the version it read, so a
holder whose lease lapsed (paused, partitioned) can never overwrite a newer write.

To add a backend, subclass ``Store``, implement every abstract method and run it through
``tests/test_store_contract.py`` (one contract suite for every store). The lock and broadcast
primitives have in-process defaults here, right for a store that lives in one process; a store
shared by several processes overrides ``_try_lock``, ``_renew_lock``, ``_release_lock`` and
``publish`` (and calls ``_deliver`` / ``_lock_released`` when notifications arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway.stores")

#: Identifies this process in lock values (who holds a lock is visible to an operator).
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"


#: Where the session records live (``SessionStore`` keys them ``sess:<id>``).
SESSION_PREFIX = "sess:"
#: The key prefixes ``Store.count`` answers for. A backend may index these keys on every write, so
#: the list stays short.
COUNTED_PREFIXES = (SESSION_PREFIX,)


@dataclass(frozen=True)
class Versioned:
    version: int
    value: bytes


class LockTimeout(TimeoutError):
    """The lock stayed held by someone else for longer than the caller was willing to wait."""


@dataclass
class Lease:
    """A held lock: its name, fence number and owner token; ``lost`` once a renewal was refused."""

    name: str
    fence: int
    owner: str
    lease_s: float
    expires_at: float  # monotonic time the lease runs out unless renewed
    lost: bool = field(default=False)


class LockAttempt(NamedTuple):
    """What ``_try_lock`` answers: the fence when acquired (0 otherwise) and, when not, how long
    the current holder's lease still runs."""

    fence: int
    holder_remaining_s: float


@dataclass
class _LocalLock:
    fence: int
    owner: str
    expires_at: float


class _Signals:
    """Per-store state of the default (in-process) locks and broadcast."""

    def __init__(self) -> None:
        self.subscribers: dict[str, list[Callable[[str], None]]] = {}
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.locks: dict[str, _LocalLock] = {}
        self.fence = 0  # one counter for every name: fences increase per name, and nothing piles up


class Store(ABC):
    """A key-value store with TTLs, atomic take, compare-and-set, leased locks and broadcast."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Write unconditionally; bumps the version like ``set_versioned``."""

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

    #: How long a write that must not be lost is retried (``TokenManager``: a rotated refresh token,
    #: the provider having killed the old one) through store errors and unconfirmed replication.
    durable_write_window_s: float = 0.6

    async def set_versioned_replicated(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> tuple[int | None, bool]:
        """``set_versioned``, and whether the write reached the replicas a failover would promote
        (always, for a store without replicas). A write that no replica acknowledged may be
        discarded by a failover under way: the caller writes it again until one does."""
        return await self.set_versioned(key, value, ttl_s, expected_version=expected_version), True

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the backend cannot be reached."""

    async def aclose(self) -> None:
        """Release connections."""

    async def count(self, prefix: str) -> int | None:
        """How many live entries (not expired, not deleted) have a key starting with ``prefix``,
        one of ``COUNTED_PREFIXES``, for every process sharing the store; None when the backend
        cannot tell (the gauge is then not exposed)."""
        return None

    # -- broadcast ------------------------------------------------------------------------------

    @property
    def _signals(self) -> _Signals:
        signals: _Signals | None = self.__dict__.get("_store_signals")
        if signals is None:
            signals = self.__dict__["_store_signals"] = _Signals()
        return signals

    def subscribe(self, topic: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(message)`` for every ``publish(topic, message)`` by any process."""
        self._signals.subscribers.setdefault(topic, []).append(callback)

    async def publish(self, topic: str, message: str) -> None:
        """Deliver ``message`` to the subscribers of ``topic`` in every process (best effort)."""
        self._deliver(topic, message)

    def _deliver(self, topic: str, message: str) -> None:
        for callback in self._signals.subscribers.get(topic, ()):
            try:
                callback(message)
            except Exception:
                log.exception("a store subscriber failed on topic %s", topic)

    # -- leased locks ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, name: str, *, lease_s: float, wait_s: float) -> AsyncIterator[Lease]:
        """Hold the lock ``name`` for every process sharing this store.

        Waits at most ``wait_s`` (then ``LockTimeout``); the lease is renewed every third of
        ``lease_s`` while the body runs and released on exit. ``Lease.lost`` turns true if a
        renewal finds the lock taken over (the lease lapsed): the body's writes must then rely
        on compare-and-set, as they always should.
        """
        lease = await self.acquire(name, lease_s=lease_s, wait_s=wait_s)
        keeper = asyncio.create_task(self._keep_alive(lease))
        try:
            yield lease
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self.release(lease)

    async def acquire(self, name: str, *, lease_s: float, wait_s: float) -> Lease:
        """Take the lock (see ``lock``); the caller must ``release`` it, and renew it if it
        runs longer than ``lease_s``. Without renewal the lease simply runs out."""
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            owner = f"{PROCESS_ID}:{secrets.token_hex(6)}"
            wake = asyncio.Event()
            waiters = self._signals.waiters.setdefault(name, set())
            waiters.add(wake)  # before trying: a release between the try and the wait still wakes us
            try:
                started = loop.time()
                attempt = await self._try_lock(name, owner, lease_s)
                if attempt.fence:
                    return Lease(name, attempt.fence, owner, lease_s, started + lease_s)
                left = deadline - loop.time()
                if left <= 0:
                    raise LockTimeout(f"the lock {name!r} stayed busy for {wait_s:g} s")
                # Woken by the release notification; at the latest when the holder's lease would
                # run out (a holder that died never sends one).
                timeout = min(left, max(attempt.holder_remaining_s, 0.0) + 0.005)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
            finally:
                waiters.discard(wake)
                if not waiters:
                    self._signals.waiters.pop(name, None)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by ``lease_s`` from now; False (and ``lease.lost``) if it was lost."""
        started = asyncio.get_running_loop().time()
        if await self._renew_lock(lease.name, lease.fence, lease.owner, lease.lease_s):
            lease.expires_at = started + lease.lease_s
            return True
        lease.lost = True
        return False

    async def release(self, lease: Lease) -> None:
        """Give the lock up (only if still ours) and wake its waiters. Never raises for an
        unreachable store: the lease then ends by itself."""
        try:
            await self._release_lock(lease.name, lease.fence, lease.owner)
        except StoreUnavailable as exc:
            log.warning("could not release the lock %s (%s); its lease ends it", lease.name, exc.message)

    async def _keep_alive(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(lease.lease_s / 3)
            try:
                if not await self.renew(lease):
                    log.warning("the lock %s (fence %d) was lost: its lease lapsed", lease.name, lease.fence)
                    return
            except StoreUnavailable:
                if loop.time() >= lease.expires_at:
                    lease.lost = True
                    log.warning("the lock %s (fence %d) could not be renewed before its lease ran out",
                                lease.name, lease.fence)
                    return
            except Exception:  # never let the keeper's failure replace the holder's own outcome
                log.exception("renewing the lock %s failed; its lease will run out", lease.name)
                return

    def _lock_released(self, name: str) -> None:
        """Wake this process's waiters for ``name`` (a release notification arrived)."""
        for wake in self._signals.waiters.get(name, ()):
            wake.set()

    # The primitives. The defaults keep the locks in this process (right for ``memory``).

    async def _try_lock(self, name: str, owner: str, lease_s: float) -> LockAttempt:
        signals, now = self._signals, time.monotonic()
        held = signals.locks.get(name)
        if held is not None and held.expires_at > now and held.owner != owner:
            return LockAttempt(0, held.expires_at - now)
        signals.fence += 1
        signals.locks[name] = _LocalLock(signals.fence, owner, now + lease_s)
        return LockAttempt(signals.fence, 0.0)

    async def _renew_lock(self, name: str, fence: int, owner: str, lease_s: float) -> bool:
        held = self._signals.locks.get(name)
        now = time.monotonic()
        if held is None or held.fence != fence or held.owner != owner or held.expires_at <= now:
            return False
        held.expires_at = now + lease_s
        return True

    async def _release_lock(self, name: str, fence: int, owner: str) -> None:
        held = self._signals.locks.get(name)
        if held is not None and held.fence == fence and held.owner == owner:
            del self._signals.locks[name]
            self._lock_released(name)
